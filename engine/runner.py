"""The per-item runner every pipeline shares.

A pipeline is a name and a list of stages (agents wrapped for the runner). For each work item the runner
checks whether it is already complete (a cheap size/mtime check, then the content hash), probes it, lets
every stage start (declaring the frames it wants as frame consumers), decodes the video once for all of
them, then finishes the stages in order, each seeing what the earlier ones produced, times and counts each
stage, and hands the item's rows to the shard writer. Bad input and a fault in one item become `rejections`
rows; the batch goes on. The runner knows nothing of any pipeline's agents or records beyond the tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from engine import __version__
from engine.config import EngineConfig
from engine.decode import DecodeLimits, DecodeResult, FrameConsumer, decode_video
from engine.errors import EngineError
from engine.frame_store import FrameStore, Keyframes, TrackFrames
from engine.ids import stable_id
from engine.probe import VideoInfo, probe_video
from engine.stats import Stats
from engine.storage import Dataset, ShardWriter
from schemas import (
    ClipRecord,
    EntityRef,
    MaskletRecord,
    Provenance,
    RejectionRecord,
    SampleRecord,
    VideoRecord,
    WorkItem,
)

log = logging.getLogger(__name__)
DecodeProgress = Callable[[str, int, int], None]  # (source, frames decoded, frames expected)


@dataclass
class Outputs:
    """Rows an item produced so far; each stage adds its own."""

    clips: list[ClipRecord] = field(default_factory=list)
    masklets: list[MaskletRecord] = field(default_factory=list)
    samples: list[SampleRecord] = field(default_factory=list)
    rejections: list[RejectionRecord] = field(default_factory=list)

    def extend(self, other: "Outputs") -> None:
        self.clips += other.clips
        self.masklets += other.masklets
        self.samples += other.samples
        self.rejections += other.rejections

    def tables(self) -> dict[str, list[Any]]:
        return {"clips": self.clips, "masklets": self.masklets, "samples": self.samples, "rejections": self.rejections}


@dataclass
class VideoContext:
    """What a stage knows of the item being processed, and the frame consumers its stages share."""

    item: WorkItem
    info: VideoInfo
    video_id: str
    provenance: Provenance
    stats: Stats
    entities: list[EntityRef] = field(default_factory=list)  # referring expressions, set by a stage or the caller
    state: dict[str, Any] = field(default_factory=dict)  # a pipeline's own per-video working state, stage to stage
    _shared: dict[tuple, Any] = field(default_factory=dict)

    @property
    def first_frame(self) -> int:
        """Index of the first frame of the item's window (0 without a window)."""
        return int(round((self.item.start_s or 0.0) * self.info.fps))

    @property
    def expected_frames(self) -> int:
        end = self.info.duration_s if self.item.end_s is None else min(self.item.end_s, self.info.duration_s)
        span = max(end - (self.item.start_s or 0.0), 0.0)
        return max(1, min(self.info.num_frames, int(round(span * self.info.fps))))

    def track_frames(self, *, size: int, fps: float, quality: int, memory_mb: float) -> TrackFrames:
        """The frames a tracker sees, stored once per video whatever the number of stages that track."""
        key = ("track", size, fps, quality)
        if key not in self._shared:
            self._shared[key] = TrackFrames(FrameStore(size=size, quality=quality, memory_budget_mb=memory_mb), fps)
        return self._shared[key]

    def keyframes(self, *, count: int, max_side: int = 768) -> Keyframes:
        """`count` frames spread over the item, at decode size (long side capped), shared by stages."""
        key = ("keyframes", count, max_side)
        if key not in self._shared:
            self._shared[key] = Keyframes(
                count=count, expected_frames=self.expected_frames, first_frame=self.first_frame, max_side=max_side
            )
        return self._shared[key]

    @property
    def shared_consumers(self) -> list[FrameConsumer]:
        return list(self._shared.values())

    def close(self) -> None:
        for consumer in self._shared.values():
            consumer.close()
        self._shared.clear()

    def rejection(self, stage: str, reason: str, detail: str, *, expression: str | None = None, raw: str | None = None) -> RejectionRecord:
        self.stats.count(f"rejected_{reason}")
        return RejectionRecord(
            rejection_id=stable_id(self.video_id, self.provenance.config_hash, stage, reason, expression),
            source=self.item.source,
            video_id=self.video_id,
            stage=stage,
            reason=reason,
            detail=detail,
            expression=expression,
            raw_answer=raw,
        )


class StagePass(Protocol):
    """A stage's work on one video: the frames it wants during the decode, then `finish`."""

    consumers: Sequence[FrameConsumer]

    def finish(self, decoded: DecodeResult, so_far: Outputs) -> Outputs:
        """Rows of this stage; `so_far` holds what earlier stages produced for this video."""
        ...


class FunctionPass:
    """A `StagePass` made of a finish function and the consumers it needs (what most stages are)."""

    def __init__(
        self, finish: Callable[[DecodeResult, Outputs], Outputs], consumers: Sequence[FrameConsumer] = ()
    ) -> None:
        self.consumers = list(consumers)
        self._finish = finish

    def finish(self, decoded: DecodeResult, so_far: Outputs) -> Outputs:
        return self._finish(decoded, so_far)


class Stage(Protocol):
    name: str  # timer and counter prefix

    def start(self, video: VideoContext) -> StagePass | None:
        """Set up the video's pass before decoding (None: nothing to do for this video)."""
        ...


@dataclass
class Pipeline:
    name: str  # namespaces commit records, shards and provenance
    stages: list[Any]  # Stage; a stage may also define `prepare(items)` for work batched over items
    config: EngineConfig
    models: dict[str, str]  # role -> model id, for provenance
    prompt_hashes: dict[str, str] = field(default_factory=dict)
    entities: list[EntityRef] = field(default_factory=list)  # given by the caller, for every item
    options: dict[str, Any] = field(default_factory=dict)  # run options that shape the output (data types...)

    @property
    def run_hash(self) -> str:
        """What an item's commit must match to be skipped: the config, the entities and the run options."""
        return stable_id(self.config.hash, [e.model_dump() for e in self.entities], self.options, length=12)

    def provenance(self) -> Provenance:
        return Provenance(
            engine_version=__version__,
            profile=self.config.profile,
            models=self.models,
            prompt_hashes=self.prompt_hashes,
            config_hash=self.config.hash,
        )


@dataclass
class ItemOutcome:
    item: WorkItem
    status: str  # done | skipped | rejected
    video_id: str | None = None
    detail: str = ""
    outputs: Outputs = field(default_factory=Outputs)

    @property
    def source(self) -> str:
        return self.item.source


def content_sha256(source: str) -> str:
    """Content hash of a video file, or of a folder of frames (names and bytes of every file, in order)."""
    import hashlib

    import fsspec

    from engine.ids import file_sha256

    fs, path = fsspec.core.url_to_fs(source)
    if not fs.isdir(path):
        return file_sha256(source)
    digest = hashlib.sha256()
    for entry in sorted(fs.ls(path, detail=False)):
        if fs.isfile(entry):
            digest.update(entry.rpartition("/")[2].encode() + b"\0")
            with fs.open(entry, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
    return digest.hexdigest()


class Runner:
    """Runs a pipeline over work items into a dataset; one instance per batch (or per CLI run)."""

    def __init__(
        self,
        pipeline: Pipeline,
        dataset: Dataset,
        *,
        stats: Stats | None = None,
        force: bool = False,
        progress: DecodeProgress | None = None,
        transient: tuple[type[BaseException], ...] = (),
        shard_mb: float = 128,
    ) -> None:
        self.pipeline = pipeline
        self.dataset = dataset
        self.stats = stats or Stats()
        self.force = force
        self.progress = progress
        self.transient = transient
        self.shard_mb = shard_mb
        self.limits = DecodeLimits(**pipeline.config.section("decode"))

    def run(self, items: Iterable[WorkItem]) -> list[ItemOutcome]:
        """Every item, one after another; one failing item never stops the others. Exceptions of the
        `transient` types propagate, so an orchestrator can retry the batch (committed items are skipped)."""
        items = list(items)
        complete = [self._complete(i) for i in items]
        todo = [i for i, done in zip(items, complete) if not done]
        self._prepare_failed: dict[str, str] = {}
        for stage in self.pipeline.stages:
            prepare = getattr(stage, "prepare", None)
            if prepare is not None and todo:
                try:
                    with self.stats.timer(f"stage.{stage.name}"):
                        prepare(todo)
                except self.transient:
                    raise
                except Exception as exc:  # the batch's items are rejected one by one below, not lost
                    log.exception("%s failed for a batch of %d items", stage.name, len(todo))
                    self._prepare_failed[stage.name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        outcomes = []
        with self.dataset.writer(self.pipeline.name, shard_mb=self.shard_mb) as writer:
            for item, done in zip(items, complete):
                if done:
                    self.stats.count("items_skipped_complete")
                    outcomes.append(ItemOutcome(item, "skipped", detail="already complete with this config (use --force)"))
                    continue
                outcomes.append(self._guarded(item, writer))
        return outcomes

    # -- one item ------------------------------------------------------------------------------------------
    def _complete(self, item: WorkItem) -> bool:
        """Committed with this config and unchanged since (size and mtime or etag; no content hash)."""
        if self.force:
            return False
        record = self.dataset.completion(self.pipeline.name, item.key)
        if not record or record.get("status") != "done" or record.get("run_hash") != self.pipeline.run_hash:
            return False
        fingerprint = self.dataset.fingerprint(item.source)
        return fingerprint is not None and record.get("fingerprint") == fingerprint

    def _guarded(self, item: WorkItem, writer: ShardWriter) -> ItemOutcome:
        try:
            return self._process(item, writer)
        except self.transient:
            raise
        except Exception as exc:  # a model fault on one item must not lose the batch
            log.exception("item %s failed", item.source)
            self.stats.count("items_failed")
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return self._reject(item, writer, "internal_error", detail, stage="run")

    def _reject(self, item: WorkItem, writer: ShardWriter, reason: str, detail: str, *, stage: str) -> ItemOutcome:
        self.stats.count("items_rejected")
        rejection = RejectionRecord(
            rejection_id=stable_id(item.key, stage, reason), source=item.source, stage=stage, reason=reason, detail=detail
        )
        writer.add(item.key, {"rejections": [rejection]}, self._record(item, "rejected", detail=detail))
        outputs = Outputs(rejections=[rejection])
        return ItemOutcome(item, "rejected", detail=detail, outputs=outputs)

    def _record(self, item: WorkItem, status: str, **extra: Any) -> dict[str, Any]:
        return {
            "status": status,
            "source": item.source,
            "config_hash": self.pipeline.config.hash,
            "run_hash": self.pipeline.run_hash,
            "engine_version": __version__,
            **extra,
        }

    def _process(self, item: WorkItem, writer: ShardWriter) -> ItemOutcome:
        fingerprint = self.dataset.fingerprint(item.source)
        try:
            info = probe_video(item.source, limits=self.limits, frame_rate=item.frame_rate)
        except EngineError as exc:
            return self._reject(item, writer, "unreadable_video", str(exc), stage="input")
        with self.stats.timer("hash"):
            sha = content_sha256(item.source)
        record = None if self.force else self.dataset.completion(self.pipeline.name, item.key)
        if record and record.get("status") == "done" and record.get("run_hash") == self.pipeline.run_hash:
            if record.get("content_sha256") == sha:  # touched, not changed: refresh the cheap check only
                self.stats.count("items_skipped_complete")
                return ItemOutcome(item, "skipped", record.get("video_id"), "unchanged content, already complete")
        windowed = item.start_s is not None or item.end_s is not None
        video_id = stable_id(sha, item.start_s, item.end_s) if windowed else sha[:16]

        counted_before = dict(self.stats.counters)
        ctx = VideoContext(item, info, video_id, self.pipeline.provenance(), self.stats, list(self.pipeline.entities))
        outputs = Outputs()
        try:
            passes = []
            for stage in self.pipeline.stages:
                if stage.name in self._prepare_failed:
                    raise RuntimeError(f"{stage.name} failed for the batch: {self._prepare_failed[stage.name]}")
                with self.stats.timer(f"stage.{stage.name}"):
                    started = stage.start(ctx)
                if started is not None:
                    passes.append((stage, started))
            consumers = ctx.shared_consumers + [c for _, p in passes for c in p.consumers]
            try:
                with self.stats.timer("decode"):
                    decoded = decode_video(
                        info,
                        consumers,
                        progress=(lambda n, t: self.progress(item.source, n, ctx.expected_frames)) if self.progress else None,
                        start_s=item.start_s,
                        end_s=item.end_s,
                    )
            except EngineError as exc:
                return self._reject(item, writer, "undecodable_video", str(exc), stage="decode")
            self.stats.count("frames_decoded", decoded.frames_decoded)
            if decoded.error:
                # Keep what decoded before the damage, and say so.
                outputs.rejections.append(ctx.rejection("decode", "truncated_stream", decoded.error))
            for stage, started in passes:
                with self.stats.timer(f"stage.{stage.name}"):
                    outputs.extend(started.finish(decoded, outputs))
        finally:
            ctx.close()

        video = VideoRecord(
            video_id=video_id,
            source=item.source,
            content_sha256=sha,
            start_s=item.start_s,
            end_s=item.end_s,
            duration_s=round(decoded.end_time - decoded.first_time, 6),
            fps=info.fps,
            num_frames=decoded.frames_decoded - decoded.first_index,
            width=info.width,
            height=info.height,
            rotation=info.rotation,
            codec=info.codec,
            decode_width=info.decode_width,
            decode_height=info.decode_height,
        )
        with self.stats.timer("write"):
            writer.add(
                item.key,
                {"videos": [video], **outputs.tables()},
                self._record(
                    item,
                    "done",
                    video_id=video_id,
                    content_sha256=sha,
                    fingerprint=fingerprint,
                    # what this item cost: frames decoded, model calls, tracker passes
                    counters={k: v - counted_before.get(k, 0) for k, v in self.stats.counters.items() if v != counted_before.get(k, 0)},
                ),
            )
        self.stats.count("items_done")
        return ItemOutcome(item, "done", video_id, outputs=outputs)
