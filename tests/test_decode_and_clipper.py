"""Probe, the one decode pass, and the Video Clipper (Strefer Algorithm 2) on synthetic and real videos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agents.video_clipper import ClipperConfig, VideoClipper, hac_boundaries, merge_short_runs
from engine.decode import DecodeLimits, decode_video
from engine.errors import VideoError
from engine.probe import VideoInfo, probe_video
from engine.stats import Stats
from schemas import ClipRecord, Provenance
from tests import synthetic
from tests.fakes import FakeEmbedder, Recorder

REAL_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
PROV = Provenance(engine_version="test", profile="tiny", models={"embedder": "fake/embedder"}, config_hash="cfg")
LIMITS = DecodeLimits()


def real_video(preferred: str = "03_blocks.mp4") -> Path:
    if not REAL_VIDEOS.is_dir() or not any(REAL_VIDEOS.glob("*.mp4")):
        pytest.skip(f"real test videos not found in {REAL_VIDEOS} (the shared folder beside the checkout)")
    path = REAL_VIDEOS / preferred
    return path if path.exists() else sorted(REAL_VIDEOS.glob("*.mp4"))[0]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, synthetic.GroundTruth]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "cuts": synthetic.hard_cuts_video(root / "cuts.mp4"),
        "slow": synthetic.slow_change_video(root / "slow.mp4"),
        "short": synthetic.short_video(root / "short.mp4"),
    }


def clip_video(
    path: Path,
    *,
    embedder: FakeEmbedder | None = None,
    config: ClipperConfig = ClipperConfig(),
    stats: Stats | None = None,
) -> list[ClipRecord]:
    info = probe_video(str(path), limits=LIMITS)
    clipper = VideoClipper(embedder=embedder, config=config, stats=stats)
    run = clipper.start(video_id="vid", fps=info.fps, width=info.width, height=info.height, provenance=PROV)
    result = decode_video(info, run.consumers)
    return run.finish(frames_decoded=result.frames_decoded, end_time=result.end_time)


def assert_cover(clips: list[ClipRecord], num_frames: int) -> None:
    assert clips[0].start_frame == 0 and clips[-1].end_frame == num_frames
    for a, b in zip(clips, clips[1:]):
        assert a.end_frame == b.start_frame and a.end_time == pytest.approx(b.start_time)
    assert all(c.start_frame < c.end_frame and c.start_time < c.end_time for c in clips)
    assert [c.clip_index for c in clips] == list(range(len(clips)))
    assert len({c.clip_id for c in clips}) == len(clips)


# -- probe and decode ---------------------------------------------------------------------------------------


def test_probe_reads_the_synthetic_video(videos) -> None:
    truth = videos["cuts"]
    info = probe_video(str(truth.path), limits=LIMITS)
    assert (info.width, info.height, info.rotation) == (160, 120, 0)
    assert (info.decode_width, info.decode_height) == (160, 120)
    assert info.fps == pytest.approx(15.0) and info.num_frames == 80
    assert info.duration_s == pytest.approx(80 / 15, abs=0.1)
    assert info.codec in ("h264", "mpeg4")


def test_each_frame_is_decoded_once_and_consumers_get_only_what_they_want(videos) -> None:
    truth = videos["cuts"]
    info = probe_video(str(truth.path), limits=LIMITS)
    every, third, none = Recorder(), Recorder(every=3), Recorder(every=10**9)
    none.wants = lambda index, time: False  # type: ignore[method-assign]
    progress: list[int] = []
    result = decode_video(info, [every, third, none], progress=lambda n, t: progress.append(n))

    assert result.frames_decoded == 80 and result.error is None and result.limit_reached is None
    assert result.end_time == pytest.approx(80 / 15)
    assert [i for i, _, _ in every.got] == list(range(80)) == every.asked
    assert [i for i, _, _ in third.got] == list(range(0, 80, 3)) and third.asked == list(range(80))
    assert none.got == [] and progress == list(range(1, 81))
    # One conversion per frame: consumers of one frame share one array.
    shared = {i: f for i, _, f in third.got}
    assert all(f is shared[i] for i, _, f in every.got if i in shared)
    for index, time, frame in every.got:
        assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8
        assert time == pytest.approx(index / 15)
    # RGB channel order: the background's color, read away from the moving square.
    for index in (0, 30, 70):
        corner = every.got[index][2][:10, :10].reshape(-1, 3).mean(axis=0)
        assert np.abs(corner - truth.background(index)).max() < 8


def test_decode_scales_frames_down_to_max_side(tmp_path: Path) -> None:
    truth = synthetic.make_video(
        tmp_path / "wide.mp4", width=4000, height=2000, fps=5, num_frames=2,
        scenes=[synthetic.SceneSpec(0, (200, 40, 40))],
    )
    info = probe_video(str(truth.path), limits=LIMITS)
    assert (info.width, info.height) == (4000, 2000)
    assert (info.decode_width, info.decode_height) == (1920, 960)
    frames = Recorder()
    decode_video(info, [frames])
    assert [f.shape for _, _, f in frames.got] == [(960, 1920, 3)] * 2
    small = probe_video(str(truth.path), limits=DecodeLimits(max_side=101))
    assert (small.decode_width, small.decode_height) == (100, 50)  # long side <= max_side, both even


def test_rotation_metadata_is_applied(tmp_path: Path) -> None:
    marker = synthetic.ShapeSpec("marker", "box", (230, 30, 30), "rect", (16, 16), lambda i: (8, 8))
    truth = synthetic.make_video(
        tmp_path / "phone.mp4", width=96, height=64, fps=5, num_frames=3,
        scenes=[synthetic.SceneSpec(0, (40, 60, 200))], shapes=[marker],
    )
    synthetic.set_mp4_rotation(truth.path, 90)
    info = probe_video(str(truth.path), limits=LIMITS)
    assert (info.rotation, info.width, info.height) == (90, 64, 96)
    assert (info.decode_width, info.decode_height) == (64, 96)
    frames = Recorder()
    decode_video(info, [frames])
    frame = frames.got[0][2]
    assert frame.shape == (96, 64, 3)
    # Turned 90 degrees clockwise, the stored top-left corner is at the top right.
    assert frame[4, -4, 0] > 180 and frame[4, -4, 2] < 80
    assert frame[4, 4, 2] > 150


def test_real_video_decodes_every_frame_with_opencvs_colors() -> None:
    import cv2

    path = real_video()
    info = probe_video(str(path), limits=LIMITS)
    assert info.width >= 320 and info.fps > 1 and info.rotation == 0
    first = Recorder(every=10**9)
    result = decode_video(info, [first])
    assert result.frames_decoded == info.num_frames and result.error is None
    assert result.end_time == pytest.approx(info.duration_s, abs=0.1)
    # Same pixels as OpenCV (PySceneDetect's reader): BT.709 video converted with its own matrix.
    ok, bgr = cv2.VideoCapture(str(path)).read()
    assert ok and np.array_equal(first.got[0][2], bgr[..., ::-1])

    limited = decode_video(probe_video(str(path), limits=DecodeLimits(max_frames=30)), [])
    assert limited.frames_decoded == 30 and "max_frames=30" in (limited.limit_reached or "")


def test_fsspec_url_is_read_through_a_file_object(videos) -> None:
    import fsspec

    fsspec.filesystem("memory").pipe("/clips/cuts.mp4", videos["cuts"].path.read_bytes())
    info = probe_video("memory://clips/cuts.mp4", limits=LIMITS)
    assert decode_video(info, [Recorder(every=20)]).frames_decoded == 80
    with pytest.raises(VideoError, match="video not found: memory://clips/missing.mp4"):
        probe_video("memory://clips/missing.mp4", limits=LIMITS)


def _error(path: Path, limits: DecodeLimits = LIMITS) -> str:
    with pytest.raises(VideoError) as caught:
        probe_video(str(path), limits=limits)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_probe_errors_say_what_is_wrong(tmp_path: Path, videos) -> None:
    assert "video not found" in _error(tmp_path / "nope.mp4")
    assert "is not a file" in _error(tmp_path)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    assert "is not a video PyAV can read" in _error(text)
    assert "audio-only" in _error(synthetic.audio_only_file(tmp_path / "song.mp4"))
    assert "no frames" in _error(synthetic.frameless_video(tmp_path / "empty.mp4"))
    assert "above the limit of 2 s" in _error(videos["cuts"].path, DecodeLimits(max_duration_s=2.0))


def test_truncated_video_decodes_up_to_the_break(tmp_path: Path, videos) -> None:
    cut = synthetic.truncated_copy(videos["cuts"].path, tmp_path / "cut.mp4", fraction=0.6)
    info = probe_video(str(cut), limits=LIMITS)
    frames = Recorder()
    result = decode_video(info, [frames])
    assert 0 < result.frames_decoded < 80 and len(frames.got) == result.frames_decoded
    assert result.error is not None and "\n" not in result.error
    assert result.error.startswith(f"decoding stopped after {result.frames_decoded} frames")


def test_decode_stops_at_the_duration_limit_when_the_header_understates_it(videos) -> None:
    import dataclasses

    info = probe_video(str(videos["cuts"].path), limits=LIMITS)
    lying = dataclasses.replace(info, limits=DecodeLimits(max_duration_s=1.0))  # as if the probe had passed it
    result = decode_video(lying, [])
    assert result.frames_decoded == 16 and result.end_time == pytest.approx(16 / 15)
    assert result.limit_reached == "stopped at DecodeLimits.max_duration_s=1 s" and result.error is None


def test_decode_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_side must be at least 16"):
        DecodeLimits(max_side=8)
    with pytest.raises(ValueError, match="max_frames must be None or at least 1"):
        DecodeLimits(max_frames=0)
    with pytest.raises(ValueError, match="max_duration_s must be positive"):
        DecodeLimits(max_duration_s=0)


# -- Video Clipper ----------------------------------------------------------------------------------------


def test_content_cuts_on_hard_cuts(videos) -> None:
    truth = videos["cuts"]
    stats = Stats()
    clips = clip_video(truth.path, stats=stats)
    assert [c.method for c in clips] == ["content"] * 3
    starts = [c.start_frame for c in clips[1:]]
    assert len(starts) == len(truth.cuts) and all(abs(s - t) <= 2 for s, t in zip(starts, truth.cuts))
    assert_cover(clips, 80)
    assert clips[-1].end_time == pytest.approx(80 / 15)
    assert clips[1].start_time == pytest.approx(clips[1].start_frame / 15)
    assert stats.counters["frames_cut_detected"] == 80 and stats.counters["cuts_found"] == 2
    assert stats.seconds["clip.cut"] > 0
    assert clip_video(truth.path) == clips  # deterministic ids and records


def test_cuts_equal_scenedetect_detect_on_synthetic_and_real_videos(videos) -> None:
    """One decode pass feeds several cut detectors; each matches scenedetect.detect() on the same file."""
    import scenedetect

    for path, thresholds in ((videos["cuts"].path, (20.0,)), (real_video(), (20.0, 5.0, 8.0))):
        info = probe_video(str(path), limits=LIMITS)
        clipper_runs = {
            t: VideoClipper(embedder=None, config=ClipperConfig(threshold=t)).start(
                video_id="v", fps=info.fps, width=info.width, height=info.height, provenance=PROV
            )
            for t in thresholds
        }
        result = decode_video(info, [c for run in clipper_runs.values() for c in run.consumers])
        for t, run in clipper_runs.items():
            clips = run.finish(frames_decoded=result.frames_decoded, end_time=result.end_time)
            scenes = scenedetect.detect(str(path), scenedetect.ContentDetector(threshold=t))
            ours, theirs = [c.start_frame for c in clips[1:]], [start.frame_num for start, _ in scenes[1:]]
            assert ours == theirs, f"{path.name} at threshold {t}"


def test_hac_cuts_a_slow_change_that_content_detection_misses(videos) -> None:
    truth = videos["slow"]
    stats = Stats()
    embedder = FakeEmbedder(synthetic.SLOW_CHANGE_PALETTE)
    clips = clip_video(truth.path, embedder=embedder, stats=stats)
    assert stats.counters["cuts_found"] == 0
    assert [c.method for c in clips] == ["siglip-hac", "siglip-hac"]
    change = truth.changes[0]  # the fade runs over frames 61-66
    assert change <= clips[1].start_frame <= change + 6
    assert_cover(clips, truth.num_frames)
    assert stats.counters["frames_embedded"] == 36  # 12 s at 3 FPS
    assert stats.seconds["clip.embed"] > 0


def test_sample_cap_clusters_every_kth_sample_and_still_finds_the_change(videos) -> None:
    truth = videos["slow"]
    capped = ClipperConfig(max_hac_samples=12)  # 36 samples -> every 3rd
    clips = clip_video(truth.path, embedder=FakeEmbedder(synthetic.SLOW_CHANGE_PALETTE), config=capped)
    assert [c.method for c in clips] == ["siglip-hac", "siglip-hac"]
    assert truth.changes[0] <= clips[1].start_frame <= truth.changes[0] + 12  # one capped sample step later at most
    assert_cover(clips, truth.num_frames)


def test_without_embedder_or_with_hac_off_a_slow_change_is_one_clip(videos) -> None:
    path = videos["slow"].path
    assert [c.method for c in clip_video(path)] == ["single"]
    off = ClipperConfig(use_hac=False)
    embedder = FakeEmbedder(synthetic.SLOW_CHANGE_PALETTE)
    assert [c.method for c in clip_video(path, embedder=embedder, config=off)] == ["single"]


def test_video_shorter_than_3_s_is_one_clip(videos) -> None:
    stats = Stats()
    clips = clip_video(videos["short"].path, embedder=FakeEmbedder([(40, 180, 60), (230, 30, 200)]), stats=stats)
    assert [(c.start_frame, c.end_frame, c.method) for c in clips] == [(0, 20, "single")]
    assert clips[0].end_time == pytest.approx(2.0)
    assert stats.counters["frames_embedded"] == 0


def test_sampler_stops_embedding_once_a_content_cut_is_found(videos) -> None:
    stats = Stats()
    config = ClipperConfig(embed_batch=2)
    embedder = FakeEmbedder([(30, 60, 200), (230, 200, 40)])
    clips = clip_video(videos["cuts"].path, embedder=embedder, config=config, stats=stats)
    assert clips[0].method == "content"
    # 3 FPS samples up to the first cut (frame 25, 1.67 s, sampled before the detector sees it): 6, embedded
    # in pairs as they came; none after it (27 over the whole video).
    assert stats.counters["frames_embedded"] == 6


def _groups(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Unit vectors: one tight cluster per entry of `sizes`, consecutive, around orthogonal axes."""
    rng = np.random.default_rng(seed)
    rows = [np.eye(8)[k] + 0.02 * rng.standard_normal((n, 8)) for k, n in enumerate(sizes)]
    x = np.concatenate(rows)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hac_boundaries_on_fixed_arrays() -> None:
    kw = dict(std_factor=1.7, linkage="average", min_len_samples=3)
    assert hac_boundaries(_groups([27, 3]), **kw) == [27]
    assert hac_boundaries(_groups([3, 27]), **kw) == [3]
    # A two-sample fragment is shorter than min_len: merged into its neighbour.
    assert hac_boundaries(_groups([28, 2]), **kw) == []
    # A one-sample flash inside a scene leaves no boundary.
    flash = _groups([30, 1])[[*range(15), 30, *range(15, 30)]]
    assert hac_boundaries(flash, **kw) == []
    assert hac_boundaries(_groups([1]), **kw) == []


def test_auto_threshold_splits_only_segments_that_stand_out() -> None:
    """min(mean + 1.7 std, max) on average-linkage heights keeps two equal halves together (the threshold
    reaches the max distance); Ward's heights grow with cluster size, so it splits them."""
    halves = _groups([15, 15])
    assert hac_boundaries(halves, std_factor=1.7, linkage="average", min_len_samples=3) == []
    assert hac_boundaries(halves, std_factor=1.7, linkage="ward", min_len_samples=3) == [15]


def test_merge_short_runs() -> None:
    assert merge_short_runs([0] * 5 + [1] + [2] * 5, min_len=3) == [6]  # into the previous run
    assert merge_short_runs([1] + [0] * 6, min_len=3) == []  # the first run into the next
    assert merge_short_runs([0] * 4 + [1] * 2 + [0] * 4, min_len=3) == []  # then equal neighbours join
    assert merge_short_runs([0] * 4 + [1] * 4, min_len=3) == [4]
    assert merge_short_runs([0, 1], min_len=3) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0}, "threshold must be > 0"),
        ({"min_scene_len": 1.5}, "min_scene_len must be a whole number of frames"),
        ({"min_scene_len": -1}, "min_scene_len must be a whole number of frames"),
        ({"hac_fps": 0}, "hac_fps must be > 0"),
        ({"hac_std_factor": -1}, "hac_std_factor must be >= 0"),
        ({"min_video_s_for_hac": -1}, "min_video_s_for_hac must be >= 0"),
        ({"min_clip_s": -0.5}, "min_clip_s must be >= 0"),
        ({"linkage": "kmeans"}, "linkage must be one of single, complete, average"),
        ({"embed_batch": 0}, "embed_batch must be >= 1"),
    ],
)
def test_clipper_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClipperConfig(**kwargs)


def test_clipper_start_and_finish_validate_their_input() -> None:
    clipper = VideoClipper(embedder=None, config=ClipperConfig())
    with pytest.raises(ValueError, match="fps must be > 0"):
        clipper.start(video_id="v", fps=0, width=10, height=10, provenance=PROV)
    run = clipper.start(video_id="v", fps=10, width=10, height=10, provenance=PROV)
    with pytest.raises(ValueError, match="no frames were decoded"):
        run.finish(frames_decoded=0, end_time=0.0)


def test_video_info_is_frozen(videos) -> None:
    info = probe_video(str(videos["cuts"].path), limits=LIMITS)
    assert isinstance(info, VideoInfo)
    with pytest.raises(AttributeError):
        info.fps = 1.0  # type: ignore[misc]
