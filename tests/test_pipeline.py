"""The per-video pipeline over real synthetic video files, with fake backends: one decode, every table
written, reruns, bad input in a batch."""

from __future__ import annotations

import pytest

from engine import masks
from engine.config import load_config
from engine.decode import DecodeLimits
from engine.probe import probe_video
from engine.runner import Runner
from engine.stats import Stats
from engine.storage import Dataset
from flows import clip_and_track
from schemas import EntityRef, MaskletRecord, WorkItem, from_table
from tests import synthetic
from tests.fakes import FakeColorDetector, FakeColorGrounder, FakeColorTracker, FakeEmbedder

RED, BLUE, YELLOW, GREEN = (230, 30, 30), (30, 60, 230), (240, 220, 30), (40, 200, 60)
ENTITIES = [
    EntityRef(expression="red person", noun="person"),
    EntityRef(expression="blue person", noun="person"),
    EntityRef(expression="ball", noun="ball"),
    EntityRef(expression="dog", noun="dog"),
]


def _backends() -> dict:
    return {
        "detector": FakeColorDetector({"person": [RED, BLUE], "ball": [YELLOW], "dog": [GREEN]}),
        "tracker": FakeColorTracker(image_size=96),
        "grounder": FakeColorGrounder({"red person": RED, "blue person": BLUE}),
        "embedder": FakeEmbedder([(60, 60, 60), (200, 200, 200)]),
    }


def _runner(
    dataset: Dataset, entities=ENTITIES, *, track_fps: float = 0.0, backends=None, baseline: bool = False, **options
) -> Runner:
    """The clip-and-track pipeline on fake backends, through the shared runner."""
    config = load_config("tiny")
    pipeline = {**config.pipeline, "masklets": {**config.section("masklets"), "track_fps": track_fps}}
    config = config.model_copy(update={"pipeline": pipeline})
    stats = Stats()
    built = clip_and_track.build(
        config, backends or _backends(), stats=stats, dataset=dataset, entities=list(entities), baseline=baseline
    )
    return Runner(built, dataset, stats=stats, **options)


def _items(*paths) -> list[WorkItem]:
    return [WorkItem(source=str(p)) for p in paths]


@pytest.fixture(scope="module")
def entities_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "entities.mp4"
    return path, synthetic.entities_video(path)


def test_one_decode_feeds_clipper_and_masklets(entities_video, tmp_path):
    path, truth = entities_video
    dataset = Dataset(str(tmp_path / "ds"))
    runner = _runner(dataset)
    (outcome,) = runner.run(_items(path))
    assert outcome.status == "done", outcome.detail
    n = truth.num_frames
    assert runner.stats.counters["frames_decoded"] == n  # each frame decoded once for every stage
    assert [(c.start_frame, c.end_frame) for c in outcome.outputs.clips] == [(0, n)]
    masklets = {m.expression: m for m in from_table(MaskletRecord, dataset.read_table("masklets"))}
    assert set(masklets) == {e.expression for e in ENTITIES}
    (start,) = {m.start_frame for m in masklets.values()}
    assert all(truth.visible(name, start) for name in ("red person", "blue person", "ball", "dog"))
    for name, m in masklets.items():
        visible = [i for i in range(n) if truth.visible(name, i)]
        got = [f.frame_index for f in m.frames]
        assert set(got) <= set(range(n))
        assert len(set(got) & set(visible)) >= 0.95 * len(visible), name
        f = m.frames[len(m.frames) // 2]
        pred, gt = masks.decode(f.rle), truth.mask(name, f.frame_index)
        assert (pred & gt).sum() / (pred | gt).sum() > 0.7
    assert masklets["ball"].frames[0].frame_index >= 19  # enters at 20
    dog = {f.frame_index for f in masklets["dog"].frames}
    assert 24 in dog and 30 not in dog and 41 in dog  # leaves at 25, back at 40
    assert min(f.frame_index for f in masklets["red person"].frames) == 0 < start  # backward pass
    assert masklets["red person"].provenance.config_hash == runner.pipeline.run_hash
    record = dataset.completion("clip-and-track", WorkItem(source=str(path)).key)
    cost = record["counters"]
    assert cost["frames_decoded"] == n and cost["tracker_passes"] == 2 and cost["grounder_calls"] == 1
    videos = dataset.read_table("videos").to_pylist()
    assert videos[0]["num_frames"] == n and videos[0]["video_id"] == outcome.video_id == record["video_id"]


def test_baseline_shares_the_tracker_frames(entities_video, tmp_path):
    path, truth = entities_video
    dataset = Dataset(str(tmp_path / "ds"))
    runner = _runner(dataset, ENTITIES[2:], baseline=True)
    (outcome,) = runner.run(_items(path))
    methods = {m.method for m in outcome.outputs.masklets}
    assert methods == {"strefer", "grounded-sam2"}
    assert runner.stats.counters["frames_decoded"] == truth.num_frames  # one decode for both
    baseline = [m for m in outcome.outputs.masklets if m.method == "grounded-sam2"]
    assert all(m.start_frame == 0 for m in baseline)
    ball = [r for r in outcome.outputs.rejections if r.expression == "ball" and "grounded-sam2" in r.detail]
    assert ball and ball[0].reason == "no_detection"  # the ball enters late: the first frame misses it


def test_track_fps_bounds_tracked_frames(entities_video, tmp_path):
    path, truth = entities_video
    runner = _runner(Dataset(str(tmp_path / "ds")), ENTITIES[2:], track_fps=4.0)  # the video is 12 fps
    (outcome,) = runner.run(_items(path))
    (m, *_) = outcome.outputs.masklets
    assert m.num_frames_tracked == 20 and all(f.frame_index % 3 == 0 for f in m.frames)
    assert runner.stats.counters["frames_decoded"] == truth.num_frames
    # the overlay holds each mask over the tracking interval (12 / 4 = 3 frames) and no longer
    from engine.render import _Overlay

    info = probe_video(str(path), limits=DecodeLimits())
    overlay = _Overlay(str(tmp_path / "overlay.mp4"), info, [m, m.model_copy(update={"track_fps": 0.0})], [])
    assert overlay.holds == [3, 1]
    overlay.close()


def test_rerun_skips_complete_and_force_redoes(entities_video, tmp_path):
    import os

    path, _ = entities_video
    dataset = Dataset(str(tmp_path / "ds"))
    assert _runner(dataset, ENTITIES[:1]).run(_items(path))[0].status == "done"
    rerun = _runner(dataset, ENTITIES[:1])
    assert rerun.run(_items(path))[0].status == "skipped"
    assert "hash" not in rerun.stats.seconds  # the cheap check skipped it: no content hash
    os.utime(path)  # touched, not changed: the content hash decides, and it is the same
    assert _runner(dataset, ENTITIES[:1]).run(_items(path))[0].status == "skipped"
    assert _runner(dataset, ENTITIES[:1], force=True).run(_items(path))[0].status == "done"
    assert dataset.read_table("masklets").num_rows == 1


def test_bad_videos_in_a_batch_are_rejected_and_others_go_on(entities_video, tmp_path):
    path, _ = entities_video
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    audio = synthetic.audio_only_file(tmp_path / "audio.m4a")
    dataset = Dataset(str(tmp_path / "ds"))
    outcomes = _runner(dataset, ENTITIES[:1]).run(_items(tmp_path / "missing.mp4", text, audio, path))
    assert [o.status for o in outcomes] == ["rejected", "rejected", "rejected", "done"]
    rejections = dataset.read_table("rejections").to_pylist()
    assert {r["source"] for r in rejections} == {str(tmp_path / "missing.mp4"), str(text), str(audio)}
    assert all(r["stage"] == "input" and "\n" not in r["detail"] for r in rejections)


def test_a_later_success_supersedes_the_rejection(entities_video, tmp_path):
    path, _ = entities_video
    late = tmp_path / "late.mp4"
    dataset = Dataset(str(tmp_path / "ds"))
    assert _runner(dataset, ENTITIES[:1]).run(_items(late))[0].status == "rejected"  # not there yet
    late.write_bytes(path.read_bytes())
    assert _runner(dataset, ENTITIES[:1]).run(_items(late))[0].status == "done"
    assert dataset.read_table("rejections").num_rows == 0
    assert dataset.read_table("videos").num_rows == 1


def test_truncated_video_keeps_what_decoded(entities_video, tmp_path):
    path, truth = entities_video
    broken = synthetic.truncated_copy(path, tmp_path / "broken.mp4", fraction=0.6)  # moov first: it opens
    dataset = Dataset(str(tmp_path / "ds"))
    (outcome,) = _runner(dataset, ENTITIES[:1]).run(_items(broken))
    assert outcome.status == "done", outcome.detail
    assert any(r.reason == "truncated_stream" and r.stage == "decode" for r in outcome.outputs.rejections)
    (video,) = dataset.read_table("videos").to_pylist()
    assert 0 < video["num_frames"] < truth.num_frames


def test_model_fault_on_one_video_does_not_stop_the_batch(entities_video, tmp_path):
    path, _ = entities_video
    backends = _backends()
    real = backends["detector"]

    class ExplodingOnce:
        model_id = "fake/exploding"
        calls = 0

        def detect(self, images, phrases, **kw):
            ExplodingOnce.calls += 1
            if ExplodingOnce.calls == 1:
                raise RuntimeError("device-side assert\nwith a second line")
            return real.detect(images, phrases, **kw)

    other = tmp_path / "copy.mp4"
    other.write_bytes(path.read_bytes() + b"\0")  # different content hash, same frames
    dataset = Dataset(str(tmp_path / "ds"))
    outcomes = _runner(dataset, ENTITIES[:1], backends={**backends, "detector": ExplodingOnce()}).run(_items(path, other))
    assert [o.status for o in outcomes] == ["rejected", "done"]
    assert outcomes[0].outputs.rejections[0].reason == "internal_error"
    assert outcomes[0].detail == "RuntimeError: device-side assert"

    class ServerDown:
        model_id = "fake/server-down"

        def detect(self, images, phrases, **kw):
            raise ConnectionError("model server refused the connection")

    runner = _runner(dataset, ENTITIES[:1], backends={**backends, "detector": ServerDown()}, force=True, transient=(ConnectionError,))
    with pytest.raises(ConnectionError):  # transient faults propagate for the orchestrator's retry
        runner.run(_items(path))


def test_other_entities_or_options_redo_a_complete_video(entities_video, tmp_path):
    path, _ = entities_video
    dataset = Dataset(str(tmp_path / "ds"))
    assert _runner(dataset, ENTITIES[:1]).run(_items(path))[0].status == "done"
    assert _runner(dataset, ENTITIES[:2]).run(_items(path))[0].status == "done"  # new entities: not skipped
    assert _runner(dataset, ENTITIES[:2], baseline=True).run(_items(path))[0].status == "done"
    assert _runner(dataset, ENTITIES[:2], baseline=True).run(_items(path))[0].status == "skipped"


def test_a_failing_batch_step_rejects_each_item_and_keeps_the_batch(entities_video, tmp_path):
    path, _ = entities_video
    dataset = Dataset(str(tmp_path / "ds"))
    runner = _runner(dataset, ENTITIES[:1])

    class BrokenPrepare:
        name = "broken"

        def prepare(self, items):
            raise RuntimeError("batched call failed")

        def start(self, ctx):
            return None

    runner.pipeline.stages.insert(0, BrokenPrepare())
    (outcome,) = runner.run(_items(path))
    assert outcome.status == "rejected" and "broken failed for the batch" in outcome.detail
    assert dataset.completion("clip-and-track", WorkItem(source=str(path)).key)["status"] == "rejected"
