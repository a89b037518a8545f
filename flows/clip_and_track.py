"""Clip and track (Strefer §2.1.3-2.1.4): the Video Clipper and the Referring Masklet Generator as runner
stages, plus the Grounded-SAM-2 baseline and the overlay render as optional stages on the same decode."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

from agents.entity_recognizer import EntityRecognizer, RecognizerConfig
from agents.grounder import ChatGrounder
from agents.referring_parser import ParserConfig, ReferringParser, to_entity_refs
from agents.masklet_generator import GroundedSam2Baseline, MaskletConfig, ReferringMaskletGenerator
from agents.video_clipper import ClipperConfig, VideoClipper
from engine.config import EngineConfig
from engine.decode import DecodeLimits, DecodeResult
from engine.models.interfaces import Grounder
from engine.runner import FunctionPass, Outputs, Pipeline, VideoContext
from engine.stats import Stats
from engine.storage import Dataset
from flows.registry import Deployment, Option, PipelineSpec
from schemas import ClipRecord, EntityRef

NAME = "clip-and-track"
ENTITIES = Option(
    "entities", str, (), "EXPRESSION[:GENERALIZED_NOUN], repeatable, e.g. 'girl in a blue dress:person'; without "
    "a noun the expression itself prompts the detector; none: each video's entities are found (Strefer's Entity "
    "Recognizer and Referring Parser)", repeatable=True, flag="--entity", short="-e",
)


@dataclass(frozen=True)
class EntitiesConfig:
    recognizer_frames: int = 16  # frames from the whole video shown to the Entity Recognizer (Prompt P.1)
    frame_max_side: int = 768

    def __post_init__(self) -> None:
        if self.recognizer_frames < 1 or self.frame_max_side < 28:
            raise ValueError("recognizer_frames must be >= 1 and frame_max_side >= 28")


SETTINGS = {
    "decode": DecodeLimits,
    "clipper": ClipperConfig,
    "masklets": MaskletConfig,
    "entities": EntitiesConfig,
    "recognizer": RecognizerConfig,
    "parser": ParserConfig,
}

SPEC = PipelineSpec(
    name=NAME,
    flow="clip-and-track",
    entrypoint="clip_and_track_flow",
    summary="Video Clipper + Referring Masklet Generator (Strefer §2.1.3-2.1.4) over video files: clips and one "
    "masklet per referring expression.",
    roles={"detector": "detector", "tracker": "tracker", "grounder": "chat", "embedder": "embedder",
           "box_segmenter": "box_segmenter", "vlm": "chat", "llm": "chat"},
    settings=SETTINGS,
    options=(
        ENTITIES,
        Option("baseline", bool, False, "Also run the Grounded-SAM-2 baseline on the same decode (masklets.method)."),
        Option("render", bool, False, "Also write renders/<video_id>.mp4 with the masklets drawn.", shapes_output=False),
    ),
    export_formats=("videorefer", "hf"),
    deployments=(
        Deployment("gpu", "default", "gpu", 8, "Video Clipper + Referring Masklet Generator (Strefer) on GPU workers.", 4),
        Deployment("tiny-wiring-check", "tiny", "cpu", 4, "The same flow with random tiny models on CPU; outputs are meaningless."),
    ),
    source_param="videos",
    sources_are_videos=True,
    batched_sources=False,
)


def roles(config: EngineConfig, *, entities: Sequence[Any] = (), **_: Any) -> dict[str, str]:
    """Model roles (and the interface each must provide) this pipeline needs under `config`; without
    entities, the Entity Recognizer (vlm) and the Referring Parser (llm) find them."""
    needed = {"detector": "detector", "tracker": "tracker", "grounder": "chat", "embedder": "embedder"}
    if config.section("masklets").get("prompt") == "mask":
        needed["box_segmenter"] = "box_segmenter"
    if not entities:
        needed.update({"vlm": "chat", "llm": "chat"})
    return needed


def prompt_names(config: EngineConfig, *, entities: Sequence[Any] = (), **_: Any) -> list[str]:
    """Prompt templates this pipeline renders under these options (their hashes are in its run hash)."""
    names = ["grounder"]
    if not entities:
        names += [*EntityRecognizer.prompts, *ReferringParser.prompts]
    return names


class EntityStage:
    """Strefer's Entity Recognizer (Prompt P.1 on frames from the whole video) and Referring Parser
    (expressions, nouns, generalized categories): the entities of a video when none were given. They are
    found after the decode, before the masklet generator reads them (its frames are kept meanwhile)."""

    name = "entities"

    def __init__(self, recognizer: EntityRecognizer, parser: ReferringParser, config: EntitiesConfig) -> None:
        self.recognizer, self.parser, self.config = recognizer, parser, config

    def start(self, ctx: VideoContext) -> FunctionPass | None:
        if ctx.entities:
            return None
        keyframes = ctx.keyframes(count=self.config.recognizer_frames, max_side=self.config.frame_max_side)

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            video = keyframes.chat_video()
            if video is None:
                return Outputs(rejections=[ctx.rejection("recognizer", "no_frames", "no frames were decoded")])
            (paragraph,) = self.recognizer.recognize([video])
            if not isinstance(paragraph, str):
                return Outputs(rejections=[ctx.rejection("recognizer", paragraph.reason, paragraph.detail, raw=paragraph.raw_answer)])
            (parsed,) = self.parser.parse([paragraph])
            if not isinstance(parsed, list):
                detail = f"{parsed.detail} (paragraph: {paragraph[:300]!r})"
                return Outputs(rejections=[ctx.rejection("parser", parsed.reason, detail, raw=parsed.raw_answer)])
            ctx.entities = to_entity_refs(parsed)
            ctx.state["entity_paragraph"] = paragraph
            return Outputs()

        return FunctionPass(finish)


class ClipStage:
    name = "clip"

    def __init__(self, clipper: VideoClipper) -> None:
        self.clipper = clipper

    def start(self, ctx: VideoContext) -> FunctionPass:
        info = ctx.info
        clip_pass = self.clipper.start(
            video_id=ctx.video_id, fps=info.fps, width=info.width, height=info.height, provenance=ctx.provenance
        )

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            if not decoded.frames_decoded:
                return Outputs()
            return Outputs(
                clips=clip_pass.finish(
                    frames_decoded=decoded.frames_decoded, end_time=decoded.end_time, first_frame=decoded.first_index
                )
            )

        return FunctionPass(finish, clip_pass.consumers)


def hard_cuts(clips: Sequence[ClipRecord]) -> list[int]:
    """Frames where a clip found by a content cut (PySceneDetect's hard cut) starts: tracks must not cross
    them. A boundary found by clustering is gradual and tracking may cross it."""
    first = min((c.start_frame for c in clips), default=0)
    return sorted(c.start_frame for c in clips if c.method == "content" and c.start_frame > first)


class MaskletStage:
    """The Referring Masklet Generator (or the baseline) over the video's shared tracker frames. The frames
    are kept during the decode; the entities are read at `finish`, so a stage before it (the Entity
    Recognizer and Referring Parser) may find them from the same decode, and the hard cuts of the clip stage
    before it end tracks."""

    def __init__(self, generator: ReferringMaskletGenerator) -> None:
        self.generator = generator
        self.name = f"masklets.{generator.method}"

    def start(self, ctx: VideoContext) -> FunctionPass:
        gen, cfg = self.generator, self.generator.config
        frames = ctx.track_frames(
            size=gen.tracker.image_size, fps=cfg.track_fps, quality=cfg.frame_jpeg_quality, memory_mb=cfg.frame_memory_mb
        )

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            if not ctx.entities:
                return Outputs()  # nothing to track; whoever found no entities said why
            masklet_pass = gen.start(
                video_id=ctx.video_id,
                source=ctx.item.source,
                width=ctx.info.decode_width,
                height=ctx.info.decode_height,
                entities=ctx.entities,
                provenance=ctx.provenance,
                frames=frames,
            )
            result = masklet_pass.finish(cuts=hard_cuts(so_far.clips))
            return Outputs(masklets=result.masklets, rejections=result.rejections)

        return FunctionPass(finish)


class RenderStage:
    """An MP4 a person can watch (renders/<video_id>.mp4); it decodes the video a second time."""

    name = "render"

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.paths: dict[str, str] = {}  # video_id -> render path

    def start(self, ctx: VideoContext) -> FunctionPass:
        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            from engine.render import render_overlay

            with tempfile.TemporaryDirectory() as tmp:
                local = f"{tmp}/{ctx.video_id}.mp4"
                frames = render_overlay(ctx.info, local, masklets=so_far.masklets, clips=so_far.clips)
                self.paths[ctx.video_id] = self.dataset.put_file(local, f"renders/{ctx.video_id}.mp4")
            ctx.stats.count("frames_decoded_render", frames)
            return Outputs()

        return FunctionPass(finish)


def _grounder(backend: Any) -> Grounder:
    """The grounder role is a chat model (shown numbered boxes); a `Grounder` is used as it is."""
    return backend if isinstance(backend, Grounder) else ChatGrounder(backend)


def build(
    config: EngineConfig,
    backends: dict[str, Any],
    *,
    stats: Stats,
    dataset: Dataset,
    entities: Sequence[EntityRef | dict] = (),
    baseline: bool = False,
    render: bool = False,
) -> Pipeline:
    from prompts import template_hash

    masklet_config = MaskletConfig(**config.section("masklets"))
    generator = ReferringMaskletGenerator(
        detector=backends["detector"],
        tracker=backends["tracker"],
        grounder=_grounder(backends["grounder"]),
        box_segmenter=backends.get("box_segmenter"),
        embedder=backends.get("embedder"),
        config=masklet_config,
        stats=stats,
    )
    stages: list[Any] = []
    if not entities:
        recognizer = EntityRecognizer(backends["vlm"], RecognizerConfig(**config.section("recognizer")), stats)
        parser = ReferringParser(backends["llm"], ParserConfig(**config.section("parser")), stats)
        stages.append(EntityStage(recognizer, parser, EntitiesConfig(**config.section("entities"))))
    stages += [
        ClipStage(VideoClipper(embedder=backends["embedder"], config=ClipperConfig(**config.section("clipper")), stats=stats)),
        MaskletStage(generator),
    ]
    if baseline:
        stages.append(
            MaskletStage(GroundedSam2Baseline(detector=backends["detector"], tracker=backends["tracker"], config=masklet_config, stats=stats))
        )
    if render:
        stages.append(RenderStage(dataset))
    return Pipeline(
        name=NAME,
        stages=stages,
        config=config,
        models={role: getattr(b, "model_id", "?") for role, b in backends.items()},
        prompt_hashes={p: template_hash(p) for p in prompt_names(config, entities=entities)},
        entities=[EntityRef.parse(e) if isinstance(e, str) else EntityRef.model_validate(e) for e in entities],
        options={"baseline": baseline},  # rendering adds a file, not rows: a rerun need not redo for it
    )
