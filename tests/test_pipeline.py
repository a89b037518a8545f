"""The per-video pipeline over real synthetic video files, with fake backends: one decode, every table
written, reruns, bad input in a batch."""

from __future__ import annotations

import pytest

from engine import masks
from engine.config import load_config
from engine.storage import Dataset
from flows.clip_and_track import ClipAndTrack, run_batch
from schemas import EntityRef, MaskletRecord, from_table
from tests import synthetic
from tests.fakes import FakeColorDetector, FakeColorGrounder, FakeColorTracker, FakeEmbedder

RED, BLUE, YELLOW, GREEN = (230, 30, 30), (30, 60, 230), (240, 220, 30), (40, 200, 60)
ENTITIES = [
    EntityRef(expression="red person", noun="person"),
    EntityRef(expression="blue person", noun="person"),
    EntityRef(expression="ball", noun="ball"),
    EntityRef(expression="dog", noun="dog"),
]


def _pipeline(track_fps: float = 0.0) -> ClipAndTrack:
    config = load_config("tiny")
    pipeline = {**config.pipeline, "masklets": {**config.section("masklets"), "track_fps": track_fps}}
    config = config.model_copy(update={"pipeline": pipeline})
    backends = {
        "detector": FakeColorDetector({"person": [RED, BLUE], "ball": [YELLOW], "dog": [GREEN]}),
        "tracker": FakeColorTracker(image_size=96),
        "grounder": FakeColorGrounder({"red person": RED, "blue person": BLUE}),
        "embedder": FakeEmbedder([(60, 60, 60), (200, 200, 200)]),
    }
    return ClipAndTrack(config, backends=backends)


@pytest.fixture(scope="module")
def entities_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "entities.mp4"
    return path, synthetic.entities_video(path)


def test_one_decode_feeds_clipper_and_masklets(entities_video, tmp_path):
    path, truth = entities_video
    pipeline = _pipeline()
    dataset = Dataset(str(tmp_path / "ds"))
    outcome = pipeline.process(str(path), ENTITIES, dataset)
    assert outcome.status == "done", outcome.detail
    n = truth.num_frames
    assert pipeline.stats.counters["frames_decoded"] == n  # each frame decoded once for every stage
    assert [(c.start_frame, c.end_frame) for c in outcome.clips] == [(0, n)]
    masklets = {m.expression: m for m in from_table(MaskletRecord, dataset.read_table("masklets"))}
    assert set(masklets) == {e.expression for e in ENTITIES}
    start = outcome.start_frames["strefer"]
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
    assert masklets["red person"].provenance.config_hash == pipeline.config.hash
    cost = dataset.completion(outcome.video_id)["counters"]
    assert cost["frames_decoded"] == n and cost["tracker_passes"] == 2 and cost["grounder_calls"] == 1
    videos = dataset.read_table("videos").to_pylist()
    assert videos[0]["num_frames"] == n and videos[0]["video_id"] == outcome.video_id


def test_track_fps_bounds_tracked_frames(entities_video, tmp_path):
    path, truth = entities_video
    pipeline = _pipeline(track_fps=4.0)  # the video is 12 fps
    outcome = pipeline.process(str(path), ENTITIES[2:], Dataset(str(tmp_path / "ds")))
    (m, *_) = outcome.masklets
    assert m.num_frames_tracked == 20 and all(f.frame_index % 3 == 0 for f in m.frames)
    assert pipeline.stats.counters["frames_decoded"] == truth.num_frames


def test_rerun_skips_complete_and_force_redoes(entities_video, tmp_path):
    path, _ = entities_video
    dataset = Dataset(str(tmp_path / "ds"))
    pipeline = _pipeline()
    assert pipeline.process(str(path), ENTITIES[:1], dataset).status == "done"
    assert pipeline.process(str(path), ENTITIES[:1], dataset).status == "skipped"
    assert pipeline.process(str(path), ENTITIES[:1], dataset, force=True).status == "done"
    assert dataset.read_table("masklets").num_rows == 1


def test_bad_videos_in_a_batch_are_rejected_and_others_go_on(entities_video, tmp_path):
    path, _ = entities_video
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    audio = synthetic.audio_only_file(tmp_path / "audio.m4a")
    dataset = Dataset(str(tmp_path / "ds"))
    outcomes = run_batch(
        _pipeline(), [str(tmp_path / "missing.mp4"), str(text), str(audio), str(path)], ENTITIES[:1], dataset
    )
    assert [o.status for o in outcomes] == ["rejected", "rejected", "rejected", "done"]
    rejections = dataset.read_table("rejections").to_pylist()
    assert {r["source"] for r in rejections} == {str(tmp_path / "missing.mp4"), str(text), str(audio)}
    assert all(r["stage"] == "input" and "\n" not in r["detail"] for r in rejections)


def test_truncated_video_keeps_what_decoded(entities_video, tmp_path):
    path, _ = entities_video
    broken = synthetic.truncated_copy(path, tmp_path / "broken.mp4", fraction=0.6)
    dataset = Dataset(str(tmp_path / "ds"))
    outcome = _pipeline().process(str(broken), ENTITIES[:1], dataset)
    if outcome.status == "rejected":  # the damage hit the first frame: nothing to keep, and it says so
        assert outcome.rejections[0].stage in ("input", "decode")
        return
    assert outcome.status == "done"
    assert any(r.reason == "truncated_stream" for r in outcome.rejections)


def test_model_fault_on_one_video_does_not_stop_the_batch(entities_video, tmp_path):
    path, _ = entities_video
    pipeline = _pipeline()

    class ExplodingOnce:
        model_id = "fake/exploding"
        calls = 0

        def detect(self, images, phrases, **kw):
            ExplodingOnce.calls += 1
            if ExplodingOnce.calls == 1:
                raise RuntimeError("device-side assert\nwith a second line")
            return real.detect(images, phrases, **kw)

    real = pipeline.generator.detector
    pipeline.generator.detector = ExplodingOnce()
    other = tmp_path / "copy.mp4"
    other.write_bytes(path.read_bytes() + b"\0")  # different content hash, same frames
    dataset = Dataset(str(tmp_path / "ds"))
    outcomes = run_batch(pipeline, [str(path), str(other)], ENTITIES[:1], dataset)
    assert [o.status for o in outcomes] == ["rejected", "done"]
    assert outcomes[0].rejections[0].reason == "internal_error"
    assert outcomes[0].detail == "RuntimeError: device-side assert"

    class ServerDown:
        model_id = "fake/server-down"

        def detect(self, images, phrases, **kw):
            raise ConnectionError("model server refused the connection")

    pipeline.generator.detector = ServerDown()
    with pytest.raises(ConnectionError):  # transient faults propagate for the orchestrator's retry
        run_batch(pipeline, [str(path)], ENTITIES[:1], dataset, force=True, transient=(ConnectionError,))
