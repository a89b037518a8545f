"""The Strefer instruction engine (Strefer §2.1-2.2, Table 1, Table 7) as runner stages over one decode:
entities (found by the Entity Recognizer and Referring Parser unless given), clips (Video Clipper), masklets
(Referring Masklet Generator), a structured transcript (Video Transcriber: per entity and clip, presence,
then what happens, each clip shown frames of its own), and instructions of the 11 task types (Instruction
Generator: templates for 1-6, an LLM for 7-11, mask-referring versions where Table 7 has one), written as
`samples` labelled with their task type, group G1-G8 and what they refer to.

Times in the transcript and the instructions are seconds from the item's first frame: for a window of a longer
file (`WorkItem.start_s`), from the window's start, and the temporal tokens spread over the window. Frame
indexes (`SampleRecord.frames`, `SampleRecord.window`, masklets) stay those of the whole file, as in every
table. A sample with a time in it is written once per time format (`time_formats`), one without a time once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from agents.instruction_generator import InstructionGenerator
from agents.instruction_records import (
    InstructionConfig,
    TimeFormat,
    TranscriptInput,
    clip_window,
    scope_frames,
    to_samples,
)
from agents.transcriber import ClipView, TranscribeJob, TranscriberConfig, VideoTranscriber
from agents.video_clipper import ClipperConfig
from engine.config import EngineConfig
from engine.decode import DecodeResult
from engine.frame_store import ClipFrames
from engine.runner import FunctionPass, Outputs, Pipeline, VideoContext
from engine.stats import Stats
from engine.storage import Dataset
from flows import clip_and_track
from flows.registry import Deployment, PipelineSpec
from schemas import ClipRecord, MaskletRecord

NAME = "strefer"


@dataclass(frozen=True)
class StreferConfig:
    # The transcriber describes each clip from frames of that clip alone (§2.1.5): `clip_frames` spread over it,
    # picked from frames the decode keeps at `clip_sample_fps`, raised where the clipper's shortest scene
    # (`clipper.min_scene_len` frames) would hold fewer than clip_frames (see `pool_fps`); a clip with fewer
    # frames than that in the video (the last one, a window's edge) gets every frame it has. Past
    # `clip_memory_mb`, kept frames spill to a temporary folder.
    clip_frames: int = 8
    clip_sample_fps: float = 8.0
    clip_memory_mb: float = 256.0
    frame_max_side: int = 448
    # A sample with a time in it is written once per form (either can be exported); one without, once.
    time_formats: tuple[TimeFormat, ...] = ("timestamp", "tokens")
    sample_frames: int = 32  # frame indexes a sample lists for its clip or video

    def __post_init__(self) -> None:
        if self.clip_frames < 1 or self.sample_frames < 1 or self.frame_max_side < 28:
            raise ValueError("clip_frames and sample_frames must be >= 1, frame_max_side >= 28")
        if not self.clip_sample_fps > 0 or not self.clip_memory_mb >= 0:
            raise ValueError(
                f"clip_sample_fps must be > 0 and clip_memory_mb >= 0, got {self.clip_sample_fps}, {self.clip_memory_mb}"
            )
        if not self.time_formats or not set(self.time_formats) <= {"timestamp", "tokens"}:
            raise ValueError(f"time_formats must be among timestamp, tokens; got {self.time_formats}")


SETTINGS = {
    **clip_and_track.SETTINGS,
    "strefer": StreferConfig,
    "transcriber": TranscriberConfig,
    "instructions": InstructionConfig,
}

SPEC = PipelineSpec(
    name=NAME,
    flow="build-strefer",
    entrypoint="build_strefer_flow",
    summary="Strefer's instruction engine (§2.1-2.2): entities (found unless given), clips, masklets, transcripts "
    "and instructions of the 11 task types of Table 7 over videos, folders of videos, manifests or frame folders.",
    roles={**clip_and_track.SPEC.roles, "vlm": "chat", "llm": "chat"},
    settings=SETTINGS,
    options=(clip_and_track.ENTITIES,),
    data_types=("strefer",),
    export_formats=("videorefer", "hf"),
    deployments=(
        Deployment("default", "default", "gpu", 8, "Strefer's instruction engine (entities, clips, masklets, transcripts, "
                   "11 task types) on GPU workers.", 4),
        Deployment("tiny", "tiny", "cpu", 4, "The Strefer flow with random tiny models on CPU; outputs are meaningless."),
    ),
)


def _from_item_start(clips: Sequence[ClipRecord], masklets: Sequence[MaskletRecord], t0: float):
    """Clips and masklets with their times counted from `t0`, the item's first frame (a window's start); the
    stored records keep the file's times."""
    if not t0:
        return list(clips), list(masklets)
    shift = lambda t: max(round(t - t0, 6), 0.0)  # noqa: E731
    clips = [c.model_copy(update={"start_time": shift(c.start_time), "end_time": shift(c.end_time)}) for c in clips]
    masklets = [
        m.model_copy(update={"frames": [f.model_copy(update={"timestamp": shift(f.timestamp)}) for f in m.frames]})
        for m in masklets
    ]
    return clips, masklets


def roles(config: EngineConfig, *, entities: Sequence[Any] = (), **_: Any) -> dict[str, str]:
    return {**clip_and_track.roles(config, entities=entities), "vlm": "chat", "llm": "chat"}


def prompt_names(config: EngineConfig, *, entities: Sequence[Any] = (), **_: Any) -> list[str]:
    """Prompt templates this pipeline renders under these options (their hashes are in its run hash)."""
    return [*clip_and_track.prompt_names(config, entities=entities), *VideoTranscriber.prompts, *InstructionGenerator.prompts]


def pool_fps(config: StreferConfig, video_fps: float, min_scene_len: int) -> float:
    """The rate the transcriber's frames are kept at: `clip_sample_fps`, or as dense as a scene of
    `min_scene_len` frames (the shortest the clipper cuts) needs to hold `clip_frames` of them, never denser
    than the video itself."""
    if not video_fps > 0:
        return config.clip_sample_fps
    needed = config.clip_frames * video_fps / max(min_scene_len, config.clip_frames)
    return max(config.clip_sample_fps, min(video_fps, needed))


class TranscriberStage:
    name = "transcriber"

    def __init__(self, transcriber: VideoTranscriber, config: StreferConfig, stats: Stats, min_scene_len: int) -> None:
        self.transcriber, self.config, self.stats, self.min_scene_len = transcriber, config, stats, min_scene_len

    def start(self, ctx: VideoContext) -> FunctionPass:
        cfg = self.config
        fps = pool_fps(cfg, ctx.info.fps, self.min_scene_len)
        pool = ClipFrames(fps=fps, width=ctx.info.decode_width, height=ctx.info.decode_height,
                          max_side=cfg.frame_max_side, memory_mb=cfg.clip_memory_mb)

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            try:
                return transcribe(decoded, so_far)
            finally:
                pool.close()

        def transcribe(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            out = Outputs()
            if not ctx.entities or not so_far.clips:
                return out
            views, bare = [], []
            clips, _ = _from_item_start(so_far.clips, (), decoded.first_time)
            for clip in clips:
                video = pool.chat_video(clip.start_frame, clip.end_frame, cfg.clip_frames)
                if video is None:  # shorter than one sampling interval: nothing of its own to show
                    bare.append(f"{clip.clip_index} (frames {clip.start_frame}-{clip.end_frame - 1})")
                    continue
                self.stats.count("transcriber_clip_frames", len(video.frames))
                views.append(ClipView(clip.clip_index, clip.start_time, clip.end_time, video))
            if bare:
                out.rejections.append(ctx.rejection(
                    "transcriber", "clip_without_frames",
                    f"clips {', '.join(bare)} hold no frame sampled at {fps:g} fps and are not "
                    "described; a higher strefer.clip_sample_fps would show them",
                ))
            if not views:
                return out
            expressions = [e.expression for e in ctx.entities]
            (transcript,) = self.transcriber.transcribe([TranscribeJob(ctx.video_id, views, expressions)])
            ctx.state["transcript"] = transcript
            return out

        return FunctionPass(finish, consumers=[pool])


class InstructionStage:
    name = "instructions"

    def __init__(self, generator: InstructionGenerator, config: StreferConfig, stats: Stats) -> None:
        self.generator, self.config, self.stats = generator, config, stats

    def start(self, ctx: VideoContext) -> FunctionPass:
        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            transcript = ctx.state.get("transcript")
            if transcript is None:
                return Outputs()
            # A window's times count from its start (clips and masklets keep the file's times and frame indexes).
            t0 = decoded.first_time or 0.0
            tracked = [m for m in so_far.masklets if m.method == "strefer"]
            clips, masklets = _from_item_start(so_far.clips, tracked, t0)
            duration = decoded.end_time - t0
            source = TranscriptInput.from_transcript(transcript, duration_s=duration, masklets=masklets, clips=clips)
            (result,) = self.generator.generate([source])
            out = Outputs()
            if result.failure is not None:
                f = result.failure
                out.rejections.append(ctx.rejection("instructions", f.reason, f.detail, raw=f.raw_answer))
            by_index = {c.clip_index: c for c in so_far.clips}
            for instruction in result.instructions:
                # A clip's samples list its own frames and carry its window; the others span the item.
                clip = by_index[instruction.clip_index] if instruction.clip_index is not None else None
                start, end = (clip.start_frame, clip.end_frame) if clip else (decoded.first_index, decoded.frames_decoded)
                out.samples += to_samples(
                    instruction,
                    source=ctx.item.source,
                    provenance=ctx.provenance,
                    frames=scope_frames(start, end, count=self.config.sample_frames),
                    window=clip_window(clip) if clip else None,
                    time_formats=self.config.time_formats,
                )
                self.stats.count(f"samples.strefer.{instruction.group}.type{instruction.task_type}")
            return out

        return FunctionPass(finish)


def build(
    config: EngineConfig,
    backends: dict[str, Any],
    *,
    stats: Stats,
    dataset: Dataset,
    entities: Sequence[Any] = (),
) -> Pipeline:
    from prompts import template_hash

    base = clip_and_track.build(config, backends, stats=stats, dataset=dataset, entities=entities)
    cfg = StreferConfig(**config.section("strefer"))
    transcriber = VideoTranscriber(backends["vlm"], TranscriberConfig(**config.section("transcriber")), stats)
    generator = InstructionGenerator(backends["llm"], InstructionConfig(**config.section("instructions")), stats)
    return Pipeline(
        name=NAME,
        stages=[*base.stages, TranscriberStage(transcriber, cfg, stats, ClipperConfig(**config.section("clipper")).min_scene_len), InstructionStage(generator, cfg, stats)],
        config=config,
        models=base.models,
        prompt_hashes={p: template_hash(p) for p in prompt_names(config, entities=entities)},
        entities=base.entities,
        options=base.options,
    )
