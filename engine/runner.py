"""The per-item runner every pipeline shares.

A pipeline is a name and a list of stages (agents wrapped for the runner). For each work item the runner
checks whether it is already complete (a cheap size/mtime check, then the content hash), probes it, lets
every stage start (declaring the frames it wants as frame consumers), decodes the video once for all of
them, then finishes the stages in order, each seeing what the earlier ones produced, times and counts each
stage, and hands the item's rows to the shard writer. Bad input and a fault in one item become `rejections`
rows; the batch goes on. The runner knows nothing of any pipeline's agents or records beyond the tables.

Several items at once (settings section `runner`, `RunnerConfig`): the front of an item (probe, content
hash, stage starts, the decode with its frame consumers: CPU work) overlaps the finish of others (detector,
tracker, chat models: GPU work), and up to `videos_in_flight` items finish at once, so one GPU serves several
videos where one alone leaves it idle. `prefetch` more items are decoded ahead, waiting for a finish slot.
Items start, and take finish slots, in input order; outcomes come back in input order.

Threads, not worker processes: every thread shares the one copy of each model the worker loaded, and
PyTorch, PyAV, OpenCV and pyarrow release the GIL in their kernels, so threads overlap where the time goes.
Processes would each load every model (the GPU memory N times over, and N loads) and pickle frames and
records between them. On a CUDA device each thread queues its item's kernels on its own CUDA stream, so
kernels of two videos can overlap on the GPU. What the threads share is guarded: the shard writer and
`Stats` hold locks, each item records its own costs (`Stats.recording`), progress callbacks are called one
at a time, and stages keep per-video state in the `VideoContext` (or their pass), never on the stage.
Backends shared across threads must be safe to call concurrently (TransformersChat serializes its
`generate`). With `videos_in_flight: 1, prefetch: 0` the runner works exactly as one loop over the items,
in the calling thread.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Literal, Protocol, Sequence

from engine import __version__
from engine.config import EngineConfig
from engine.decode import DecodeLimits, DecodeResult, FrameConsumer, decode_video
from engine.errors import ConfigError, EngineError
from engine.frame_store import FrameStore, Keyframes, TrackFrames
from engine.ids import stable_id
from engine.probe import VideoInfo, probe_video
from engine.stats import Stats
from engine.planning import Plan, Planner, fingerprint, item_id, variant_id
from engine.storage import Dataset, item_row
from engine.writer import TableWriter
from schemas import (
    ClipRecord,
    EntityRef,
    ItemRecord,
    MaskletRecord,
    Provenance,
    RejectionRecord,
    SampleRecord,
    SourceProblem,
    VideoRecord,
    WorkItem,
)

log = logging.getLogger(__name__)
DecodeProgress = Callable[[str, int, int], None]  # (source, frames decoded, frames expected)


@dataclass(frozen=True)
class RunnerConfig:
    """How many items the runner works on at once (settings section `runner`, accepted by every pipeline).
    Neither shapes the output: they are not part of the config hash."""

    # Items finishing at once, on threads sharing the loaded models; auto: 2 on a CUDA device, else 1.
    videos_in_flight: int | Literal["auto"] = "auto"
    # Items beyond those probed, hashed and decoded ahead (each holds its decoded frames until it finishes).
    prefetch: int = 1

    def __post_init__(self) -> None:
        n = self.videos_in_flight
        if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"videos_in_flight must be a whole number >= 1 or auto, got {n!r}")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"prefetch must be a whole number >= 0 (0: no decoding ahead), got {self.prefetch!r}")

    @classmethod
    def parse(cls, section: dict[str, Any]) -> "RunnerConfig":
        """The settings as the config loader validates them (`"2"` is 2), or a one-line ConfigError."""
        from dataclasses import fields

        from pydantic import TypeAdapter, ValidationError

        unknown = sorted(set(section) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown setting pipeline.runner.{unknown[0]}; runner takes: prefetch, videos_in_flight")
        try:
            return TypeAdapter(cls).validate_python(section)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"pipeline.runner{'.' + where if where else ''}: {err['msg']}") from None

    def resolved(self, device: str) -> tuple[int, int]:
        """(videos in flight, prefetch) on `device` (a resolved device name: cpu, cuda, cuda:N...)."""
        if self.videos_in_flight == "auto":
            return (2 if device.startswith("cuda") else 1), self.prefetch
        return int(self.videos_in_flight), self.prefetch


def run_device(config: EngineConfig) -> str:
    """The device the pipeline's models run on. `auto` without torch imported is the CPU: nothing in this
    process can have put a model on a GPU then (and the runner must not import torch for nothing)."""
    requested = str(config.pipeline.get("device", "auto"))
    if requested == "auto":
        if "torch" not in sys.modules:
            return "cpu"
        from engine.device import pick_device

        return pick_device(requested)
    return requested


class _Cancelled(BaseException):
    """Raised in an item's thread when another item's transient fault (or an interrupt) stops the batch.
    A BaseException, so no `except Exception` on the way turns it into a rejection."""


class _Batch:
    """What the threads of one concurrent `run` share: the cancellation, and the finish slots, taken in the
    order of the items (the model work runs in input order, as one item after another would; an item that
    never asks for one, rejected or skipped before its finish, gives up its turn)."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._cond = threading.Condition()
        self._turn = 0  # the item whose turn it is to take a free slot
        self._past: set[int] = set()  # later turns already taken or given up
        self.error: BaseException | None = None  # the first fault that stopped the batch

    def check(self) -> None:
        if self.error is not None:
            raise _Cancelled()

    def cancel(self, error: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()

    def _end_turn(self, turn: int) -> None:  # holding the lock
        if turn >= self._turn:
            self._past.add(turn)
            while self._turn in self._past:
                self._past.remove(self._turn)
                self._turn += 1
            self._cond.notify_all()

    def give_up_turn(self, turn: int) -> None:
        """Item `turn` will not ask for a slot (or took it already); later items need not wait for it."""
        with self._cond:
            self._end_turn(turn)

    @contextmanager
    def slot(self, turn: int, stop_on: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """One of the `videos_in_flight` finish slots for item `turn`, once the items before it have theirs.
        An exception of the `stop_on` types cancels the batch before the slot is given back, so no waiting
        item starts in its place."""
        with self._cond:
            while (self._free == 0 or self._turn != turn) and self.error is None:
                self._cond.wait()
            self.check()
            self._free -= 1
            self._end_turn(turn)
        try:
            yield
        except stop_on as exc:
            self.cancel(exc)
            raise
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()


@dataclass
class _InFlight:
    """One item's place in a concurrent run."""

    batch: _Batch
    turn: int

    def check(self) -> None:
        self.batch.check()

    def slot(self, stop_on: tuple[type[BaseException], ...]) -> ContextManager[None]:
        return self.batch.slot(self.turn, stop_on)


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
        """Index of the first frame of the item's window (0 without a window): the first at or after start_s,
        as the decoder counts it."""
        return max(0, math.ceil((self.item.start_s or 0.0) * self.info.fps - 1e-6))

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

    def frames_at(self, indexes: Sequence[int], *, max_side: int | None = None) -> Keyframes:
        """The frames at `indexes` (of the whole file), at decode size unless `max_side` caps it, shared by stages."""
        key = ("frames_at", tuple(sorted(set(indexes))), max_side)
        if key not in self._shared:
            self._shared[key] = Keyframes.at(indexes, max_side=max_side)
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
    name: str  # tags items and rows, namespaces provenance
    stages: list[Any]  # Stage; a stage may also define `prepare(items)` for work batched over items
    config: EngineConfig
    models: dict[str, str]  # role -> model id, for provenance
    prompt_hashes: dict[str, str] = field(default_factory=dict)
    entities: list[EntityRef] = field(default_factory=list)  # given by the caller, for every item
    options: dict[str, Any] = field(default_factory=dict)  # run options that shape the output (data types...)
    # Set by flows.pipelines from the pipeline's own roles, prompts, settings and run options (`run_identity`):
    run_hash: str = ""  # what an item's commit must match to be skipped; every id of the pipeline's rows uses it
    variant: str = ""  # the run options alone: items run with other options are other items

    def __post_init__(self) -> None:
        # A pipeline built by hand (tests, benchmarks): the whole config stands in for its own parts.
        chosen = {"entities": [e.model_dump() for e in self.entities], **self.options}
        self.variant = self.variant or variant_id({"pipeline": self.name, **chosen})
        self.run_hash = self.run_hash or stable_id(self.name, self.config.hash, chosen, length=12)

    def provenance(self) -> Provenance:
        return Provenance(
            engine_version=__version__,
            profile=self.config.profile,
            models=self.models,
            prompt_hashes=self.prompt_hashes,
            config_hash=self.run_hash,
        )

    def item_id(self, item: WorkItem) -> str:
        return item_id(self.name, item, self.variant)


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


SKIPPED_COMPLETE = "already complete with this config (use --force)"


def _problem(ctx: VideoContext, n: int, problem: SourceProblem) -> RejectionRecord:
    """A source annotation the adapter left out, as a rejection row of its item (numbered: one object can have
    several problems of one kind)."""
    rejection = ctx.rejection("input", problem.reason, problem.detail, expression=problem.expression or problem.object_id)
    return rejection.model_copy(update={"rejection_id": stable_id(rejection.rejection_id, "problem", n)})


class Runner:
    """Runs a pipeline over work items into a dataset; one instance per batch (or per CLI run).

    `writer` is the run's shared writer (flows pass the process's, so a commit holds many batches); without
    one the runner commits its items itself before `run` returns. `videos_in_flight` and `prefetch`, when
    given, override the config's `runner` section."""

    def __init__(
        self,
        pipeline: Pipeline,
        dataset: Dataset,
        *,
        stats: Stats | None = None,
        force: bool = False,
        progress: DecodeProgress | None = None,
        transient: tuple[type[BaseException], ...] = (),
        writer: TableWriter | None = None,
        run_id: str | None = None,
        videos_in_flight: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        import uuid

        self.pipeline = pipeline
        self.dataset = dataset
        self.stats = stats or Stats()
        self.force = force
        self.progress = progress
        self.transient = transient
        self.run_id = run_id or (writer.run_id if writer is not None else uuid.uuid4().hex[:16])
        self.writer = writer
        self.limits = DecodeLimits(**pipeline.config.section("decode"))
        overrides = {k: v for k, v in (("videos_in_flight", videos_in_flight), ("prefetch", prefetch)) if v is not None}
        self.settings = RunnerConfig.parse({**pipeline.config.section("runner"), **overrides})
        self._progress_lock = threading.Lock()  # progress callbacks need not be thread-safe
        self._threads = threading.local()  # each worker thread's CUDA stream
        self._device = "cpu"
        self._previous: dict[str, dict[str, Any]] = {}

    def plan(self, items: Sequence[WorkItem]) -> Plan:
        """The bulk skip check of `items` (one read of `items`; flows plan once per chunk instead)."""
        planner = Planner(
            self.dataset, pipeline=self.pipeline.name, variant=self.pipeline.variant, run_hash=self.pipeline.run_hash, force=self.force
        )
        return planner.split(items)

    def run(self, items: Iterable[WorkItem], *, plan: Plan | None = None) -> list[ItemOutcome]:
        """Every item; one failing item never stops the others; outcomes in the order of `items`. `plan` is
        the skip check already made for these items (else it is made here). Exceptions of the `transient`
        types propagate, so an orchestrator can retry the batch (committed items are skipped); with several
        items in flight the others stop first, and only finished items are committed."""
        items = list(items)
        plan = plan if plan is not None else self.plan(items)
        self._previous = plan.previous
        writer = self.writer if self.writer is not None else TableWriter(self.dataset, self.run_id)
        if plan.beside:
            self.stats.count("items_beside_other_options", plan.beside)
        for row in plan.replace:  # --force with other options: their outputs give way to this run's
            writer.keep(ItemRecord.model_validate({**item_row(row), "status": "replaced", "run_id": self.run_id}))
            self.stats.count("items_replaced")
        todo_ids = {id(i) for i in plan.todo}
        complete = [id(i) not in todo_ids or writer.pending(self.pipeline.item_id(i)) for i in items]
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
        self._device = run_device(self.pipeline.config)
        in_flight, prefetch = self.settings.resolved(self._device)
        try:
            if in_flight + prefetch > 1 and len(todo) > 1:
                return self._run_concurrent(items, complete, writer, in_flight, prefetch)
            outcomes = []
            for item, done in zip(items, complete):
                if done:
                    self.stats.count("items_skipped_complete")
                    outcomes.append(ItemOutcome(item, "skipped", detail=SKIPPED_COMPLETE))
                    continue
                outcomes.append(self._guarded(item, writer))
            return outcomes
        finally:
            if self.writer is None:  # items finished before an error are kept: their rows are complete
                writer.flush()

    # -- several items at once ---------------------------------------------------------------------------
    def _run_concurrent(
        self, items: list[WorkItem], complete: list[bool], writer: TableWriter, in_flight: int, prefetch: int
    ) -> list[ItemOutcome]:
        """Items start in order on `in_flight + prefetch` threads; each decodes as soon as it starts and
        finishes when one of `in_flight` slots is free and the items before it have theirs."""
        batch = _Batch(in_flight)
        outcomes: list[ItemOutcome | None] = [None] * len(items)
        futures: list[tuple[int, Future[ItemOutcome]]] = []
        pool = ThreadPoolExecutor(max_workers=in_flight + prefetch, thread_name_prefix="engine-item")
        try:
            for i, (item, done) in enumerate(zip(items, complete)):
                if done:
                    self.stats.count("items_skipped_complete")
                    outcomes[i] = ItemOutcome(item, "skipped", detail=SKIPPED_COMPLETE)
                else:
                    futures.append((i, pool.submit(self._threaded, item, writer, _InFlight(batch, len(futures)))))
            for i, future in futures:
                outcomes[i] = future.result()
        except BaseException as exc:  # a transient fault of one item, or an interrupt: stop the others
            batch.cancel(exc)
            pool.shutdown(wait=True, cancel_futures=True)
            if isinstance(exc, _Cancelled) and batch.error is not None:
                raise batch.error from None
            raise
        pool.shutdown(wait=True)
        return [o for o in outcomes if o is not None]

    def _threaded(self, item: WorkItem, writer: TableWriter, place: _InFlight) -> ItemOutcome:
        try:
            place.check()
            with self._stream():
                return self._guarded(item, writer, place)
        except _Cancelled:
            raise
        except BaseException as exc:  # a transient fault (the rest became rejections in `_guarded`)
            place.batch.cancel(exc)
            raise
        finally:
            place.batch.give_up_turn(place.turn)

    def _stream(self) -> ContextManager[Any]:
        """This thread's own CUDA stream where the models are on a CUDA device, so the kernels of items in
        flight can overlap; nothing elsewhere. torch is imported only then."""
        if not self._device.startswith("cuda"):
            return nullcontext()
        import torch

        stream = getattr(self._threads, "stream", None)
        if stream is None:
            device = torch.device(self._device)
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))  # work queued before (model loading) first
            self._threads.stream = stream
        return torch.cuda.stream(stream)

    # -- one item ------------------------------------------------------------------------------------------
    def _guarded(self, item: WorkItem, writer: TableWriter, place: _InFlight | None = None) -> ItemOutcome:
        try:
            return self._process(item, writer, place)
        except self.transient:
            raise
        except Exception as exc:  # a model fault on one item must not lose the batch
            log.exception("item %s failed", item.source)
            self.stats.count("items_failed")
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return self._reject(item, writer, "internal_error", detail, stage="run")

    def _reject(
        self, item: WorkItem, writer: TableWriter, reason: str, detail: str, *, stage: str, **record: Any
    ) -> ItemOutcome:
        """Commit the item as rejected. `record`: more of its `items` row; a permanent rejection carries the
        input's fingerprint, so the next plan skips it while the input is unchanged."""
        self.stats.count("items_rejected")
        rejection = RejectionRecord(
            rejection_id=stable_id(self.pipeline.item_id(item), stage, reason),
            source=item.source,
            stage=stage,
            reason=reason,
            detail=detail,
        )
        writer.add(self._record(item, "rejected", reason=reason, detail=detail, **record), {"rejections": [rejection]})
        outputs = Outputs(rejections=[rejection])
        return ItemOutcome(item, "rejected", detail=detail, outputs=outputs)

    def _record(self, item: WorkItem, status: str, **extra: Any) -> ItemRecord:
        """The item's `items` row; the writer fills write id, rows and time at the flush."""
        return ItemRecord(
            item_id=self.pipeline.item_id(item),
            pipeline=self.pipeline.name,
            item_key=item.key,
            variant=self.pipeline.variant,
            source=item.source,
            start_s=item.start_s,
            end_s=item.end_s,
            status=status,
            run_hash=self.pipeline.run_hash,
            write_id="",
            run_id=self.run_id,
            engine_version=__version__,
            committed_at="",
            **extra,
        )

    def _decode_progress(self, item: WorkItem, ctx: VideoContext, place: _InFlight | None) -> Callable[[int, float], None] | None:
        if place is None:
            return (lambda n, t: self.progress(item.source, n, ctx.expected_frames)) if self.progress else None

        def progress(n: int, t: float) -> None:
            place.check()  # a cancelled batch stops mid-decode
            if self.progress is not None:
                with self._progress_lock:
                    self.progress(item.source, n, ctx.expected_frames)

        return progress

    def _process(self, item: WorkItem, writer: TableWriter, place: _InFlight | None = None) -> ItemOutcome:
        """One item; `place` is set when it runs beside others (then its finish waits for a slot, and it
        stops between steps once the batch is cancelled)."""
        seen = fingerprint(item.source)
        try:
            info = probe_video(item.source, limits=self.limits, frame_rate=item.frame_rate)
        except EngineError as exc:
            return self._reject(item, writer, "unreadable_video", str(exc), stage="input", fingerprint=seen)
        with self.stats.timer("hash"):
            sha = content_sha256(item.source)
        previous = None if self.force else self._previous.get(self.pipeline.item_id(item))
        if previous is not None and previous.get("content_sha256") == sha:
            # Touched, not changed: keep its rows, record the new fingerprint so the next check is cheap.
            writer.keep(ItemRecord.model_validate({**item_row(previous), "fingerprint": seen, "run_id": self.run_id}))
            self.stats.count("items_skipped_complete")
            self.stats.count("items_touched")
            return ItemOutcome(item, "skipped", previous.get("video_id"), "unchanged content, already complete")
        windowed = item.start_s is not None or item.end_s is not None
        video_id = stable_id(sha, item.start_s, item.end_s) if windowed else sha[:16]
        if place is not None:
            place.check()

        with self.stats.recording() as cost:  # what this item costs, whatever runs beside it
            ctx = VideoContext(item, info, video_id, self.pipeline.provenance(), self.stats, list(self.pipeline.entities))
            outputs = Outputs(rejections=[_problem(ctx, n, p) for n, p in enumerate(item.problems)])
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
                            progress=self._decode_progress(item, ctx, place),
                            start_s=item.start_s,
                            end_s=item.end_s,
                        )
                except EngineError as exc:
                    return self._reject(
                        item, writer, "undecodable_video", str(exc), stage="decode", fingerprint=seen, content_sha256=sha
                    )
                self.stats.count("frames_decoded", decoded.frames_decoded)
                if decoded.error:
                    # Keep what decoded before the damage, and say so.
                    outputs.rejections.append(ctx.rejection("decode", "truncated_stream", decoded.error))
                with place.slot(self.transient) if place is not None else nullcontext():
                    for stage, started in passes:
                        if place is not None:
                            place.check()
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
            with self.stats.timer("write"):  # every stage finished: the item is whole, commit it
                writer.add(
                    self._record(
                        item,
                        "done",
                        video_id=video_id,
                        content_sha256=sha,
                        fingerprint=seen,
                        # what this item cost: frames decoded, model calls, tracker passes
                        counters={k: int(v) for k, v in cost.counters.items() if v},
                    ),
                    {"videos": [video], **outputs.tables()},
                )
        self.stats.count("items_done")
        return ItemOutcome(item, "done", video_id, outputs=outputs)

