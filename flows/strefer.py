"""The Strefer instruction engine (Strefer §2.1-2.2, Table 1, Table 7) as runner stages over one decode:
entities (found by the Entity Recognizer and Referring Parser unless given), clips (Video Clipper), masklets
(Referring Masklet Generator), a structured transcript (Video Transcriber: per entity and clip, presence,
then what happens), and instructions of the 11 task types (Instruction Generator: templates for 1-6, an LLM
for 7-11, mask-referring versions where Table 7 has one), written as `samples` labelled with their task type
and group G1-G8.

Times in the transcript and the instructions are seconds from the item's first frame: for a window of a longer
file (`WorkItem.start_s`), from the window's start, and the temporal tokens spread over the window. Frame
indexes (`SampleRecord.frames`, masklets) stay those of the whole file, as in every table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from agents.instruction_generator import InstructionConfig, InstructionGenerator, TranscriptInput, scope_frames, to_sample
from agents.transcriber import ClipView, TranscribeJob, TranscriberConfig, VideoTranscriber
from engine.config import EngineConfig
from engine.decode import DecodeResult
from engine.runner import FunctionPass, Outputs, Pipeline, VideoContext
from engine.stats import Stats
from engine.storage import Dataset
from flows import clip_and_track
from schemas import ClipRecord, MaskletRecord

NAME = "strefer"
TimeFormat = Literal["timestamp", "tokens"]


@dataclass(frozen=True)
class StreferConfig:
    transcriber_frames: int = 32  # frames sampled over the whole video; each clip is shown those inside it
    frame_max_side: int = 448
    time_formats: tuple[TimeFormat, ...] = ("timestamp", "tokens")  # one sample per form: either can be exported
    sample_frames: int = 32  # frame indexes a sample lists for its clip or video

    def __post_init__(self) -> None:
        if self.transcriber_frames < 1 or self.sample_frames < 1 or self.frame_max_side < 28:
            raise ValueError("transcriber_frames and sample_frames must be >= 1, frame_max_side >= 28")
        if not self.time_formats or not set(self.time_formats) <= {"timestamp", "tokens"}:
            raise ValueError(f"time_formats must be among timestamp, tokens; got {self.time_formats}")


SETTINGS = {
    **clip_and_track.SETTINGS,
    "strefer": StreferConfig,
    "transcriber": TranscriberConfig,
    "instructions": InstructionConfig,
}


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


class TranscriberStage:
    name = "transcriber"

    def __init__(self, transcriber: VideoTranscriber, config: StreferConfig, stats: Stats) -> None:
        self.transcriber, self.config, self.stats = transcriber, config, stats

    def start(self, ctx: VideoContext) -> FunctionPass:
        keyframes = ctx.keyframes(count=self.config.transcriber_frames, max_side=self.config.frame_max_side)

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            from engine.models.interfaces import ChatVideo

            if not ctx.entities or not so_far.clips or not keyframes.frames:
                return Outputs()
            indexes = sorted(keyframes.frames)
            views = []
            clips, _ = _from_item_start(so_far.clips, (), decoded.first_time)
            for clip in clips:
                inside = [i for i in indexes if clip.start_frame <= i < clip.end_frame]
                # A clip shorter than the sampling step still gets its nearest frame.
                inside = inside or [min(indexes, key=lambda i: abs(i - clip.start_frame))]
                span = max(clip.end_time - clip.start_time, 1e-6)
                frames = ChatVideo(tuple(keyframes.frames[i] for i in inside), fps=max(len(inside) - 1, 1) / span)
                views.append(ClipView(clip.clip_index, clip.start_time, clip.end_time, frames))
            expressions = [e.expression for e in ctx.entities]
            (transcript,) = self.transcriber.transcribe([TranscribeJob(ctx.video_id, views, expressions)])
            ctx.state["transcript"] = transcript
            return Outputs()

        return FunctionPass(finish)


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
            for instruction in result.instructions:
                frames = [
                    decoded.first_index + i  # the window's frames, as indexes of the file
                    for i in scope_frames(
                        instruction,
                        fps=ctx.info.fps,
                        num_frames=decoded.frames_decoded - decoded.first_index,
                        count=self.config.sample_frames,
                    )
                ]
                for form in self.config.time_formats:
                    out.samples.append(
                        to_sample(instruction, source=ctx.item.source, provenance=ctx.provenance, frames=frames, time_format=form)
                    )
            kinds = Counter((s.labels["group"], s.task) for s in out.samples if s.labels.get("time_format") == self.config.time_formats[0])
            for (group, task), n in kinds.items():
                self.stats.count(f"samples.strefer.{group}.{task}", n)
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
        stages=[*base.stages, TranscriberStage(transcriber, cfg, stats), InstructionStage(generator, cfg, stats)],
        config=config,
        models=base.models,
        prompt_hashes={p: template_hash(p) for p in prompt_names(config, entities=entities)},
        entities=base.entities,
        options=base.options,
    )
