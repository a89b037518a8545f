"""UFVideo's data construction (UFVideo §3.3, §4.1 and Appendix B, Boxes 1 and 2) as one runner stage over one
decode per video: masklet data restructured into PixRQA, PixHQA and PixTRQA samples with `<region>`, `[SEG]`
and `<Temp-x>` tokens, their texts written by a VLM from Box 2's annotation prompt (Qwen3-VL-235B-A22B in the
paper; any chat backend here).

Sources: any with objects and masks (the engine's own VideoRefer object-QA output, as UFVideo built PixRQA and
PixHQA from VideoRefer-700K; MeViS, Ref-YouTube-VOS, LV-VIS, SA-V, ReVOS), or boxes (pseudo masks from the box
segmenter on the sampled frames).

Per video:
- objects are grouped, at most `max_objects` (4) per sample, each group sharing at least one annotated frame;
- `frames` (16) frames are sampled uniformly over the annotated frames; the annotator sees them as ordered
  images with each object's box list per frame and returns a short description per object and a long one of
  all (Box 2);
- PixRQA: "we randomly select a mask from one of the initial frames as the visual prompt, with the remaining
  frames serving as label masks": the prompt frame is one of the first `prompt_candidates` frames where every
  object of the group has a mask (picked by the sample's id, so reruns agree); labels are the masklets' other
  frames;
- PixHQA: a time point (one frame) or a period (a run of the sampled frames), picked by the sample's id; the
  annotator is asked again on the frames of that time, so the answer is about what happens then; labels are
  the masks within it;
- PixTRQA: from items of `trqa_datasets` (ReVOS) whose objects' masks each form one continuous run of frames
  ("retaining samples with continuous frames and removing those with dispersed occurrences"), the run giving
  the period of the answer; the prompt frame is chosen as for PixRQA.

Sample labels (the exporters read them): `prompt_frame` (the frame of each `<region>` token's mask),
`label_frames` (frames of each `[SEG]` token's masks, comma-separated), `temporal` ("x" or "x1,x2") and
`time_s` (the same in seconds from the start of the video or window). `masklet_ids`: one per `<region>` or
`[SEG]` token, in order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import reduce
from typing import Any, Sequence

from agents.common import Failure
from agents.ufvideo_annotator import BoxedObject, UFVideoAnnotation, UFVideoAnnotator, UFVideoAnnotatorConfig, UFVideoJob, relative_box
from agents.ufvideo_tasks import period, pixhqa, pixrqa, pixtrqa, temp_index, temp_token
from engine.config import EngineConfig
from engine.decode import DecodeLimits, DecodeResult
from engine.ids import stable_id
from engine.runner import FunctionPass, Outputs, Pipeline, VideoContext
from engine.sources import EngineSamples
from engine.stats import Stats
from engine.storage import Dataset
from flows.pipelines import funnel, item_window
from flows.registry import Deployment, Option, PipelineSpec
from flows.source_objects import annotated_positions, source_masklets, spread
from schemas import MaskletRecord, SampleRecord, Turn

NAME = "ufvideo"
DATA_TYPES = ("pixrqa", "pixhqa", "pixtrqa")


@dataclass(frozen=True)
class UFVideoConfig:
    frames: int = 16  # shown to the annotator, uniform over the annotated frames
    max_objects: int = 4  # per sample (Appendix B)
    prompt_candidates: int = 3  # the "initial frames" a visual prompt's mask is picked from
    period_share: float = 0.4  # a PixHQA period spans this share of the sampled frames (at least 2)
    point_context: int = 1  # a PixHQA time point is annotated on its frame and this many sampled frames each side
    trqa_datasets: tuple[str, ...] = ("revos",)  # sources whose objects appear only while relevant (§B)
    period_braces: bool = True  # Box 1 writes a period as {<Temp-x1><Temp-x2>}

    def __post_init__(self) -> None:
        if self.frames < 2 or not 1 <= self.max_objects <= 16 or self.prompt_candidates < 1:
            raise ValueError("frames must be >= 2, max_objects in [1, 16], prompt_candidates >= 1")
        if not 0 < self.period_share <= 1 or self.point_context < 0:
            raise ValueError("period_share must be in (0, 1], point_context >= 0")


SETTINGS = {"decode": DecodeLimits, "ufvideo": UFVideoConfig, "ufvideo_annotator": UFVideoAnnotatorConfig}

SPEC = PipelineSpec(
    name=NAME,
    flow="build-ufvideo",
    entrypoint="build_ufvideo_flow",
    summary="UFVideo's data construction (§3.3, Appendix B): masklet data (the engine's VideoRefer object QA, ReVOS, "
    "any mask dataset) restructured into PixRQA, PixHQA and PixTRQA samples with <region>, [SEG] and <Temp-x> "
    "tokens, their texts from Box 2's annotation prompt.",
    roles={"vlm": "chat", "box_segmenter": "box_segmenter"},
    settings=SETTINGS,
    options=(
        Option("data_types", str, DATA_TYPES, "Tasks to make, repeatable; default: all three.", repeatable=True,
               choices=DATA_TYPES, flag="--data-type", short="-t"),
    ),
    data_types=DATA_TYPES,
    export_formats=("ufvideo", "hf"),
    deployments=(
        Deployment("default", "default", "gpu", 8, "UFVideo's PixRQA, PixHQA and PixTRQA construction on GPU workers.", 4),
        Deployment("tiny", "tiny", "cpu", 4, "The UFVideo flow with random tiny models on CPU; outputs are meaningless."),
    ),
    funnel=("ufvideo_annotator",),
    # from a dataset the engine wrote: the masklets of its object QA (UFVideo built PixRQA and PixHQA from
    # VideoRefer-700K's)
    engine_samples=EngineSamples(data_types=("object_qa",)),
)


def roles(config: EngineConfig, **_: Any) -> dict[str, str]:
    return dict(SPEC.roles)


def prompt_names(config: EngineConfig, **_: Any) -> list[str]:
    return list(UFVideoAnnotator.prompts)


def check_data_types(data_types: Sequence[str]) -> None:
    if not data_types or set(data_types) - set(DATA_TYPES):
        raise ValueError(f"data types must be among {', '.join(DATA_TYPES)}; got {list(data_types)}")


@dataclass(frozen=True)
class _Group:
    key: str  # the objects' ids, hashed: part of every sample id of the group
    masklets: tuple[MaskletRecord, ...]

    def frames(self) -> list[int]:
        return sorted({f.frame_index for m in self.masklets for f in m.frames})

    def common(self) -> list[int]:
        sets = [{f.frame_index for f in m.frames} for m in self.masklets]
        return sorted(reduce(set.intersection, sets))

    def pick(self, salt: str, choices: Sequence[Any]) -> Any:
        return choices[int(stable_id(self.key, salt), 16) % len(choices)]


@dataclass(frozen=True)
class _Time:
    """A PixHQA time: the sampled frames it covers, its token(s), its seconds and the label frames."""

    shown: list[int]
    when: str
    temporal: str
    time_s: str
    labels: list[int]


class UFVideoStage:
    name = "ufvideo_annotator"

    def __init__(self, annotator: UFVideoAnnotator, box_segmenter: Any, config: UFVideoConfig,
                 data_types: Sequence[str], stats: Stats) -> None:
        self.annotator, self.box_segmenter, self.config = annotator, box_segmenter, config
        self.data_types, self.stats = set(data_types), stats

    def start(self, ctx: VideoContext) -> FunctionPass:
        objects = [o for o in ctx.item.objects if o.masks or o.boxes]
        if not objects:
            rejection = ctx.rejection(self.name, "no_objects", "the item has no object with masks or boxes")
            return FunctionPass(lambda decoded, so_far: Outputs(rejections=[rejection]))
        positions = annotated_positions(objects)
        frames = ctx.frames_at([ctx.first_frame + p for p in spread(positions, self.config.frames)])

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            made = source_masklets(ctx, self.name, self.stats, box_segmenter=self.box_segmenter, frames=frames.frames)
            out = made.outputs
            masklets = [made.masklets[o.object_id] for o in objects if o.object_id in made.masklets]
            length = max(decoded.end_time - decoded.first_time, 1e-6)
            groups = self._groups(masklets)
            jobs, wanted = [], []  # (group, task, time) per job
            for group in groups:
                shown = [i for i in sorted(frames.frames) if any(_box(m, i) for m in group.masklets)]
                if not shown:
                    continue
                if self.data_types & {"pixrqa", "pixtrqa"}:
                    jobs.append(self._job(ctx, group, shown, frames.frames))
                    wanted.append((group, "whole", None))
                if "pixhqa" in self.data_types:
                    time = self._time(ctx, group, shown, length)
                    jobs.append(self._job(ctx, group, time.shown, frames.frames))
                    wanted.append((group, "pixhqa", time))
            results = self.annotator.annotate(jobs)
            failed = Counter(r.reason for r in results if isinstance(r, Failure))
            funnel(self.stats, self.name, len(results), len(results) - sum(failed.values()), failed)
            step = _step(positions)
            for (group, task, time), result in zip(wanted, results):
                if isinstance(result, Failure):
                    out.rejections.append(ctx.rejection(self.name, result.reason, result.detail, expression=group.key,
                                                        raw=result.raw_answer))
                    continue
                if task == "pixhqa":
                    out.samples.append(self._pixhqa(ctx, decoded, group, result, time))
                    continue
                if "pixrqa" in self.data_types:
                    sample = self._pixrqa(ctx, decoded, group, result)
                    if sample is None:
                        self.stats.count("ufvideo.pixrqa.no_label_frames")
                    else:
                        out.samples.append(sample)
                if "pixtrqa" in self.data_types and ctx.item.dataset in self.config.trqa_datasets:
                    sample = self._pixtrqa(ctx, decoded, group, result, step, length)
                    if sample is None:
                        self.stats.count("ufvideo.pixtrqa.dispersed")
                    else:
                        out.samples.append(sample)
            for sample in out.samples:
                self.stats.count(f"samples.{sample.data_type}.kept")
            return out

        return FunctionPass(finish)

    def _groups(self, masklets: list[MaskletRecord]) -> list[_Group]:
        """At most `max_objects` per group, in order, each group sharing at least one annotated frame."""
        groups: list[list[MaskletRecord]] = []
        for masklet in masklets:
            current = groups[-1] if groups else None
            if current and len(current) < self.config.max_objects and _Group("", (*current, masklet)).common():
                current.append(masklet)
            else:
                groups.append([masklet])
        return [_Group(stable_id(*(m.masklet_id for m in g)), tuple(g)) for g in groups]

    def _job(self, ctx: VideoContext, group: _Group, shown: list[int], images: dict) -> UFVideoJob:
        width, height = ctx.info.decode_width, ctx.info.decode_height
        objects = []
        for n, masklet in enumerate(group.masklets, 1):
            boxes = tuple(relative_box(b, width, height) if (b := _box(masklet, i)) else None for i in shown)
            objects.append(BoxedObject(f"object_{n}", boxes))
        return UFVideoJob(tuple(images[i] for i in shown), tuple(objects))

    def _time(self, ctx: VideoContext, group: _Group, shown: list[int], length: float) -> _Time:
        """A time point or a period over the sampled frames where the group appears (picked by the group)."""
        cfg = self.config
        start = ctx.first_frame
        fps = ctx.info.fps
        if len(shown) < 2 or group.pick("hqa-kind", ("point", "period")) == "point":
            everyone = [i for i in shown if all(_box(m, i) for m in group.masklets)] or shown
            point = group.pick("hqa-point", everyone)
            at = shown.index(point)
            seen = shown[max(0, at - cfg.point_context): at + cfg.point_context + 1]
            t = (point - start) / fps
            x = temp_index(t, length)
            return _Time(seen, temp_token(x), str(x), f"{t:.3f}", [point])
        span = max(2, round(len(shown) * cfg.period_share))
        first = group.pick("hqa-period", list(range(len(shown) - span + 1)))
        seen = shown[first: first + span]
        t1, t2 = (seen[0] - start) / fps, (seen[-1] - start) / fps
        x1, x2 = temp_index(t1, length), temp_index(t2, length)
        labels = [i for i in group.frames() if seen[0] <= i <= seen[-1]]
        return _Time(seen, period(x1, x2, braces=cfg.period_braces), f"{x1},{x2}", f"{t1:.3f},{t2:.3f}", labels)

    def _prompt_frame(self, group: _Group, frames: list[int]) -> int | None:
        common = [i for i in group.common() if i in set(frames)]
        return group.pick("prompt", common[: self.config.prompt_candidates]) if common else None

    def _sample(self, ctx: VideoContext, decoded: DecodeResult, group: _Group, data_type: str, question: str,
                answer: str, masklet_ids: list[str], labels: dict[str, str], frames: list[int],
                refers_to: list[str]) -> SampleRecord:
        return SampleRecord(
            sample_id=stable_id(ctx.video_id, ctx.provenance.config_hash, data_type, group.key, ctx.item.key),
            video_id=ctx.video_id, source=ctx.item.source, pipeline=NAME, data_type=data_type,
            labels={"objects": str(len(group.masklets)), **labels},
            conversation=[Turn(role="human", value=f"<video>\n{question}"), Turn(role="gpt", value=answer)],
            masklet_ids=masklet_ids, frames=sorted(set(frames)), window=item_window(ctx, decoded), refers_to=refers_to,
            kept=True, provenance=ctx.provenance,
        )

    def _pixrqa(self, ctx: VideoContext, decoded: DecodeResult, group: _Group,
                result: UFVideoAnnotation) -> SampleRecord | None:
        """None where the masklets have no frame besides the prompt's (nothing to segment)."""
        ids = [m.masklet_id for m in group.masklets]
        frames = group.frames()
        prompt = self._prompt_frame(group, frames)
        labels = [i for i in frames if i != prompt]
        if not labels:
            return None
        question, answer = pixrqa(result.short, result.long)
        return self._sample(ctx, decoded, group, "pixrqa", question, answer, ids + ids,
                            {"prompt_frame": str(prompt), "label_frames": _joined(labels)}, frames, ["mask"])

    def _pixhqa(self, ctx: VideoContext, decoded: DecodeResult, group: _Group, result: UFVideoAnnotation,
                time: _Time) -> SampleRecord:
        question, answer = pixhqa(result.short, result.long, time.when)
        labels = {"label_frames": _joined(time.labels), "temporal": time.temporal, "time_s": time.time_s}
        return self._sample(ctx, decoded, group, "pixhqa", question, answer, [m.masklet_id for m in group.masklets],
                            labels, time.labels, ["mask", "timestamp"])

    def _pixtrqa(self, ctx: VideoContext, decoded: DecodeResult, group: _Group, result: UFVideoAnnotation, step: int,
                 length: float) -> SampleRecord | None:
        """None where an object's masks (or the group's) do not form one continuous run of frames."""
        runs = [sorted(f.frame_index for f in m.frames) for m in group.masklets] + [group.frames()]
        if any(run != list(range(run[0], run[-1] + 1, step)) for run in runs):
            return None
        frames = group.frames()
        prompt = self._prompt_frame(group, frames)
        if prompt is None:
            return None
        t1, t2 = (frames[0] - ctx.first_frame) / ctx.info.fps, (frames[-1] - ctx.first_frame) / ctx.info.fps
        x1, x2 = temp_index(t1, length), temp_index(t2, length)
        question, answer = pixtrqa(result.short, result.long, period(x1, x2, braces=self.config.period_braces))
        ids = [m.masklet_id for m in group.masklets]
        labels = {"prompt_frame": str(prompt), "label_frames": _joined(frames), "temporal": f"{x1},{x2}",
                  "time_s": f"{t1:.3f},{t2:.3f}"}
        return self._sample(ctx, decoded, group, "pixtrqa", question, answer, ids + ids, labels, frames,
                            ["mask", "timestamp"])


def _box(masklet: MaskletRecord, index: int) -> list[float] | None:
    return next((f.box for f in masklet.frames if f.frame_index == index), None)


def _step(positions: Sequence[int]) -> int:
    """The source's annotation interval in frames (1: every frame; SA-V: 4)."""
    gaps = [b - a for a, b in zip(positions, positions[1:]) if b > a]
    return min(gaps) if gaps else 1


def _joined(frames: Sequence[int]) -> str:
    return ",".join(map(str, frames))


def build(config: EngineConfig, backends: dict[str, Any], *, stats: Stats, dataset: Dataset,
          data_types: Sequence[str] = DATA_TYPES) -> Pipeline:
    from prompts import template_hash

    check_data_types(data_types)
    annotator = UFVideoAnnotator(backends["vlm"], UFVideoAnnotatorConfig(**config.section("ufvideo_annotator")), stats)
    stage = UFVideoStage(annotator, backends["box_segmenter"], UFVideoConfig(**config.section("ufvideo")), data_types,
                         stats)
    return Pipeline(
        name=NAME,
        stages=[stage],
        config=config,
        models={role: getattr(b, "model_id", "?") for role, b in backends.items()},
        prompt_hashes={p: template_hash(p) for p in prompt_names(config)},
        options={"data_types": sorted(data_types)},
    )
