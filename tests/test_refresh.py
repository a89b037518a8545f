"""Run identity, reruns with other options, and the nightly refresh: through the real flows (Prefect's test
harness), real Delta tables and tiny random models on short synthetic videos."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from engine.config import load_config
from engine.decode import DecodeResult
from engine.ids import stable_id
from engine.planning import Planner
from engine.runner import FunctionPass, Outputs, Pipeline, Runner, VideoContext
from engine.storage import ITEMS, Dataset
from engine.writer import TableWriter
from schemas import ClipRecord, ItemRecord, WorkItem
from tests import synthetic


def test_a_prompt_of_one_pipeline_changes_only_that_pipelines_run_hash(monkeypatch):
    import prompts
    from flows.pipelines import run_identity

    config = load_config("tiny")
    before = {name: run_identity(name, config, opts) for name, opts in (
        ("clip-and-track", {"entities": ["dog"]}), ("videorefer", {"data_types": ["short_caption"]}),
        ("strefer", {"entities": ["dog"]}),
    )}
    real = prompts.template_hash
    monkeypatch.setattr(prompts, "template_hash", lambda name: "edited" if name == "refiner_qa" else real(name))
    after = {name: run_identity(name, config, opts) for name, opts in (
        ("clip-and-track", {"entities": ["dog"]}), ("videorefer", {"data_types": ["short_caption"]}),
        ("strefer", {"entities": ["dog"]}),
    )}
    assert after["clip-and-track"] == before["clip-and-track"] and after["strefer"] == before["strefer"]
    assert after["videorefer"][0] != before["videorefer"][0]  # the Refiner's prompt: VideoRefer items are redone
    assert after["videorefer"][1] == before["videorefer"][1]  # ...as the same items (same variant), superseded
    # another data type is another variant (kept beside), and a setting of another pipeline changes nothing here
    other = run_identity("videorefer", config, {"data_types": ["detailed_caption", "short_caption"]})
    assert other[1] != after["videorefer"][1]
    tweaked = config.model_copy(update={"pipeline": {**config.pipeline, "refiner": {"max_answer_words": 5}}})
    assert run_identity("clip-and-track", tweaked, {"entities": ["dog"]}) == after["clip-and-track"]


class OneClip:
    """Fake stage: one clip row per video, whose id depends on the run options (as real ids do)."""

    name = "one-clip"

    def start(self, ctx: VideoContext) -> FunctionPass:
        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            n = decoded.frames_decoded
            return Outputs(clips=[ClipRecord(
                clip_id=stable_id(ctx.video_id, ctx.provenance.config_hash), video_id=ctx.video_id, clip_index=0,
                start_frame=0, end_frame=n, start_time=0.0, end_time=n / ctx.info.fps, method="single",
                provenance=ctx.provenance,
            )])

        return FunctionPass(finish)


def _run(dataset: Dataset, items: list[WorkItem], *, options: dict, force: bool = False):
    pipeline = Pipeline(name="fake-options", stages=[OneClip()], config=load_config("tiny"), models={}, options=options)
    runner = Runner(pipeline, dataset, force=force, videos_in_flight=1, prefetch=0)
    return runner, runner.run(items)


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory) -> list[WorkItem]:
    folder = tmp_path_factory.mktemp("two")
    return [WorkItem(source=str(synthetic.short_video(folder / f"{i}.mp4", seconds=0.5 + 0.2 * i).path)) for i in range(2)]


def test_a_rerun_with_other_options_adds_beside_and_force_replaces(tmp_path, two_videos):
    dataset = Dataset(str(tmp_path / "ds"))
    _run(dataset, two_videos, options={"data_types": ["a", "b", "c"]})
    runner, outcomes = _run(dataset, two_videos, options={"data_types": ["a"]})
    assert [o.status for o in outcomes] == ["done", "done"]
    made = {c.clip_id for o in outcomes for c in o.outputs.clips}
    assert runner.stats.counters["items_beside_other_options"] == 2  # said, and nothing lost:
    assert dataset.read_table("clips").num_rows == 4
    runner, _ = _run(dataset, two_videos, options={"data_types": ["a"]}, force=True)
    assert runner.stats.counters["items_replaced"] == 2  # --force: the other options' outputs give way
    assert set(dataset.read_table("clips")["clip_id"].to_pylist()) == made
    statuses = sorted(dataset.items(columns=["status"])["status"].to_pylist())
    assert statuses == ["done", "done", "replaced", "replaced"]  # history: the replaced ones are still named


def test_planning_retries_transient_rejections_only(tmp_path):
    dataset = Dataset(str(tmp_path / "ds"))
    items = [WorkItem(source=str(tmp_path / f"{name}.mp4")) for name in ("flaky", "broken", "fine")]
    for item in items:
        Path(item.source).write_bytes(b"x")
    planner_args = dict(pipeline="p", variant="v", run_hash="h")
    from engine.planning import fingerprint, item_id

    with TableWriter(dataset, "run") as writer:
        for item, status, reason in zip(items, ("rejected", "rejected", "done"), ("internal_error", "unreadable_video", None)):
            writer.add(ItemRecord(
                item_id=item_id("p", item, "v"), pipeline="p", item_key=item.key, variant="v", source=item.source,
                status=status, reason=reason, fingerprint=fingerprint(item.source), run_hash="h", write_id="", run_id="",
                engine_version="", committed_at="",
            ))
    plan = Planner(dataset, **planner_args).split(items)
    assert [i.source for i in plan.todo] == [items[0].source] and plan.skipped == 2
    assert len(Planner(dataset, **{**planner_args, "run_hash": "other"}).split(items).todo) == 3


@pytest.mark.integration
def test_nightly_refresh_processes_only_what_changed(tmp_path, monkeypatch):
    """Build (one input is a broken file: rejected), refresh with no change (nothing written, the rejected
    input not retried), then change one video, add one, remove one and touch one: the refresh redoes two,
    marks one removed, publishes a version; the first version still reads."""
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    from flows.audit import audit
    from flows.prefect_flows import clip_and_track_flow, refresh_dataset_flow

    folder = tmp_path / "videos"
    folder.mkdir()
    paths = {name: folder / f"{name}.mp4" for name in ("a", "b", "c", "d")}
    for k, name in enumerate("abc"):
        synthetic.short_video(paths[name], seconds=1.0 + 0.25 * k, fps=4)
    broken = folder / "x.mp4"
    broken.write_bytes(b"not a video at all")
    out = str(tmp_path / "ds")
    dataset = Dataset(out)
    with prefect_test_harness():
        first = clip_and_track_flow(videos=[str(paths[n]) for n in "abc"] + [str(broken)], entities=["dog"], out=out,
                                    profile="tiny")
        assert first["version"] == 1 and first["items"] == {"done": 3, "rejected": 1}
        items_version = dataset.delta(ITEMS).version()
        same = refresh_dataset_flow(out=out)  # the recorded sources, nothing changed
        assert same["version"] is None and same["items"] == {"skipped": 4}
        assert dataset.delta(ITEMS).version() == items_version and len(dataset.versions()) == 1  # nothing written

        synthetic.short_video(paths["b"], seconds=2.0, fps=4)  # changed content
        synthetic.short_video(paths["d"], seconds=1.75, fps=4)  # new
        stat = os.stat(paths["a"])
        os.utime(paths["a"], (stat.st_atime, stat.st_mtime + 60))  # touched, same content
        sources = [str(paths[n]) for n in "abd"] + [str(broken)]  # c is gone from the source
        second = refresh_dataset_flow(out=out, source=sources)
    assert second["version"] == 2 and second["items"] == {"done": 2, "skipped": 2, "removed": 1}
    assert second["stats"]["counters"]["items_touched"] == 1
    old, new = dataset.read_table("videos", version=1), dataset.read_table("videos", version=2)
    assert {Path(s).stem for s in old["source"].to_pylist()} == {"a", "b", "c"}
    assert {Path(s).stem for s in new["source"].to_pylist()} == {"a", "b", "d"}
    assert len(set(new["video_id"].to_pylist()) - set(old["video_id"].to_pylist())) == 2  # b's new content, d
    diff = dataset.diff(1, 2)
    assert (diff.added, diff.changed, diff.removed) == ({"clip-and-track": 1}, {"clip-and-track": 1}, {"clip-and-track": 1})
    report = audit(out, sources)
    assert report.missing == 0 and report.counts == {"done": 3, "rejected": 1}
    shutil.copy(paths["a"], folder / "e.mp4")
    report = audit(out, [*sources, str(folder / "e.mp4")])
    assert report.missing == 1 and report.examples == [("clip-and-track", str(folder / "e.mp4"))]


def test_a_batch_out_of_gpu_memory_is_retried_in_halves():
    import torch

    from engine.stats import Stats
    from flows.prefect_flows import halving_on_out_of_memory

    items = [WorkItem(source=f"{i}.mp4") for i in range(8)]
    calls: list[int] = []

    def run(todo: list[WorkItem]) -> list[str]:  # a fake GPU that holds at most two items at once
        calls.append(len(todo))
        if len(todo) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [i.source for i in todo]

    stats = Stats()
    assert halving_on_out_of_memory(run, items, stats) == [i.source for i in items]  # every item, in order
    assert calls == [8, 4, 2, 2, 4, 2, 2] and stats.counters["batches_halved_out_of_memory"] == 3

    def always(todo: list[WorkItem]) -> list[str]:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # one item still too big: the task's retries take it
        halving_on_out_of_memory(always, items[:2], Stats())
    with pytest.raises(ValueError):  # any other fault is not halved
        halving_on_out_of_memory(lambda todo: (_ for _ in ()).throw(ValueError("bad")), items, Stats())


def test_fingerprints_of_one_input_and_of_many_agree_and_list_each_folder_once(tmp_path):
    from engine.planning import Fingerprints, fingerprint

    folders = [tmp_path / f"f{k}" for k in range(6)]
    for folder in folders:
        folder.mkdir()
        for n in range(3):
            (folder / f"{n}.mp4").write_bytes(b"x" * (n + 1))
    frames = tmp_path / "f0" / "frames"
    frames.mkdir()
    (frames / "0.jpg").write_bytes(b"jpg")
    # a manifest naming files of six folders in turn: more folders than the listing cache holds
    sources = [str(folders[k] / f"{n}.mp4") for n in range(3) for k in range(6)] + [str(frames), str(tmp_path / "gone.mp4")]
    many = Fingerprints()
    got = many.of_many(sources)
    assert many.listings == 7  # six folders and the frame folder's parent once each (f0 holds both), the gone file's
    assert got[:-1] == [fingerprint(s) for s in sources[:-1]]  # the runner's single check (one info call) agrees
    assert got[-1] is None and fingerprint(sources[-1]) is None
    assert len(set(got[:-1])) >= 3 and all(g is not None for g in got[:-1])
