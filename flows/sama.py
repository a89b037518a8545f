"""SAMA's data engine (SAMA §3.1 and Appendix A.3, SAMA-239K) as one runner stage over one decode per video.

From a source with objects (masks: MeViS, Ref-YouTube-VOS, LV-VIS, SA-V; boxes only: VidSTG, whose pseudo
masks the box segmenter makes, HQ-SAM in the paper):
- a video with a single object is skipped (`single_object`: "to ensure visual diversity and avoid trivial
  cases, we discard videos with only a single object");
- 16 frames are sampled uniformly over the frames the source annotates, and each object's box (from its mask,
  or the source's box) is drawn on them in its own color with its tag (`obj0`, `obj1`, ...), the same color on
  every frame (Set-of-Mark);
- a VLM (Gemini 1.5 Pro in the paper; any chat backend here) gets the frames, each object's expression or
  category and the color-to-object map, and writes a description per object and a multi-turn dialogue whose
  answers ground the objects by tag (agents/sama_annotator.py);
- tags are mapped back to masklets and the samples written: `object_description` (a question about `<region>`,
  the object's description as the answer) and `grounded_dialogue` (`<region>` for a tag in a question,
  `<p> phrase </p> [SEG]` for a grounded mention in an answer; `masklet_ids` one per token, in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agents.sama_annotator import MarkedObject, SamaAnnotator, SamaConfig, SamaJob, plain, to_tokens
from engine.config import EngineConfig
from engine.decode import DecodeLimits, DecodeResult
from engine.draw import NAMED_COLORS, draw_numbered_boxes
from engine.ids import stable_id
from engine.runner import FunctionPass, Outputs, Pipeline, VideoContext
from engine.stats import Stats
from engine.storage import Dataset
from flows.pipelines import funnel, item_window
from flows.registry import Deployment, PipelineSpec
from flows.source_objects import annotated_positions, keyed_rejection, object_names, source_masklets, spread
from schemas import MaskletRecord, SampleRecord, SourceObject, Turn

NAME = "sama"
DATA_TYPES = ("object_description", "grounded_dialogue")

# Human turns of the description samples; one is picked per sample by its id, so reruns agree.
DESCRIBE_QUESTIONS = (
    "Please give a detailed description of <region> in the video.",
    "What does <region> look like, and what does it do in the video?",
    "Describe <region> in the video in detail.",
)


@dataclass(frozen=True)
class SamaPipelineConfig:
    frames: int = 16  # sampled uniformly over the annotated frames (A.3)
    min_objects: int = 2  # videos with fewer are skipped (A.3: "we discard videos with only a single object")

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if not 1 <= self.min_objects <= len(NAMED_COLORS):
            raise ValueError(f"min_objects must be in [1, {len(NAMED_COLORS)}], got {self.min_objects}")


SETTINGS = {"decode": DecodeLimits, "sama": SamaPipelineConfig, "sama_annotator": SamaConfig}

SPEC = PipelineSpec(
    name=NAME,
    flow="build-sama",
    entrypoint="build_sama_flow",
    summary="SAMA's data engine (§3.1, A.3): objects of a mask or box dataset (MeViS, Ref-YouTube-VOS, LV-VIS, SA-V, "
    "VidSTG with pseudo masks) boxed in color with tags on 16 frames; a VLM writes object descriptions and grounded "
    "multi-turn dialogues.",
    roles={"vlm": "chat", "box_segmenter": "box_segmenter"},
    settings=SETTINGS,
    data_types=DATA_TYPES,
    export_formats=("sama", "hf"),
    deployments=(
        Deployment("default", "default", "gpu", 8, "SAMA's engine (Set-of-Mark frames, object descriptions, grounded "
                   "dialogues) on GPU workers.", 4),
        Deployment("tiny", "tiny", "cpu", 4, "The SAMA flow with random tiny models on CPU; outputs are meaningless."),
    ),
    funnel=("sama_annotator",),
)


def roles(config: EngineConfig, **_: Any) -> dict[str, str]:
    return dict(SPEC.roles)


def prompt_names(config: EngineConfig, **_: Any) -> list[str]:
    return list(SamaAnnotator.prompts)


class SamaStage:
    name = "sama_annotator"

    def __init__(self, annotator: SamaAnnotator, box_segmenter: Any, config: SamaPipelineConfig, stats: Stats) -> None:
        self.annotator, self.box_segmenter, self.config, self.stats = annotator, box_segmenter, config, stats

    def start(self, ctx: VideoContext) -> FunctionPass:
        objects = [o for o in ctx.item.objects if o.masks or o.boxes]
        if len(objects) < self.config.min_objects:
            rejection = self._too_few(ctx, len(objects))
            return FunctionPass(lambda decoded, so_far: Outputs(rejections=[rejection]))
        indexes = [ctx.first_frame + p for p in spread(annotated_positions(objects), self.config.frames)]
        frames = ctx.frames_at(indexes)

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            made = source_masklets(ctx, self.name, self.stats, box_segmenter=self.box_segmenter, frames=frames.frames)
            out = made.outputs
            pairs = [(o, made.masklets[o.object_id]) for o in objects if o.object_id in made.masklets]
            if len(pairs) < self.config.min_objects:
                out.rejections.append(self._too_few(ctx, len(pairs)))
                return out
            pairs, extra = pairs[: len(NAMED_COLORS)], pairs[len(NAMED_COLORS):]
            kept = [m for _, m in pairs]
            for _, masklet in extra:  # more objects than colors a prompt can name apart
                out.rejections.append(keyed_rejection(
                    ctx, self.name, "too_many_objects", f"only {len(NAMED_COLORS)} objects are marked per video",
                    key=masklet.masklet_id, expression=masklet.expression))
            shown = sorted(i for i in frames.frames if any(_box(m, i) for m in kept))
            if not shown:  # the sampled frames were not decoded (a truncated stream), or their masks were refused
                out.rejections.append(ctx.rejection(self.name, "no_frames", "no sampled frame shows an object"))
                return out
            job = self._job(ctx, pairs, frames.frames, shown)
            (result,) = self.annotator.annotate([job])
            if not hasattr(result, "descriptions"):  # a Failure
                funnel(self.stats, self.name, 1, 0, {result.reason: 1})
                out.rejections.append(ctx.rejection(self.name, result.reason, result.detail, raw=result.raw_answer))
                return out
            funnel(self.stats, self.name, 1, 1)
            out.samples.extend(self._samples(ctx, decoded, kept, shown, result))
            for sample in out.samples:
                self.stats.count(f"samples.{sample.data_type}.kept")
            return out

        return FunctionPass(finish)

    def _too_few(self, ctx: VideoContext, n: int) -> Any:
        detail = (f"{n} object(s) with masks or boxes; SAMA keeps videos with at least {self.config.min_objects} "
                  "(A.3: videos with a single object are discarded)")
        return ctx.rejection(self.name, "single_object" if n == 1 else "no_objects", detail)

    def _job(self, ctx: VideoContext, pairs: list[tuple[SourceObject, MaskletRecord]], images: dict,
             shown: list[int]) -> SamaJob:
        """The sampled frames with each object's box drawn in its color and tag wherever it has one."""
        names = object_names(ctx)
        masklets = [m for _, m in pairs]
        colors = [rgb for _, rgb in NAMED_COLORS]
        frames = []
        for index in shown:
            boxed = [(n, box) for n, m in enumerate(masklets) if (box := _box(m, index))]
            frames.append(draw_numbered_boxes(
                images[index], [b for _, b in boxed], labels=[f"obj{n}" for n, _ in boxed],
                colors=[colors[n] for n, _ in boxed],
            ))
        objects = [MarkedObject(f"obj{n}", NAMED_COLORS[n][0], names[o.object_id], o.category)
                   for n, (o, _) in enumerate(pairs)]
        return SamaJob(tuple(frames), tuple(objects))

    def _samples(self, ctx: VideoContext, decoded: DecodeResult, masklets: list[MaskletRecord], shown: list[int],
                 result: Any) -> list[SampleRecord]:
        tag_ids = {f"obj{n}": m.masklet_id for n, m in enumerate(masklets)}
        labels = {"tags": ",".join(tag_ids), "tag_masklets": ",".join(tag_ids.values())}
        window = item_window(ctx, decoded)

        def sample(data_type: str, key: str, turns: list[Turn], masklet_ids: list[str], extra: dict) -> SampleRecord:
            sample_id = stable_id(ctx.video_id, ctx.provenance.config_hash, data_type, key, ctx.item.key)
            return SampleRecord(
                sample_id=sample_id, video_id=ctx.video_id, source=ctx.item.source, pipeline=NAME,
                data_type=data_type, labels={**labels, **extra}, conversation=turns, masklet_ids=masklet_ids,
                frames=shown, window=window, refers_to=["mask"], kept=True, provenance=ctx.provenance,
            )

        out = []
        for tag, masklet_id in tag_ids.items():
            question = DESCRIBE_QUESTIONS[int(stable_id(ctx.video_id, tag, ctx.item.key), 16) % len(DESCRIBE_QUESTIONS)]
            turns = [Turn(role="human", value=f"<video>\n{question}"),
                     Turn(role="gpt", value=plain(result.descriptions[tag]))]
            out.append(sample("object_description", tag, turns, [masklet_id], {"tag": tag}))
        turns, ids = [], []
        for n, turn in enumerate(result.dialogue):
            question, answer, tags = to_tokens(turn.question, turn.answer)
            turns += [Turn(role="human", value=("<video>\n" if n == 0 else "") + question), Turn(role="gpt", value=answer)]
            ids += [tag_ids[t] for t in tags]
        out.append(sample("grounded_dialogue", "dialogue", turns, ids, {}))
        return out


def _box(masklet: MaskletRecord, index: int) -> list[float] | None:
    return next((f.box for f in masklet.frames if f.frame_index == index), None)


def build(config: EngineConfig, backends: dict[str, Any], *, stats: Stats, dataset: Dataset) -> Pipeline:
    from prompts import template_hash

    annotator = SamaAnnotator(backends["vlm"], SamaConfig(**config.section("sama_annotator")), stats)
    stage = SamaStage(annotator, backends["box_segmenter"], SamaPipelineConfig(**config.section("sama")), stats)
    return Pipeline(
        name=NAME,
        stages=[stage],
        config=config,
        models={role: getattr(b, "model_id", "?") for role, b in backends.items()},
        prompt_hashes={p: template_hash(p) for p in prompt_names(config)},
        options={},
    )
