"""Frame folders as videos, the decode time window, and the source adapters (manifest, MeViS,
Ref-YouTube-VOS, open_source) on tiny layouts written in tmp_path with exact ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import masks
from engine.decode import DecodeLimits, decode_video
from engine.errors import BadInputError, VideoError
from engine.probe import list_frame_images, natural_key, probe_video
from engine.sources import describe_sources, open_source, read_manifest, read_mevis, read_ref_youtube_vos
from tests import synthetic
from tests.fakes import Recorder

REAL_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
LIMITS = DecodeLimits()
W, H = 32, 24
# One flat, well separated color per frame: JPEG keeps flat colors within a few levels.
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def flat(color: tuple[int, int, int], width: int = W, height: int = H) -> np.ndarray:
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = color
    return image


def write_frames(folder: Path, images: list[np.ndarray], names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:05d}.jpg" for i in range(len(images))]
    paths = [folder / name for name in names]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path, quality=95)
    return paths


def mean_color(frame: np.ndarray) -> np.ndarray:
    return frame.reshape(-1, 3).mean(axis=0)


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# -- frame folders ------------------------------------------------------------------------------------------


def test_frames_sort_by_number_value(tmp_path: Path) -> None:
    assert sorted(["10.jpg", "2.jpg", "1.jpg"], key=natural_key) == ["1.jpg", "2.jpg", "10.jpg"]
    assert sorted(["00010.jpg", "00005.jpg"], key=natural_key) == ["00005.jpg", "00010.jpg"]
    assert sorted(["f10_b.png", "f9_b.png", "f9_a.png"], key=natural_key) == ["f9_a.png", "f9_b.png", "f10_b.png"]
    for name in ["10.jpg", "2.JPG", "3.jpeg", "1.png", "notes.txt", "._4.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "5.jpg").mkdir()  # a folder is not a frame
    assert list_frame_images(str(tmp_path)) == ["1.png", "2.JPG", "3.jpeg", "10.jpg"]


def test_frame_folder_probes_and_decodes_like_a_video(tmp_path: Path) -> None:
    # Named 1..12 so a plain string sort would put 10, 11, 12 before 2.
    names = [f"{i}.jpg" for i in range(1, 13)]
    write_frames(tmp_path, [flat(COLORS[i % 6]) for i in range(12)], names)
    info = probe_video(str(tmp_path), limits=LIMITS, frame_rate=6)
    assert (info.num_frames, info.width, info.height, info.rotation) == (12, W, H, 0)
    assert (info.decode_width, info.decode_height, info.codec) == (W, H, "image-sequence")
    assert info.fps == 6.0 and info.duration_s == pytest.approx(2.0)
    assert [Path(p).name for p in info.frames] == names

    every, third = Recorder(), Recorder(every=3)
    progress: list[tuple[int, float]] = []
    result = decode_video(info, [every, third], progress=lambda n, t: progress.append((n, t)))
    assert result.frames_decoded == 12 and result.error is None and result.limit_reached is None
    assert result.end_time == pytest.approx(2.0) and (result.first_index, result.first_time) == (0, 0.0)
    assert [i for i, _, _ in every.got] == list(range(12)) == third.asked
    assert [i for i, _, _ in third.got] == [0, 3, 6, 9]
    assert progress[-1] == (12, pytest.approx(11 / 6)) and len(progress) == 12
    for index, time, frame in every.got:
        assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
        assert time == pytest.approx(index / 6)
        assert np.abs(mean_color(frame) - COLORS[index % 6]).max() < 6  # frame `index` is image index + 1
    shared = {i: f for i, _, f in third.got}
    assert all(f is shared[i] for i, _, f in every.got if i in shared)  # one read per frame


def test_frame_folder_scales_resizes_and_limits(tmp_path: Path) -> None:
    images = [flat(COLORS[0], 64, 48), flat(COLORS[1], 64, 48), flat(COLORS[2], 40, 40), flat(COLORS[3], 64, 48)]
    write_frames(tmp_path, images)
    info = probe_video(str(tmp_path), limits=DecodeLimits(max_side=16), frame_rate=2)
    assert (info.width, info.height, info.decode_width, info.decode_height) == (64, 48, 16, 12)
    frames = Recorder()
    decode_video(info, [frames])
    assert [f.shape for _, _, f in frames.got] == [(12, 16, 3)] * 4  # the odd-sized one too
    assert np.abs(mean_color(frames.got[2][2]) - COLORS[2]).max() < 6

    limited = decode_video(probe_video(str(tmp_path), limits=DecodeLimits(max_frames=3), frame_rate=2), [])
    assert limited.frames_decoded == 3 and "max_frames=3" in (limited.limit_reached or "")
    with pytest.raises(VideoError, match="above the limit of 1 s"):
        probe_video(str(tmp_path), limits=DecodeLimits(max_duration_s=1.0), frame_rate=2)


def test_frame_folder_errors(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    paths = write_frames(frames, [flat(c) for c in COLORS[:5]])
    with pytest.raises(BadInputError, match="give its frame_rate") as caught:
        probe_video(str(frames), limits=LIMITS)
    assert not isinstance(caught.value, VideoError) and str(frames) in str(caught.value)
    with pytest.raises(BadInputError, match="positive number"):
        probe_video(str(frames), limits=LIMITS, frame_rate=0)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no frames here")
    with pytest.raises(VideoError, match="holds no .jpg, .jpeg or .png image"):
        probe_video(str(empty), limits=LIMITS, frame_rate=6)

    # A corrupt image mid-way ends the pass where it is read, like a truncated stream...
    paths[2].write_bytes(b"not a jpeg at all")
    info = probe_video(str(frames), limits=LIMITS, frame_rate=6)
    seen = Recorder()
    result = decode_video(info, [seen])
    assert result.frames_decoded == 2 and [i for i, _, _ in seen.got] == [0, 1]
    assert result.error is not None and result.error.startswith("reading stopped after 2 frames (0.17 s)")
    assert "00002.jpg" in result.error and "\n" not in result.error
    # ...but a frame no consumer wants is never read, so it costs nothing and breaks nothing.
    odd = Recorder()
    odd.wants = lambda index, time: index != 2  # type: ignore[method-assign]
    clean = decode_video(info, [odd])
    assert clean.error is None and [i for i, _, _ in odd.got] == [0, 1, 3, 4]

    paths[0].write_bytes(b"")
    with pytest.raises(VideoError, match="00000.jpg is empty, corrupt or not a JPEG/PNG"):
        probe_video(str(frames), limits=LIMITS, frame_rate=6)


# -- decode window ------------------------------------------------------------------------------------------


def test_decode_window_on_a_frame_folder(tmp_path: Path) -> None:
    write_frames(tmp_path, [flat(COLORS[i % 6]) for i in range(12)])
    info = probe_video(str(tmp_path), limits=LIMITS, frame_rate=6)
    seen = Recorder()
    result = decode_video(info, [seen], start_s=0.5, end_s=1.0)
    assert seen.asked == [3, 4, 5] and [i for i, _, _ in seen.got] == [3, 4, 5]
    assert [t for _, t, _ in seen.got] == pytest.approx([0.5, 4 / 6, 5 / 6])
    assert (result.first_index, result.first_time, result.frames_decoded) == (3, 0.5, 6)
    assert result.end_time == pytest.approx(1.0)
    assert np.abs(mean_color(seen.got[0][2]) - COLORS[3]).max() < 6


def test_decode_window_on_a_video_file(tmp_path: Path) -> None:
    truth = synthetic.hard_cuts_video(tmp_path / "cuts.mp4")  # 15 fps, 80 frames, cuts at 25 and 55
    info = probe_video(str(truth.path), limits=LIMITS)
    seen = Recorder()
    progress: list[int] = []
    result = decode_video(info, [seen], start_s=1.0, end_s=2.0, progress=lambda n, t: progress.append(n))
    assert seen.asked == list(range(15, 30)) == [i for i, _, _ in seen.got]
    assert [t for _, t, _ in seen.got] == pytest.approx([i / 15 for i in range(15, 30)])
    assert (result.first_index, result.frames_decoded) == (15, 30) and result.first_time == pytest.approx(1.0)
    assert result.end_time == pytest.approx(2.0) and result.error is None and result.limit_reached is None
    assert progress == list(range(1, 31))  # the skipped frames were decoded (and counted), not converted
    for index, _, frame in seen.got:  # indexes are the file's: the background changes at the cut, frame 25
        assert np.abs(frame[:8, :8].reshape(-1, 3).mean(axis=0) - truth.background(index)).max() < 8

    tail = Recorder()
    assert decode_video(info, [tail], start_s=5.0).frames_decoded == 80
    assert [i for i, _, _ in tail.got] == list(range(75, 80))
    head = decode_video(info, [], end_s=0.5)
    assert (head.frames_decoded, head.first_index) == (8, 0)

    with pytest.raises(VideoError, match="no frame in the window from 9 s: the video ends at 5.33 s"):
        decode_video(info, [], start_s=9.0)
    with pytest.raises(BadInputError, match="end_s=1.0 must be after start_s=2.0"):
        decode_video(info, [], start_s=2.0, end_s=1.0)
    with pytest.raises(BadInputError, match="start_s must be a time"):
        decode_video(info, [], start_s=-1.0)


def test_decode_window_on_a_real_video_matches_the_full_decode() -> None:
    if not REAL_VIDEOS.is_dir() or not any(REAL_VIDEOS.glob("*.mp4")):
        pytest.skip(f"real test videos not found in {REAL_VIDEOS} (the shared folder beside the checkout)")
    path = REAL_VIDEOS / "03_blocks.mp4"
    path = path if path.exists() else sorted(REAL_VIDEOS.glob("*.mp4"))[0]
    info = probe_video(str(path), limits=DecodeLimits(max_side=320))
    start, end = info.duration_s / 3, info.duration_s / 2
    full, window = Recorder(every=7), Recorder(every=7)
    decode_video(info, [full])
    result = decode_video(info, [window], start_s=start, end_s=end)
    expected = [(i, t) for i, t, _ in full.got if start <= t < end]
    assert len(expected) >= 2 and [(i, t) for i, t, _ in window.got] == expected
    assert result.first_time >= start and result.end_time <= end + 1.5 / info.fps
    frames = {i: f for i, _, f in full.got}
    assert all(np.array_equal(f, frames[i]) for i, _, f in window.got)


# -- caption manifests --------------------------------------------------------------------------------------


def test_manifest_in_three_formats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"video": "clips/a.mp4", "caption": " A dog runs. ", "start": 1.5, "end": 4, "score": 0.3},
        {"video_path": "/data/b.mp4", "caption": "A cat.", "timestamp": ["0:00:05.000", "00:01:02.500"]},
        {"path": "s3://bucket/c.mp4", "caption": "A bird.", "start": "00:00:02", "end": "12.25"},
        {"video": "d.mp4", "caption": "Whole video."},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    csv_lines = [
        "video,caption,start,end,timestamp,extra",
        'clips/a.mp4," A dog runs. ",1.5,4,,x',
        "/data/b.mp4,A cat.,,,\"['0:00:05.000', '00:01:02.500']\",y",
        "s3://bucket/c.mp4,A bird.,00:00:02,12.25,,z",
        "d.mp4,Whole video.,,,,",
    ]
    (tmp_path / "m.csv").write_text("\n".join(csv_lines) + "\n")
    table = pa.table({
        "video": ["clips/a.mp4", "/data/b.mp4", "s3://bucket/c.mp4", "d.mp4"],
        "caption": [" A dog runs. ", "A cat.", "A bird.", "Whole video."],
        "start": [1.5, None, 2.0, None],
        "end": [4.0, None, 12.25, None],
        "timestamp": [None, ["0:00:05.000", "00:01:02.500"], None, None],
        "embedding": [[0.0] * 8] * 4,  # a wide extra column: ignored, not even read
    })
    pq.write_table(table, tmp_path / "m.parquet")

    expected = [
        (str(tmp_path / "clips" / "a.mp4"), 1.5, 4.0, "A dog runs."),
        ("/data/b.mp4", 5.0, 62.5, "A cat."),
        ("s3://bucket/c.mp4", 2.0, 12.25, "A bird."),
        (str(tmp_path / "d.mp4"), None, None, "Whole video."),
    ]
    for name in ("m.jsonl", "m.csv", "m.parquet"):
        items = list(read_manifest(str(tmp_path / name)))
        assert [(i.source, i.start_s, i.end_s, i.caption) for i in items] == expected, name
        assert {i.dataset for i in items} == {"manifest"} and items[0].frame_rate is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"video": "a.mp4", "caption": "x", "start": 5, "end": 5}, r"line 2: end \(5 s\) must be after start \(5 s\)"),
        ({"video": "a.mp4", "caption": "x", "timestamp": "['00:00:09', '00:00:03']"}, r"line 2: end \(3 s\)"),
        ({"video": "a.mp4", "caption": "  "}, "line 2 has no caption"),
        ({"file": "a.mp4", "caption": "x"}, "line 2 has no video path .*its keys: file, caption"),
        ({"video": "a.mp4", "caption": "x", "start": "1:75"}, "line 2: start '1:75' is not a time"),
        ({"video": "a.mp4", "caption": "x", "start": -2}, "line 2: start -2 is not a time"),
        ({"video": "a.mp4", "caption": "x", "timestamp": "[1, 2, 3]"}, r"line 2: timestamp .* is not a \[start, end\]"),
        ({"video": "a.mp4", "caption": "x", "end": 3, "timestamp": [1, 2]}, "line 2 gives both start/end and timestamp"),
    ],
)
def test_bad_manifest_rows_name_the_row(tmp_path: Path, row: dict, message: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"video": "ok.mp4", "caption": "fine"}) + "\n" + json.dumps(row) + "\n")
    items = read_manifest(str(path))
    assert next(items).source == str(tmp_path / "ok.mp4")  # rows are read lazily, the good one first
    with pytest.raises(BadInputError, match=message) as caught:
        next(items)
    assert str(caught.value).startswith(f"{path} line 2") and "\n" not in str(caught.value)


def test_bad_manifests_name_the_file_and_row(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("video,caption,start,end\na.mp4,ok,,\nb.mp4,,1,2\n")
    with pytest.raises(BadInputError, match=f"{csv_path} row 2 has no caption"):
        list(read_manifest(str(csv_path)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"video": "a.mp4", "caption": "x"}\n{"video": \n')
    with pytest.raises(BadInputError, match=f"{broken} line 2 is not valid JSON"):
        list(read_manifest(str(broken)))
    with pytest.raises(BadInputError, match="manifest not found"):
        read_manifest(str(tmp_path / "missing.csv"))  # checked up front, before any row is read
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 nope")
    with pytest.raises(BadInputError, match="is not a readable Parquet file"):
        list(read_manifest(str(junk)))


# -- MeViS --------------------------------------------------------------------------------------------------


def mevis_layout(root: Path) -> dict[str, dict[int, np.ndarray]]:
    """Two videos; v1's objects: 10 on every frame, 11 absent from frame 1 (null), 12 never annotated.
    Returns the ground truth masks per anno id per frame position."""
    truth = {
        "10": {i: rect(2 + 3 * i, 2, 12 + 3 * i, 10) for i in range(4)},
        "11": {i: rect(20, 12 + i, 30, 22) for i in (0, 2, 3)},
    }
    write_frames(root / "JPEGImages" / "v1", [flat(COLORS[i]) for i in range(4)])
    write_frames(root / "JPEGImages" / "v2", [flat(COLORS[i]) for i in range(2)])
    meta = {"videos": {
        "v1": {
            "expressions": {
                "0": {"exp": "the two  boxes", "obj_id": [0, 1], "anno_id": [10, 11]},
                "1": {"exp": "the box moving down", "obj_id": [1], "anno_id": [11]},
                "2": {"exp": "a box never seen", "obj_id": [2], "anno_id": [12]},
            },
            "frames": ["00000", "00001", "00002", "00003"],
        },
        "v2": {"expressions": {"0": {"exp": "the corner", "obj_id": [0], "anno_id": [20]}},
               "frames": ["00000", "00001"]},
    }}

    def compressed(mask: np.ndarray) -> dict:
        return masks.encode(mask).model_dump()

    def uncompressed(mask: np.ndarray) -> dict:  # column-major run lengths, starting with zeros
        flat_mask = mask.flatten(order="F").astype(np.int8)
        changes = np.flatnonzero(np.diff(np.concatenate([[0], flat_mask, [2]])) != 0)
        return {"size": [H, W], "counts": np.diff(np.concatenate([[0], changes])).tolist()}

    mask_dict = {
        "10": [compressed(truth["10"][i]) for i in range(4)],
        "11": [uncompressed(truth["11"][i]) if i in truth["11"] else None for i in range(4)],
        "12": [None] * 4,
        "20": [compressed(rect(0, 0, 4, 4)), None],
    }
    (root / "meta_expressions.json").write_text(json.dumps(meta))
    (root / "mask_dict.json").write_text(json.dumps(mask_dict))
    return truth


def test_mevis_items_carry_exact_masks_and_multi_object_expressions(tmp_path: Path) -> None:
    truth = mevis_layout(tmp_path)
    items = list(read_mevis(tmp_path))
    assert [i.source for i in items] == [str(tmp_path / "JPEGImages" / v) for v in ("v1", "v2")]
    v1 = items[0]
    assert (v1.dataset, v1.frame_rate) == ("mevis", 6.0)
    assert [o.object_id for o in v1.objects] == ["10", "11"]  # 12 has no mask on any frame: dropped
    assert [(e.expression, e.object_ids) for e in v1.expressions] == [
        ("the two boxes", ["10", "11"]), ("the box moving down", ["11"])
    ]
    assert [(p.reason, p.object_id, p.expression) for p in v1.problems] == [
        ("no_annotation", "12", "a box never seen")
    ]  # 12 has only null frames: the expression is left out, as a problem of the item
    for obj in v1.objects:
        assert sorted(obj.masks) == sorted(truth[obj.object_id])
        for position, rle in obj.masks.items():
            assert rle.size == [H, W]
            assert np.array_equal(masks.decode(rle), truth[obj.object_id][position])
    assert list(items[1].objects[0].masks) == [0] and items[1].expressions[0].object_ids == ["20"]
    assert next(read_mevis(tmp_path, frame_rate=10)).frame_rate == 10

    # Positions are those of a decode of the source folder: the object is where its frame says.
    info = probe_video(v1.source, limits=LIMITS, frame_rate=v1.frame_rate)
    frames = Recorder()
    decode_video(info, [frames])
    assert len(frames.got) == 4
    assert all(np.abs(mean_color(frames.got[p][2]) - COLORS[p]).max() < 6 for p in v1.objects[0].masks)


def test_mevis_bad_annotations_are_problems_of_their_item(tmp_path: Path) -> None:
    truth = mevis_layout(tmp_path)
    mask_path = tmp_path / "mask_dict.json"
    mask_dict = json.loads(mask_path.read_text())
    mask_dict["11"][0] = {"size": [48, 64], "counts": mask_dict["11"][0]["counts"]}
    mask_path.write_text(json.dumps(mask_dict))
    v1 = next(read_mevis(tmp_path))
    assert sorted(v1.objects[1].masks) == [2, 3]  # the rest of object 11 survives
    problem = next(p for p in v1.problems if p.reason == "mask_size_mismatch")
    assert problem.object_id == "11"
    assert "video v1, anno_id 11, frame 00000: mask size [48, 64] does not match the frames' [24, 32]" in problem.detail

    del mask_dict["11"]
    mask_path.write_text(json.dumps(mask_dict))
    v1 = next(read_mevis(tmp_path))
    assert [o.object_id for o in v1.objects] == ["10"]
    assert [(e.expression, e.object_ids) for e in v1.expressions] == [("the two boxes", ["10"])]
    assert {(p.reason, p.object_id) for p in v1.problems} >= {("unknown_object", "11")}

    mask_dict["11"] = [None]
    mask_path.write_text(json.dumps(mask_dict))
    v1 = next(read_mevis(tmp_path))
    assert "expected a list of 4 per-frame masks, got 1 entries" in next(
        p.detail for p in v1.problems if p.reason == "frame_count_mismatch")

    meta_path = tmp_path / "meta_expressions.json"
    meta = json.loads(meta_path.read_text())
    meta["videos"]["v1"]["frames"].append("00009")
    meta_path.write_text(json.dumps(meta))
    mask_dict["10"].append(mask_dict["10"][0])
    mask_path.write_text(json.dumps(mask_dict))
    v1 = next(read_mevis(tmp_path))
    assert sorted(v1.objects[0].masks) == sorted(truth["10"])
    assert "video v1: frame 00009 is not among the images of" in next(
        p.detail for p in v1.problems if p.reason == "missing_frame")

    mask_path.unlink()
    with pytest.raises(BadInputError, match="mask_dict.json not found"):
        read_mevis(tmp_path)  # the JSON files are checked up front
    mask_path.write_text(json.dumps(mask_dict))
    meta_path.write_text(json.dumps({"items": []}))
    with pytest.raises(BadInputError, match='meta_expressions.json has no "videos" object'):
        read_mevis(tmp_path)


# -- Ref-YouTube-VOS ----------------------------------------------------------------------------------------


def ytvos_layout(root: Path) -> dict[str, dict[int, np.ndarray]]:
    """One video of 5 JPEGs (00000, 00005, ... as the dataset names every 5th original frame), annotated on
    frames 00000, 00010 and 00020; object 2 leaves before 00020. Ground truth by object id and position."""
    names = [f"{5 * i:05d}" for i in range(5)]
    write_frames(root / "JPEGImages" / "vid", [flat(COLORS[i]) for i in range(5)], [f"{n}.jpg" for n in names])
    truth: dict[str, dict[int, np.ndarray]] = {"1": {}, "2": {}}
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9)
    (root / "Annotations" / "vid").mkdir(parents=True)
    for position in (0, 2, 4):
        labels = np.zeros((H, W), dtype=np.uint8)
        truth["1"][position] = rect(1 + position, 1, 9 + position, 9)
        labels[truth["1"][position]] = 1
        if position < 4:
            truth["2"][position] = rect(16, 10, 28, 20 + position)
            labels[truth["2"][position]] = 2
        image = Image.fromarray(labels, mode="P")
        image.putpalette(palette)
        image.save(root / "Annotations" / "vid" / f"{names[position]}.png")
    meta = {"videos": {"vid": {
        "expressions": {
            "0": {"exp": "a red square", "obj_id": "1"},
            "1": {"exp": "a green bar", "obj_id": "2"},
            "2": {"exp": "a ghost", "obj_id": "3"},
        },
        "frames": ["00000", "00010", "00020"],
    }}}
    (root / "meta_expressions.json").write_text(json.dumps(meta))
    return truth


def test_ref_youtube_vos_palette_pngs_round_trip(tmp_path: Path) -> None:
    truth = ytvos_layout(tmp_path)
    assert Image.open(tmp_path / "Annotations" / "vid" / "00000.png").mode == "P"
    (item,) = list(read_ref_youtube_vos(tmp_path))
    assert (item.source, item.dataset, item.frame_rate) == (str(tmp_path / "JPEGImages" / "vid"), "ref-youtube-vos", 6)
    assert [o.object_id for o in item.objects] == ["1", "2"]
    for obj in item.objects:
        assert sorted(obj.masks) == sorted(truth[obj.object_id])
        assert all(np.array_equal(masks.decode(r), truth[obj.object_id][p]) for p, r in obj.masks.items())
    assert [(e.expression, e.object_ids) for e in item.expressions] == [
        ("a red square", ["1"]), ("a green bar", ["2"])
    ]  # "a ghost" refers to an object no PNG holds


def test_ref_youtube_vos_errors(tmp_path: Path) -> None:
    ytvos_layout(tmp_path)
    png = tmp_path / "Annotations" / "vid" / "00010.png"
    Image.new("RGB", (W, H)).save(png)
    with pytest.raises(BadInputError, match="video vid: mask .*00010.png is a RGB image, not a palette PNG"):
        list(read_ref_youtube_vos(tmp_path))
    Image.new("P", (W + 2, H)).save(png)
    with pytest.raises(BadInputError, match="00010.png is 34x24, the frames are 32x24"):
        list(read_ref_youtube_vos(tmp_path))
    png.unlink()
    with pytest.raises(BadInputError, match="video vid: mask .*00010.png is missing or unreadable"):
        list(read_ref_youtube_vos(tmp_path))


# -- releases as they unpack -------------------------------------------------------------------------------


def mevis_release(root: Path) -> None:
    """MeViS as its release unpacks: train/ and valid_u/ with masks, valid/ without (withheld)."""
    mevis_layout(root / "train")
    mevis_layout(root / "valid_u")
    mevis_layout(root / "valid")
    (root / "valid" / "mask_dict.json").unlink()


def test_mevis_reads_its_release_layout_by_split(tmp_path: Path) -> None:
    mevis_release(tmp_path)
    with pytest.raises(BadInputError, match="is a MeViS release with splits train, valid_u: give the split"):
        open_source(str(tmp_path))
    items = list(open_source(str(tmp_path), split="valid_u"))
    assert [i.source for i in items] == [str(tmp_path / "valid_u" / "JPEGImages" / v) for v in ("v1", "v2")]
    assert [o.object_id for o in items[0].objects] == ["10", "11"]
    assert [i.source for i in open_source(str(tmp_path / "train"))] == [
        str(tmp_path / "train" / "JPEGImages" / v) for v in ("v1", "v2")
    ]
    assert len(list(read_mevis(tmp_path, split="train"))) == 2
    for spec, split, message in [
        (tmp_path, "valid", "split valid of .* has no mask_dict.json .*splits with masks: train, valid_u"),
        (tmp_path, "test", "has no MeViS split 'test'; its splits: train, valid, valid_u"),
        (tmp_path / "train", "valid_u", "is one split folder \\(train\\), not a release root"),
        (tmp_path / "valid", None, "has meta_expressions.json and JPEGImages/ but no masks"),
    ]:
        with pytest.raises(BadInputError, match=message) as caught:
            open_source(str(spec), split=split)
        assert "\n" not in str(caught.value)


def ytvos_release(root: Path) -> dict[str, dict[int, np.ndarray]]:
    """Ref-YouTube-VOS as its release unpacks: meta_expressions/<split>/meta_expressions.json beside
    train/{JPEGImages,Annotations,meta.json} and valid/JPEGImages (its masks are withheld)."""
    truth = ytvos_layout(root / "train")
    for split in ("train", "valid"):
        (root / "meta_expressions" / split).mkdir(parents=True)
    (root / "train" / "meta_expressions.json").rename(root / "meta_expressions" / "train" / "meta_expressions.json")
    (root / "train" / "meta.json").write_text(json.dumps({"videos": {}}))
    write_frames(root / "valid" / "JPEGImages" / "vv", [flat(COLORS[0])])
    valid_meta = {"videos": {"vv": {"expressions": {"0": {"exp": "a thing"}}, "frames": ["00000"]}}}
    (root / "meta_expressions" / "valid" / "meta_expressions.json").write_text(json.dumps(valid_meta))
    return truth


def test_ref_youtube_vos_reads_its_release_layout(tmp_path: Path) -> None:
    """Pointed at the release root or at train/, the adapter finds meta_expressions/train/ (before, both were
    "a folder the engine cannot read")."""
    truth = ytvos_release(tmp_path)
    for spec, split in [(tmp_path, None), (tmp_path, "train"), (tmp_path / "train", None)]:
        (item,) = open_source(str(spec), split=split)  # train: the only split with masks
        assert (item.source, item.dataset) == (str(tmp_path / "train" / "JPEGImages" / "vid"), "ref-youtube-vos")
        assert [e.expression for e in item.expressions] == ["a red square", "a green bar"]
        for obj in item.objects:
            assert all(np.array_equal(masks.decode(r), truth[obj.object_id][p]) for p, r in obj.masks.items())
    for spec, split, message in [
        (tmp_path, "valid", "split valid of .* has no Annotations/ .*splits with masks: train"),
        (tmp_path, "test", "has no Ref-YouTube-VOS split 'test'; its splits: train, valid"),
        (tmp_path / "valid", None, "valid has no Annotations/: the release withholds the masks"),
        (tmp_path / "train", "valid", "is one split folder \\(train\\)"),
    ]:
        with pytest.raises(BadInputError, match=message):
            open_source(str(spec), split=split)


def test_every_bad_source_is_refused_when_opened(tmp_path: Path, monkeypatch) -> None:
    """open_source raises its one-line error at call time, before any item is read, so a run can check all of
    its sources before it starts."""
    video = synthetic.short_video(tmp_path / "clip.mp4", seconds=0.5, fps=4).path
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nope")
    (tmp_path / "nocaption.csv").write_text("video,text\na.mp4,hello\n")
    (tmp_path / "empty.csv").write_text("")
    mevis_layout(tmp_path / "mevis")
    (tmp_path / "mevis" / "meta_expressions.json").write_text("{not json")
    mevis_release(tmp_path / "release")
    write_frames(tmp_path / "frames", [flat(COLORS[0])])
    cases = [
        (tmp_path / "junk.parquet", {}, "junk.parquet is not a readable Parquet file"),
        (tmp_path / "nocaption.csv", {}, "needs a video .* and a caption column; its columns: video, text"),
        (tmp_path / "empty.csv", {}, "its columns: none"),
        (tmp_path / "mevis", {}, "meta_expressions.json is not readable JSON"),
        (tmp_path / "release", {}, "give the split"),
        (tmp_path / "release", {"split": "nope"}, "its splits: train, valid, valid_u"),
        (video, {"split": "train"}, "has no splits"),
        (tmp_path / "frames", {"frame_rate": -1.0}, "frame rate must be a positive number"),
        (tmp_path / "frames", {}, "give its frame_rate"),
    ]
    for spec, options, message in cases:
        with pytest.raises(BadInputError, match=message) as caught:
            open_source(str(spec), **options)
        assert "\n" not in str(caught.value), spec

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("os.scandir", unreadable)
    with pytest.raises(BadInputError, match="frames cannot be read: .*Permission denied"):
        open_source(str(tmp_path / "frames"), frame_rate=6)


# -- open_source --------------------------------------------------------------------------------------------


def test_open_source_dispatches_on_what_it_is_given(tmp_path: Path) -> None:
    mevis_layout(tmp_path / "mevis")
    ytvos_layout(tmp_path / "ytvos")
    write_frames(tmp_path / "frames", [flat(c) for c in COLORS[:3]])
    video = synthetic.short_video(tmp_path / "clip.mp4").path
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "clip.mp4", "caption": "a clip"}) + "\n")

    assert [i.dataset for i in open_source(str(tmp_path / "mevis"))] == ["mevis", "mevis"]
    assert [i.frame_rate for i in open_source(str(tmp_path / "mevis"), frame_rate=12)] == [12, 12]
    assert [i.dataset for i in open_source(str(tmp_path / "ytvos"))] == ["ref-youtube-vos"]
    (item,) = open_source(str(tmp_path / "m.jsonl"))
    assert (item.source, item.caption) == (str(video), "a clip")
    (item,) = open_source(str(video))
    assert (item.source, item.caption, item.objects) == (str(video), None, [])
    (item,) = open_source(str(tmp_path / "frames"), frame_rate=6)
    assert (item.source, item.frame_rate) == (str(tmp_path / "frames"), 6)
    assert probe_video(item.source, limits=LIMITS, frame_rate=item.frame_rate).num_frames == 3
    (item,) = open_source("https://example.com/v.mp4")
    assert item.source == "https://example.com/v.mp4"

    with pytest.raises(BadInputError, match="is a folder of frames: give its frame_rate"):
        open_source(str(tmp_path / "frames"))
    with pytest.raises(BadInputError, match="input not found"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    for spec in (tmp_path / "notes.txt", tmp_path / "empty"):
        with pytest.raises(BadInputError, match="give a video file .* a caption manifest .* a MeViS release") as e:
            open_source(str(spec))
        assert "\n" not in str(e.value)
    assert "Ref-YouTube-VOS" in describe_sources() and "Panda-70M" in describe_sources()


def test_a_folder_of_videos_gives_one_item_per_video(tmp_path):
    from engine.sources import open_source
    from tests import synthetic

    for name in ("b10.mp4", "b2.mp4"):
        synthetic.short_video(tmp_path / name, seconds=0.5, fps=4)
    (tmp_path / "notes.txt").write_text("not a video")
    assert [i.source for i in open_source(str(tmp_path))] == [str(tmp_path / "b2.mp4"), str(tmp_path / "b10.mp4")]
