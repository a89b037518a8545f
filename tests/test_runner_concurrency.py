"""Several items in flight in the shared runner: decoding ahead overlaps the finish of earlier items, up to
`videos_in_flight` finishes overlap, and the dataset is what a one-item-at-a-time run writes.

Fake stages (a real decode of small synthetic videos; `finish` sleeps where a model would run) record
events; the tests compare the order of events, never wall times. Where a test needs two things to overlap, a
fake waits for the other one's event (with a generous timeout, so a broken runner fails instead of hanging).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from engine.config import load_config
from engine.decode import DecodeResult
from engine.errors import ConfigError
from engine.ids import stable_id
from engine.runner import FunctionPass, Outputs, Pipeline, Runner, RunnerConfig, VideoContext, run_device
from engine.stats import Stats
from engine.storage import Dataset
from schemas import ClipRecord, VideoRecord, WorkItem
from tests import synthetic

PIPELINE = "fake-concurrency"
WAIT_S = 20.0  # how long a fake waits for an event that a working runner makes happen at once


class FakeTransientFault(RuntimeError):
    """Stands in for a model server that went away: the orchestrator retries the batch."""


class Events:
    """What happened, in order, from every thread: (what, item index, thread id)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.log: list[tuple[str, int, int]] = []
        self._seen = threading.Condition(self._lock)
        self.finishing = 0
        self.most_finishing = 0

    def add(self, what: str, item: int) -> None:
        with self._lock:
            self.log.append((what, item, threading.get_ident()))
            if what == "finish_start":
                self.finishing += 1
                self.most_finishing = max(self.most_finishing, self.finishing)
            elif what == "finish_end":
                self.finishing -= 1
            self._seen.notify_all()

    def wait_for(self, what: str, item: int | Callable[[int], bool]) -> bool:
        """Wait until `what` happened to `item` (or to an item the predicate accepts)."""
        matches = item if callable(item) else (lambda i: i == item)
        with self._lock:
            return self._seen.wait_for(lambda: any(w == what and matches(i) for w, i, _ in self.log), timeout=WAIT_S)

    def at(self, what: str, item: int) -> int:
        """Position of the first such event in the log."""
        return next(i for i, e in enumerate(self.log) if e[:2] == (what, item))

    def items(self, what: str) -> list[int]:
        return [i for w, i, _ in self.log if w == what]


class FakeFrames:
    """A fake frame consumer: takes every frame of its item, notes when the decode reached it, and sums the
    pixels, so an item's output shows which frames it was fed."""

    def __init__(self, on_first_frame: Callable[[], None]) -> None:
        self._on_first_frame = on_first_frame
        self.frames = 0
        self.pixel_sum = 0

    def wants(self, index: int, time: float) -> bool:
        return True

    def consume(self, index: int, time: float, frame) -> None:
        if self.frames == 0:
            self._on_first_frame()
        self.frames += 1
        self.pixel_sum += int(frame.sum(dtype="int64"))


Hook = Callable[[int, VideoContext], None]


class FakeGpuStage:
    """A fake stage: its pass takes every decoded frame; `finish` sleeps (stands in for GPU work), counts
    through the run's Stats as agents do, and writes a clip and a rejection that carry what it was fed.
    `on_start(item index, ctx)` runs in `start`, before the decode, and `on_finish` at the start of `finish`
    (to wait for another item's event, or to fail)."""

    def __init__(self, name: str, events: Events, stats: Stats, index: dict[str, int], *,
                 on_start: Hook | None = None, on_finish: Hook | None = None, sleep_s: float = 0.01) -> None:
        self.name, self.events, self.stats, self.index = name, events, stats, index
        self.on_start, self.on_finish, self.sleep_s = on_start, on_finish, sleep_s
        self.prepared: list[list[str]] = []

    def prepare(self, items: list[WorkItem]) -> None:
        self.events.add(f"prepare.{self.name}", -1)
        self.prepared.append([i.source for i in items])

    def start(self, ctx: VideoContext) -> FunctionPass:
        i = self.index[ctx.item.source]
        self.events.add(f"start.{self.name}", i)
        if self.on_start is not None:
            self.on_start(i, ctx)
        frames = FakeFrames(lambda: self.events.add("decode_start", i))

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            self.events.add("finish_start", i)
            self.events.add(f"finish.{self.name}", i)
            try:
                if self.on_finish is not None:
                    self.on_finish(i, ctx)
                time.sleep(self.sleep_s)
                self.stats.count("fake_gpu_calls")
                self.stats.count("fake_frames_seen", frames.frames)
                clip = ClipRecord(
                    clip_id=stable_id(ctx.video_id, self.name), video_id=ctx.video_id, clip_index=len(so_far.clips),
                    start_frame=decoded.first_index, end_frame=decoded.frames_decoded, start_time=decoded.first_time,
                    end_time=decoded.end_time, method="single", provenance=ctx.provenance,
                )
                seen = f"{frames.frames} frames, pixel sum {frames.pixel_sum}, after {len(so_far.clips)} clips"
                return Outputs(clips=[clip], rejections=[ctx.rejection(self.name, "fake_checksum", seen)])
            finally:
                self.events.add("finish_end", i)

        return FunctionPass(finish, [frames])


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[tuple[Path, int]]:
    """Six short videos of different lengths (so different content and frame counts)."""
    folder = tmp_path_factory.mktemp("videos")
    out = []
    for k in range(6):
        truth = synthetic.short_video(folder / f"v{k}.mp4", seconds=1.0 + 0.3 * k, fps=10)
        out.append((truth.path, truth.num_frames))
    return out


def _runner(dataset: Dataset, videos, events: Events, *, on_start: Hook | None = None, on_finish: Hook | None = None,
            stats: Stats | None = None, **options) -> Runner:
    """Two fake stages, `fake_detect` (which runs the hooks) then `fake_track`, through the shared runner."""
    stats = stats or Stats()
    index = {str(p): i for i, (p, _) in enumerate(videos)}
    stages = [
        FakeGpuStage("fake_detect", events, stats, index, on_start=on_start, on_finish=on_finish),
        FakeGpuStage("fake_track", events, stats, index),
    ]
    pipeline = Pipeline(name=PIPELINE, stages=stages, config=load_config("tiny"), models={"fake": "fake/model"})
    return Runner(pipeline, dataset, stats=stats, **options)


def _items(videos) -> list[WorkItem]:
    return [WorkItem(source=str(p)) for p, _ in videos]


def _records(dataset: Dataset, items: list[WorkItem]) -> list[dict | None]:
    """The items rows without what differs between any two runs (when, which flush, which run)."""
    out = []
    for item in items:
        record = dataset.completion(PIPELINE, item.key)
        ignored = ("committed_at", "write_id", "run_id")  # what differs between any two runs
        out.append(None if record is None else {k: v for k, v in record.items() if k not in ignored})
    return out


def _table(dataset: Dataset, table: str, key: str) -> list[dict]:
    return sorted(dataset.read_table(table).to_pylist(), key=lambda row: row[key])


def test_prefetch_decodes_the_next_item_while_one_finishes(videos, tmp_path):
    """Item i's finish waits for item i+1's decode to start, and item i+1 starts only once item i is
    finishing: a runner that decodes nothing ahead fails here (after the fakes' timeout), never hangs."""
    events = Events()
    n = 4

    def after_the_previous_starts_finishing(i: int, ctx: VideoContext) -> None:
        if i > 0:
            assert events.wait_for("finish_start", i - 1)

    def until_the_next_decodes(i: int, ctx: VideoContext) -> None:
        if i + 1 < n:
            assert events.wait_for("decode_start", i + 1)

    runner = _runner(Dataset(str(tmp_path / "ds")), videos[:n], events, on_start=after_the_previous_starts_finishing,
                     on_finish=until_the_next_decodes, videos_in_flight=1, prefetch=1)
    outcomes = runner.run(_items(videos[:n]))
    assert [o.status for o in outcomes] == ["done"] * n, [o.detail for o in outcomes]
    for i in range(n - 1):
        # item i+1's decode started while item i was finishing: CPU decoding overlapped the model work
        assert events.at("finish_start", i) < events.at("decode_start", i + 1) < events.at("finish_end", i)
    assert events.most_finishing == 1  # one in flight: finishes never overlap
    assert events.items("finish.fake_detect") == list(range(n))  # slots are taken in turn


def test_three_in_flight_overlap_their_finishes(videos, tmp_path):
    events = Events()
    barrier = threading.Barrier(3, timeout=WAIT_S)  # each finish waits until three are finishing at once

    runner = _runner(Dataset(str(tmp_path / "ds")), videos, events, on_finish=lambda i, ctx: barrier.wait(),
                     videos_in_flight=3, prefetch=1)
    outcomes = runner.run(_items(videos))
    assert [o.status for o in outcomes] == ["done"] * 6, [o.detail for o in outcomes]
    assert events.most_finishing == 3  # three finishes overlapped, never more
    assert len({t for w, _, t in events.log if w == "finish_start"}) >= 3  # on as many threads


def test_concurrent_run_writes_what_a_sequential_run_writes(videos, tmp_path):
    items = _items(videos)
    runs = {}
    for label, in_flight, prefetch in (("sequential", 1, 0), ("concurrent", 3, 2)):
        events, heard, progress = Events(), [], []
        calling = {"now": 0, "most": 0}

        def listener(name: str, n: int, calling=calling, heard=heard) -> None:
            calling["now"] += 1
            calling["most"] = max(calling["most"], calling["now"])
            heard.append((name, n))
            time.sleep(0)  # let another thread in, were calls not serialized
            calling["now"] -= 1

        stats = Stats(listener=listener)
        dataset = Dataset(str(tmp_path / label))
        runner = _runner(dataset, videos, events, stats=stats, videos_in_flight=in_flight, prefetch=prefetch,
                         progress=lambda source, n, expected, progress=progress: progress.append((source, n, expected)))
        outcomes = runner.run(items)
        assert [o.status for o in outcomes] == ["done"] * len(items)
        assert [o.item for o in outcomes] == items  # the order of the input
        runs[label] = dict(dataset=dataset, outcomes=outcomes, stats=stats, events=events, heard=heard,
                           progress=progress, listener_overlap=calling["most"], stages=runner.pipeline.stages)

    seq, con = runs["sequential"], runs["concurrent"]
    assert con["events"].most_finishing > 1  # the concurrent run did overlap
    main = threading.get_ident()
    assert {t for *_, t in seq["events"].log} == {main}  # one at a time: all in the calling thread, as before
    # the same outputs, item by item, and the same rows and commit records on disk
    for a, b in zip(seq["outcomes"], con["outcomes"]):
        assert (a.status, a.video_id, a.outputs) == (b.status, b.video_id, b.outputs)
    for table, key in (("videos", "video_id"), ("clips", "clip_id"), ("rejections", "rejection_id")):
        assert _table(seq["dataset"], table, key) == _table(con["dataset"], table, key), table
    assert len(_table(con["dataset"], "clips", "clip_id")) == 2 * len(items)
    records = _records(con["dataset"], items)
    assert records == _records(seq["dataset"], items)
    # each record's counters are that item's own, though other items counted on the same Stats meanwhile
    for record, (_, frames) in zip(records, videos):
        assert record["status"] == "done"
        assert record["counters"] == {
            "frames_decoded": frames,
            "fake_gpu_calls": 2,
            "fake_frames_seen": 2 * frames,
            "rejected_fake_checksum": 2,
        }
    # the run's totals are the sum of the items'
    total = sum(frames for _, frames in videos)
    for run in (seq, con):
        counters = run["stats"].counters
        assert counters["frames_decoded"] == total and counters["fake_frames_seen"] == 2 * total
        assert counters["fake_gpu_calls"] == 2 * len(items) and counters["items_done"] == len(items)
    assert sorted(seq["heard"]) == sorted(con["heard"])  # the listener heard every count, one call at a time
    assert con["listener_overlap"] == 1
    # progress callbacks: every frame of every item, each item's count rising
    for run in (seq, con):
        by_source: dict[str, list[int]] = {}
        for source, n, _ in run["progress"]:
            by_source.setdefault(source, []).append(n)
        assert {s: ns for s, ns in by_source.items()} == {str(p): list(range(1, f + 1)) for p, f in videos}
    # prepare(items) ran first, once per stage, over every item of the batch
    for run in (seq, con):
        log = run["events"].log
        assert [w for w, *_ in log[:2]] == ["prepare.fake_detect", "prepare.fake_track"]
        assert all(stage.prepared == [[i.source for i in items]] for stage in run["stages"])


def test_a_rerun_after_a_concurrent_run_skips_every_item(videos, tmp_path):
    dataset = Dataset(str(tmp_path / "ds"))
    assert {o.status for o in _runner(dataset, videos, Events(), videos_in_flight=2).run(_items(videos))} == {"done"}
    events = Events()
    outcomes = _runner(dataset, videos, events, videos_in_flight=2).run(_items(videos))
    assert {o.status for o in outcomes} == {"skipped"} and not events.items("finish_start")


def test_a_transient_fault_stops_the_batch_and_commits_only_finished_items(videos, tmp_path, monkeypatch):
    """Item 2 fails with a transient fault while a later item is finishing and others wait: the fault
    propagates; items 0 and 1 (finished before) are committed, nothing of items 2-5."""
    import engine.runner as runner_module

    events = Events()
    cancelled = threading.Event()
    original_cancel = runner_module._Batch.cancel

    def cancel(self, error):
        original_cancel(self, error)
        cancelled.set()

    monkeypatch.setattr(runner_module._Batch, "cancel", cancel)

    def start(i: int, ctx: VideoContext) -> None:
        if i > 2:  # later items begin once item 2 is finishing (so they cannot take its slot)
            assert events.wait_for("finish_start", 2)

    def detect(i: int, ctx: VideoContext) -> None:
        if i == 2:
            # A later item holds the other slot, so items 0 and 1 have finished every stage.
            assert events.wait_for("finish_start", lambda k: k > 2)
            raise FakeTransientFault("model server went away")
        if i > 2:
            assert cancelled.wait(WAIT_S)  # goes on only once the batch is cancelled

    dataset = Dataset(str(tmp_path / "ds"))
    items = _items(videos)
    runner = _runner(dataset, videos, events, on_start=start, on_finish=detect, videos_in_flight=2, prefetch=1,
                     transient=(FakeTransientFault,))
    with pytest.raises(FakeTransientFault, match="went away"):
        runner.run(items)
    records = _records(dataset, items)
    assert [r and r["status"] for r in records] == ["done", "done", None, None, None, None]
    committed = {records[0]["video_id"], records[1]["video_id"]}
    for table, key in (("videos", "video_id"), ("clips", "clip_id"), ("rejections", "rejection_id")):
        assert {r["video_id"] for r in _table(dataset, table, key)} == committed, table
    # the later item that was finishing stopped before its second stage; the others never finished anything
    (later,) = [i for i in events.items("finish.fake_detect") if i > 2]
    assert sorted(events.items("finish.fake_track")) == [0, 1]  # not `later`
    assert runner.stats.counters["items_done"] == 2
    # the retry of the batch skips what was committed and does the rest
    retry = _runner(dataset, videos, Events(), videos_in_flight=2, prefetch=1).run(items)
    assert [o.status for o in retry] == ["skipped", "skipped", "done", "done", "done", "done"]


def test_an_ordinary_fault_rejects_its_item_and_the_others_finish(videos, tmp_path):
    def detect(i: int, ctx: VideoContext) -> None:
        if i == 1:
            raise ValueError("bad tensor shape")

    dataset = Dataset(str(tmp_path / "ds"))
    items = _items(videos)
    outcomes = _runner(dataset, videos, Events(), on_finish=detect, videos_in_flight=3, prefetch=1).run(items)
    assert [o.status for o in outcomes] == ["done", "rejected", "done", "done", "done", "done"]
    assert "ValueError: bad tensor shape" in outcomes[1].detail
    records = _records(dataset, items)
    assert records[1]["status"] == "rejected" and all(r["status"] == "done" for i, r in enumerate(records) if i != 1)
    (rejection,) = [r for r in dataset.read_table("rejections").to_pylist() if r["reason"] == "internal_error"]
    assert rejection["source"] == items[1].source
    assert len(dataset.read_table("videos")) == 5


def test_items_rejected_before_their_finish_do_not_hold_up_the_others(videos, tmp_path):
    """Finish slots go in input order; an item that never asks for one (unreadable, already complete) gives
    up its turn."""
    dataset = Dataset(str(tmp_path / "ds"))
    _runner(dataset, videos[3:4], Events(), videos_in_flight=1, prefetch=0).run(_items(videos[3:4]))
    not_a_video = tmp_path / "notes.txt"
    not_a_video.write_text("not a video")
    items = _items(videos[:3]) + [WorkItem(source=str(not_a_video)), WorkItem(source=str(tmp_path / "missing.mp4"))]
    items += _items(videos[3:])
    events = Events()
    outcomes = _runner(dataset, videos, events, videos_in_flight=1, prefetch=2).run(items)
    assert [o.status for o in outcomes] == ["done"] * 3 + ["rejected"] * 2 + ["skipped", "done", "done"]
    assert events.items("finish.fake_detect") == [0, 1, 2, 4, 5]  # in input order


def test_runner_settings_validate(tmp_path):
    from flows import pipelines

    assert RunnerConfig().resolved("cpu") == (1, 1)
    assert RunnerConfig().resolved("cuda:0") == (2, 1)
    assert RunnerConfig(videos_in_flight=4, prefetch=0).resolved("cpu") == (4, 0)
    for bad, message in (
        ({"videos_in_flight": 0}, "videos_in_flight must be a whole number >= 1"),
        ({"videos_in_flight": -2}, "videos_in_flight must be a whole number >= 1"),
        ({"videos_in_flight": "many"}, "videos_in_flight"),
        ({"prefetch": -1}, "prefetch must be a whole number >= 0"),
        ({"threads": 2}, "unknown setting pipeline.runner.threads"),
    ):
        config = tmp_path / "config.yaml"
        config.write_text("pipeline:\n  runner: " + repr(bad).replace("'", '"') + "\n")
        with pytest.raises(ConfigError, match=message):
            pipelines.load("tiny", str(config))
    config.write_text("pipeline:\n  runner: {videos_in_flight: 3, prefetch: 0}\n")
    loaded = pipelines.load("tiny", str(config))
    assert loaded.section("runner") == {"videos_in_flight": 3, "prefetch": 0}
    assert loaded.hash == pipelines.load("tiny").hash  # how many run at once changes no output
    pipeline = Pipeline(name=PIPELINE, stages=[], config=loaded, models={})
    assert Runner(pipeline, Dataset(str(tmp_path / "ds"))).settings == RunnerConfig(3, 0)
    with pytest.raises(ConfigError, match="pipeline.runner: .*videos_in_flight must be a whole number >= 1"):
        Runner(pipeline, Dataset(str(tmp_path / "ds")), videos_in_flight=0)
    # what the loader accepts, the runner reads the same way
    config.write_text("pipeline:\n  runner: {videos_in_flight: '2'}\n")
    pipeline = Pipeline(name=PIPELINE, stages=[], config=pipelines.load("tiny", str(config)), models={})
    assert Runner(pipeline, Dataset(str(tmp_path / "ds"))).settings == RunnerConfig(2, 1)


def test_auto_device_without_torch_loaded_is_the_cpu(monkeypatch):
    import sys

    config = load_config("tiny")
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert run_device(config) == "cpu"
    cpu = config.model_copy(update={"pipeline": {**config.pipeline, "device": "cpu"}})
    assert run_device(cpu) == "cpu"
    assert "torch" not in sys.modules


def test_stats_count_from_many_threads_and_record_each_threads_own():
    stats, records = Stats(), {}

    def work(k: int) -> None:
        with stats.recording() as own:
            for _ in range(2000):
                stats.count("calls")
                stats.count(f"thread_{k}")
            with stats.timer("work"):
                pass
            other = Stats()
            other.count("merged", k)
            stats.merge(other)
        records[k] = own

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.counters["calls"] == 8 * 2000 and stats.counters["merged"] == sum(range(8))
    for k, own in records.items():
        assert own.counters == {"calls": 2000, f"thread_{k}": 2000, **({"merged": k} if k else {"merged": 0})}
        assert set(own.seconds) == {"work"}
    stats.count("outside")  # no recording active: the run's Stats only
    assert all("outside" not in own.counters for own in records.values())


def test_writer_takes_items_from_many_threads(tmp_path):
    """Items added from eight threads with flushes in between: every item's rows are committed whole, with
    its own item id, and several flushes happened."""
    from engine.writer import TableWriter
    from schemas import ItemRecord, Provenance

    dataset = Dataset(str(tmp_path / "ds"))
    provenance = Provenance(engine_version="test", profile="test", models={}, config_hash="c")
    writer = TableWriter(dataset, "run", flush_mb=0.01, combine_every=4)  # a few items per flush

    def add(k: int) -> None:
        for j in range(10):
            key = f"item-{k}-{j}"
            clips = [
                ClipRecord(clip_id=f"{key}-{c}", video_id=key, clip_index=c, start_frame=c, end_frame=c + 1,
                           start_time=0.0, end_time=1.0, method="single", provenance=provenance)
                for c in range(1 + (k + j) % 4)
            ]
            record = ItemRecord(item_id=key, pipeline=PIPELINE, item_key=key, variant="v", source=key, status="done",
                                run_hash="h", write_id="", run_id="", engine_version="", committed_at="")
            writer.add(record, {"clips": clips})

    threads = [threading.Thread(target=add, args=(k,)) for k in range(8)]
    with writer:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    items = dataset.items()
    assert items.num_rows == 80 and writer.commits > 1  # it did flush several times
    rows = dataset.read_table("clips", ["video_id", "clip_id", "pipeline"]).to_pylist()
    assert len(rows) == sum(1 + (k + j) % 4 for k in range(8) for j in range(10))
    by_item = {}
    for row in dataset.delta("clips").to_pyarrow_table(columns=["video_id", "item_id"]).to_pylist():
        assert row["video_id"] == row["item_id"]  # each row carries its own item's id
        by_item[row["item_id"]] = by_item.get(row["item_id"], 0) + 1
    for key, n in by_item.items():
        assert n == 1 + sum(int(x) for x in key.split("-")[1:]) % 4
    assert dict(zip(items["item_id"].to_pylist(), items["rows"].to_pylist()))["item-0-0"] == [("clips", 1)]


def test_videos_records_are_whole(videos, tmp_path):
    """Every committed item has its `videos` row (an item's rows never spread over commits), with flushes
    between items added from several threads."""
    from engine.writer import TableWriter

    dataset = Dataset(str(tmp_path / "ds"))
    with TableWriter(dataset, "run", flush_mb=0.001, combine_every=1) as writer:
        _runner(dataset, videos, Events(), videos_in_flight=3, prefetch=2, writer=writer).run(_items(videos))
    assert writer.commits > 1
    rows = {r.video_id: r for r in dataset.read_records("videos")}
    assert all(isinstance(r, VideoRecord) for r in rows.values())
    assert sorted(r.num_frames for r in rows.values()) == sorted(f for _, f in videos)


def test_on_cuda_each_thread_queues_its_items_on_its_own_stream(videos, tmp_path, monkeypatch):
    """With the models on a CUDA device, every item's work runs inside its thread's own CUDA stream (checked
    with a fake torch module: the wiring, not the GPU)."""
    import sys
    import types
    from contextlib import contextmanager

    current = threading.local()
    made: list["FakeStream"] = []

    class FakeStream:
        def __init__(self, device=None) -> None:
            self.device, self.waited_for = device, None
            made.append(self)

        def wait_stream(self, other) -> None:
            self.waited_for = other

    @contextmanager
    def stream(s):
        before, current.stream = getattr(current, "stream", None), s
        try:
            yield
        finally:
            current.stream = before

    fake_torch = types.ModuleType("torch")
    fake_torch.device = lambda name: name
    fake_torch.cuda = types.SimpleNamespace(Stream=FakeStream, current_stream=lambda device: "default", stream=stream)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)

    seen: dict[int, tuple[int, object]] = {}

    def note_stream(i: int, ctx: VideoContext) -> None:
        seen[i] = (threading.get_ident(), getattr(current, "stream", None))

    events = Events()
    runner = _runner(Dataset(str(tmp_path / "ds")), videos, events, on_finish=note_stream)
    config = runner.pipeline.config
    runner.pipeline.config = config.model_copy(update={"pipeline": {**config.pipeline, "device": "cuda:0"}})
    assert runner.settings.resolved("cuda:0") == (2, 1)  # auto: two in flight on a GPU
    outcomes = runner.run(_items(videos))
    assert [o.status for o in outcomes] == ["done"] * len(videos)
    assert all(s is not None for _, s in seen.values())  # every finish ran on a side stream
    by_thread: dict[int, set[int]] = {}
    for thread, s in seen.values():
        by_thread.setdefault(thread, set()).add(id(s))
    assert all(len(streams) == 1 for streams in by_thread.values())  # one stream per thread...
    assert len({id(s) for _, s in seen.values()}) == len(by_thread) == len(made) <= 3  # ...none shared
    assert all(s.device == "cuda:0" and s.waited_for == "default" for s in made)
