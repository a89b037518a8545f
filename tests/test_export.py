"""The VideoRefer export read back as a trainer would: windows, cut clips, masks at the decoded size, frame
folders in the loader's order, relative video paths, one time format, and memory that does not grow with the
dataset."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from engine import masks
from engine.decode import DecodeLimits
from engine.export import ExportOptions
from engine.export_videorefer import export_videorefer
from engine.export_media import resize_rle
from engine.ids import stable_id
from engine.probe import VideoInfo, probe_video
from engine.storage import Dataset
from engine.writer import TableWriter
from flows.cli import app
from schemas import (
    Assignment,
    FrameMask,
    ItemRecord,
    MaskletRecord,
    Provenance,
    SampleRecord,
    Turn,
    VideoRecord,
    Window,
    to_table,
)
from tests import synthetic

PROV = Provenance(engine_version="0", profile="tiny", models={}, config_hash="c")
FPS = 12
COLORS = [((37 * i) % 256, (255 - 53 * i) % 256, (90 + 71 * i) % 256) for i in range(24)]


class FakeDataset:
    """A dataset in memory that serves only `scan` (not a storage backend): an export that loads a whole table
    with `read_table` fails here."""

    def __init__(self, videos: list[VideoRecord], masklets: list[MaskletRecord], samples: list[SampleRecord]):
        self.tables = {
            "videos": to_table(VideoRecord, videos),
            "masklets": to_table(MaskletRecord, masklets),
            "samples": to_table(SampleRecord, samples),
        }

    def scan(
        self, table: str, columns: Iterable[str] | None = None, *, version: int | None = None, batch_rows: int = 4096, unique: bool = True
    ) -> Iterator[pa.RecordBatch]:
        selected = self.tables[table].select(list(columns)) if columns else self.tables[table]
        yield from selected.to_batches(max_chunksize=batch_rows)

    def read_table(self, table: str, columns: Iterable[str] | None = None) -> pa.Table:
        raise AssertionError(f"the export read all of {table} at once")


def video_row(info: VideoInfo, *, start_s: float | None = None, end_s: float | None = None) -> VideoRecord:
    return VideoRecord(
        video_id=stable_id(info.path, start_s, end_s),
        source=info.path,
        content_sha256="0" * 64,
        start_s=start_s,
        end_s=end_s,
        duration_s=(end_s or info.duration_s) - (start_s or 0.0),
        fps=info.fps,
        num_frames=info.num_frames,
        width=info.width,
        height=info.height,
        rotation=0,
        codec=info.codec,
        decode_width=info.decode_width,
        decode_height=info.decode_height,
    )


def masklet(video_id: str, by_frame: dict[int, np.ndarray], name: str = "the square") -> MaskletRecord:
    first = min(by_frame)
    return MaskletRecord(
        masklet_id=stable_id(video_id, name, *sorted(by_frame)),
        video_id=video_id,
        expression=name,
        noun="square",
        method="strefer",
        start_frame=first,
        start_time=first / FPS,
        detector_score=1.0,
        detector_box=[0, 0, 1, 1],
        assignment=Assignment(method="sole-candidate", candidate_index=0, num_candidates=1, score=1.0),
        num_frames_tracked=len(by_frame),
        track_fps=0,
        frames=[
            FrameMask(frame_index=i, timestamp=i / FPS, rle=masks.encode(m), box=masks.mask_box(m) or [0, 0, 0, 0])
            for i, m in sorted(by_frame.items())
        ],
        provenance=PROV,
    )


def sample(
    name: str,
    video: VideoRecord,
    question: str,
    answer: str,
    *,
    masklets: list[MaskletRecord] = (),
    frames: list[int] = (),
    window: Window | None = None,
    labels: dict[str, str] | None = None,
    data_type: str = "strefer",
) -> SampleRecord:
    return SampleRecord(
        sample_id=stable_id(name),
        video_id=video.video_id,
        source=video.source,
        pipeline="strefer",
        data_type=data_type,
        labels=labels or {},
        conversation=[Turn(role="human", value=f"<video>\n{question}"), Turn(role="gpt", value=answer)],
        masklet_ids=[m.masklet_id for m in masklets],
        frames=list(frames),
        window=window,
        kept=True,
        provenance=PROV,
    )


def decode_rle(rle: dict) -> np.ndarray:
    return masks.decode(masks.Rle(size=rle["size"], counts=rle["counts"]))


def read_frames(path: str) -> list[np.ndarray]:
    import av

    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def nearest_color(frame: np.ndarray) -> int:
    """Index of the COLORS entry closest to the frame's corner (the background, away from the square)."""
    corner = frame[:4, :4].reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(corner - np.array(c)).sum() for c in COLORS]))


@pytest.fixture(scope="module")
def colored(tmp_path_factory) -> synthetic.GroundTruth:
    """24 frames at 12 fps, each its own background color, with a square moving right."""
    path = tmp_path_factory.mktemp("video") / "colored.mp4"
    square = synthetic.ShapeSpec("the square", "square", (250, 250, 250), "rect", (12, 12), lambda i: (10 + 2 * i, 24))
    return synthetic.make_video(
        path,
        width=80,
        height=48,
        fps=FPS,
        num_frames=24,
        scenes=[synthetic.SceneSpec(i, COLORS[i]) for i in range(24)],
        shapes=[square],
    )


def entries_of(folder: Path) -> dict[str, dict]:
    return {e["id"]: e for f in folder.glob("*.json") for e in json.loads(f.read_text())}


# -- windows and clips ----------------------------------------------------------------------------------------


def test_windowed_samples_carry_their_window_and_cut_clips_count_from_the_clip(colored, tmp_path):
    """A Strefer type 2 ("absent") answer is about one clip, and a caption manifest's row about its start/end:
    each exported entry carries its window, and --cut-clips points it at that window's own file."""
    info = probe_video(str(colored.path), limits=DecodeLimits())
    whole = video_row(info)
    caption_row = video_row(info, start_s=0.5, end_s=1.5)  # frames 6..17
    truth = {i: colored.mask("the square", i) for i in range(24)}
    on_whole = masklet(whole.video_id, truth)
    on_window = masklet(caption_row.video_id, {i: truth[i] for i in range(6, 18)})
    clip = Window(start_frame=12, end_frame=24, start_s=1.0, end_s=2.0)
    samples = [
        sample("absent", whole, "Is there a dog in this clip?", "No.", window=clip,
               labels={"group": "G1", "task_type": "type2"}),
        sample("present", whole, "What does <region> do in this clip?", "It moves right.", masklets=[on_whole],
               frames=[14, 20], window=clip),
        sample("caption", caption_row, "Describe <region>.", "A white square.", masklets=[on_window],
               frames=[6, 10, 17], data_type="short_caption"),
        sample("whole", whole, "Describe <region>.", "A white square.", masklets=[on_whole], frames=[0, 23]),
    ]
    dataset = FakeDataset([whole, caption_row], [on_whole, on_window], samples)

    summary = export_videorefer(dataset, str(tmp_path / "plain"))
    assert not summary.skipped and summary.clips == 0
    got = entries_of(tmp_path / "plain")
    absent, present, caption, full = (got[stable_id(n)] for n in ("absent", "present", "caption", "whole"))
    assert (absent["start"], absent["end"], absent["annotation"]) == (1.0, 2.0, [])
    assert (present["start"], present["end"]) == (1.0, 2.0) and list(present["annotation"][0]) == ["14", "20"]
    assert (caption["start"], caption["end"]) == (0.5, 1.5) and list(caption["annotation"][0]) == ["6", "10", "17"]
    assert "start" not in full and "end" not in full
    assert {e["video"] for e in got.values()} == {str(colored.path)}

    summary = export_videorefer(dataset, str(tmp_path / "cut"), ExportOptions(cut_clips=True))
    assert not summary.skipped and summary.clips == 2  # the clip of frames 12-23 is written once, for two samples
    got = entries_of(tmp_path / "cut")
    absent, present, caption, full = (got[stable_id(n)] for n in ("absent", "present", "caption", "whole"))
    assert full["video"] == str(colored.path) and list(full["annotation"][0]) == ["0", "23"]
    assert absent["video"] == present["video"] != caption["video"]
    for entry, first, count in ((present, 12, 12), (caption, 6, 12)):
        assert "start" not in entry and Path(entry["video"]).parent == tmp_path / "cut" / "clips"
        frames = read_frames(entry["video"])
        assert len(frames) == count
        assert [nearest_color(f) for f in frames] == list(range(first, first + count))  # the window's own frames
        for key, value in entry["annotation"][0].items():
            mask = decode_rle(value["segmentation"])
            assert mask.shape == frames[int(key)].shape[:2] == (entry["height"], entry["width"])
            assert np.array_equal(mask, truth[first + int(key)])
    assert list(present["annotation"][0]) == ["2", "8"] and list(caption["annotation"][0]) == ["0", "4", "11"]


def test_a_region_is_never_exported_outside_the_sample_scope(colored, tmp_path):
    """A masklet with masks only in the first shot, named by a sample about frames 12-23: before, the export fell
    back to the masklet's first frame, in another shot."""
    info = probe_video(str(colored.path), limits=DecodeLimits())
    video = video_row(info)
    early = masklet(video.video_id, {i: colored.mask("the square", i) for i in range(6)})
    every = masklet(video.video_id, {i: colored.mask("the square", i) for i in range(24)}, name="all frames")
    clip = Window(start_frame=12, end_frame=24, start_s=1.0, end_s=2.0)
    samples = [
        sample("elsewhere", video, "Where is <region>?", "Left.", masklets=[early], frames=[14], window=clip),
        sample("inside", video, "Where is <region>?", "Right.", masklets=[every], frames=[14], window=clip),
    ]
    dataset = FakeDataset([video], [early, every], samples)
    summary = export_videorefer(dataset, str(tmp_path / "a"))
    assert summary.skipped == {"region_outside_scope": 1}
    assert list(entries_of(tmp_path / "a")) == [stable_id("inside")]
    export_videorefer(dataset, str(tmp_path / "b"), ExportOptions(frames="tracked"))
    (inside,) = entries_of(tmp_path / "b").values()
    assert [int(k) for k in inside["annotation"][0]] == list(range(12, 24))  # not the masklet's frames 0-11


# -- sizes -------------------------------------------------------------------------------------------------------


def test_masks_of_a_4k_source_are_exported_at_the_size_a_trainer_decodes(tmp_path):
    """The build decodes a 3840x2160 source at 1920x1080 (decode.max_side) and stores its masks there; the
    entry points at the 4K file, so its masks are scaled to 3840x2160 (and so are those of a cut clip)."""
    square = synthetic.ShapeSpec("the square", "square", (250, 250, 250), "rect", (400, 300), lambda i: (1000 + 200 * i, 900))
    truth = synthetic.make_video(
        tmp_path / "4k.mp4", width=3840, height=2160, fps=FPS, num_frames=3,
        scenes=[synthetic.SceneSpec(0, (20, 40, 160))], shapes=[square],
    )
    info = probe_video(str(truth.path), limits=DecodeLimits())
    assert (info.decode_width, info.decode_height) == (1920, 1080)
    video = video_row(info)
    stored = {i: truth.mask("the square", i)[::2, ::2] for i in range(3)}  # the masks the build wrote
    m = masklet(video.video_id, stored)
    clip = Window(start_frame=1, end_frame=3, start_s=1 / FPS, end_s=3 / FPS)
    dataset = FakeDataset([video], [m], [
        sample("whole", video, "Describe <region>.", "A square.", masklets=[m], frames=[0, 2]),
        sample("clip", video, "Describe <region>.", "A square.", masklets=[m], frames=[1, 2], window=clip),
    ])

    export_videorefer(dataset, str(tmp_path / "plain"))
    decoded = read_frames(str(truth.path))  # what a trainer decodes from `video`: the frames at full size
    for entry in entries_of(tmp_path / "plain").values():
        assert (entry["height"], entry["width"]) == decoded[0].shape[:2] == (2160, 3840)
        for key, value in entry["annotation"][0].items():
            assert value["segmentation"]["size"] == [2160, 3840]
            assert np.array_equal(decode_rle(value["segmentation"]), truth.mask("the square", int(key)))

    export_videorefer(dataset, str(tmp_path / "cut"), ExportOptions(cut_clips=True))
    entry = entries_of(tmp_path / "cut")[stable_id("clip")]
    frames = read_frames(entry["video"])
    assert len(frames) == 2 and frames[0].shape[:2] == (entry["height"], entry["width"]) == (2160, 3840)
    assert {k: decode_rle(v["segmentation"]).sum() for k, v in entry["annotation"][0].items()} == {
        "0": truth.mask("the square", 1).sum(), "1": truth.mask("the square", 2).sum()
    }


def test_resize_rle_keeps_a_mask_of_the_right_size_untouched():
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 2:6] = True
    rle = masks.encode(mask).model_dump()
    assert resize_rle(rle, 6, 8) == rle
    assert np.array_equal(decode_rle(resize_rle(rle, 12, 16)), np.kron(mask, np.ones((2, 2), dtype=bool)))


# -- frame folders -------------------------------------------------------------------------------------------


def frame_folder(folder: Path, names: list[str], extra: str | None = None) -> None:
    """Frames of flat colors (COLORS[k] on the k-th frame in the engine's order), and maybe a stray file."""
    folder.mkdir(parents=True)
    for k, name in enumerate(names):
        image = np.empty((24, 32, 3), dtype=np.uint8)
        image[:] = COLORS[k]
        Image.fromarray(image).save(folder / name, quality=95)
    if extra:
        (folder / extra).write_bytes(b"\x00\x00\x00\x01Bud1")


def loader_frame(folder: str, index: int) -> np.ndarray:
    """Frame `index` of a folder as VideoRefer's training loader opens it: a text sort of every entry."""
    files = sorted(os.listdir(folder))
    return np.asarray(Image.open(os.path.join(folder, files[index])).convert("RGB"))


def test_frame_folders_point_at_the_frames_the_loader_opens(tmp_path):
    """Frames named 0.jpg..11.jpg (a text sort puts 10.jpg after 1.jpg) and a folder with a .DS_Store beside its
    frames: the engine numbers their frames otherwise than the loader, so their samples are left out, or, with
    --cut-clips, point at frame folders written in the loader's order."""
    frame_folder(tmp_path / "natural", [f"{k}.jpg" for k in range(12)])
    frame_folder(tmp_path / "hidden", [f"{k:05d}.jpg" for k in range(12)], extra=".DS_Store")
    frame_folder(tmp_path / "clean", [f"{k:05d}.jpg" for k in range(12)])
    videos, masklets_, samples = [], [], []
    mask = np.zeros((24, 32), dtype=bool)
    mask[4:12, 6:20] = True
    for name in ("natural", "hidden", "clean"):
        video = video_row(probe_video(str(tmp_path / name), limits=DecodeLimits(), frame_rate=6))
        m = masklet(video.video_id, {k: mask for k in range(12)})
        videos.append(video)
        masklets_.append(m)
        samples.append(sample(name, video, "Describe <region>.", "A box.", masklets=[m], frames=[1, 2, 10, 11]))
    dataset = FakeDataset(videos, masklets_, samples)

    summary = export_videorefer(dataset, str(tmp_path / "refused"))
    assert summary.skipped == {"frame_order_differs": 2}
    (clean,) = entries_of(tmp_path / "refused").values()
    assert clean["video"] == str(tmp_path / "clean")

    summary = export_videorefer(dataset, str(tmp_path / "cut"), ExportOptions(cut_clips=True))
    assert not summary.skipped and summary.clips == 2
    got = entries_of(tmp_path / "cut")
    assert got[stable_id("clean")]["video"] == str(tmp_path / "clean")  # already in the loader's order
    for name in ("natural", "hidden"):
        entry = got[stable_id(name)]
        assert Path(entry["video"]).parent == tmp_path / "cut" / "frames"
        assert len(os.listdir(entry["video"])) == 12  # frames only: no stray file for the loader to open
        for key in entry["annotation"][0]:
            frame = loader_frame(entry["video"], int(key))
            assert np.abs(frame[0, 0].astype(int) - COLORS[int(key)]).max() < 8, (name, key)
            assert frame.shape[:2] == (entry["height"], entry["width"])


# -- paths and time formats -------------------------------------------------------------------------------------


def test_video_paths_relative_to_a_video_root(colored, tmp_path):
    info = probe_video(str(colored.path), limits=DecodeLimits())
    video = video_row(info)
    m = masklet(video.video_id, {i: colored.mask("the square", i) for i in range(24)})
    clip = Window(start_frame=12, end_frame=24, start_s=1.0, end_s=2.0)
    dataset = FakeDataset([video], [m], [
        sample("whole", video, "Describe <region>.", "A square.", masklets=[m], frames=[3]),
        sample("clip", video, "Describe <region>.", "A square.", masklets=[m], frames=[13], window=clip),
    ])
    root = colored.path.parent.parent
    export_videorefer(dataset, str(tmp_path / "a"), ExportOptions(video_root=str(root)))
    for entry in entries_of(tmp_path / "a").values():
        assert not os.path.isabs(entry["video"]) and os.path.join(root, entry["video"]) == str(colored.path)

    out = tmp_path / "b"
    export_videorefer(dataset, str(out), ExportOptions(video_root=str(out), cut_clips=True))
    got = entries_of(out)
    assert got[stable_id("clip")]["video"].startswith("clips/") and (out / got[stable_id("clip")]["video"]).is_file()
    assert stable_id("whole") not in got  # the source lies outside the root


def test_time_format_picks_one_form_and_keeps_time_free_samples(colored, tmp_path):
    info = probe_video(str(colored.path), limits=DecodeLimits())
    video = video_row(info)
    dataset = FakeDataset([video], [], [
        sample("stamp", video, "What happens at 00:00:01.000?", "A square moves.", labels={"time_format": "timestamp"}),
        sample("token", video, "What happens at <t5>?", "A square moves.", labels={"time_format": "tokens"}),
        sample("free", video, "What moves?", "A square."),
    ])
    summary = export_videorefer(dataset, str(tmp_path / "a"))
    assert set(entries_of(tmp_path / "a")) == {stable_id("stamp"), stable_id("free")}
    assert summary.skipped == {"other_time_format": 1}
    export_videorefer(dataset, str(tmp_path / "b"), ExportOptions(time_format="tokens"))
    assert set(entries_of(tmp_path / "b")) == {stable_id("token"), stable_id("free")}


# -- memory ------------------------------------------------------------------------------------------------------


def _many(n: int, video: VideoRecord, m: MaskletRecord) -> FakeDataset:
    question = "What does <region> do? " + "Tell me at length. " * 20
    samples = [sample(f"s{i}", video, question, f"Answer {i}. " * 20, masklets=[m], frames=[3]) for i in range(n)]
    return FakeDataset([video], [m], samples)


def test_export_memory_does_not_grow_with_the_samples(colored, tmp_path):
    """Samples are streamed and entries written one by one: Python's peak memory for 6000 samples is about that
    for 1500 (an export that holds every sample or entry needs four times as much)."""
    info = probe_video(str(colored.path), limits=DecodeLimits())
    video = video_row(info)
    m = masklet(video.video_id, {i: colored.mask("the square", i) for i in range(24)})
    export_videorefer(_many(10, video, m), str(tmp_path / "warm"))  # imports are not part of the peak
    peaks = {}
    for n in (1500, 6000):
        dataset = _many(n, video, m)
        tracemalloc.start()
        summary = export_videorefer(dataset, str(tmp_path / str(n)))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert summary.files == {str(tmp_path / str(n) / "strefer.json"): n}
        assert len(json.loads((tmp_path / str(n) / "strefer.json").read_text())) == n
    assert peaks[6000] < 1.5 * peaks[1500], peaks


# -- the command -------------------------------------------------------------------------------------------------


def test_engine_export_command_takes_the_new_options(colored, tmp_path):
    info = probe_video(str(colored.path), limits=DecodeLimits())
    video = video_row(info)
    m = masklet(video.video_id, {i: colored.mask("the square", i) for i in range(24)})
    clip = Window(start_frame=12, end_frame=24, start_s=1.0, end_s=2.0)
    rows = {
        "videos": [video],
        "masklets": [m],
        "samples": [
            sample("clip", video, "Describe <region> at <t3>.", "A square.", masklets=[m], frames=[13], window=clip,
                   labels={"time_format": "tokens"}),
            sample("stamp", video, "Describe <region> at 00:00:01.000.", "A square.", masklets=[m], frames=[13],
                   window=clip, labels={"time_format": "timestamp"}),
        ],
    }
    dataset = Dataset(str(tmp_path / "ds"))
    item = ItemRecord(item_id="item", pipeline="strefer", item_key="item", variant="v", source=video.source, status="done",
                      video_id=video.video_id, run_hash="h", write_id="", run_id="", engine_version="", committed_at="")
    with TableWriter(dataset, "run") as writer:
        writer.add(item, rows)
    out = tmp_path / "json"
    result = CliRunner().invoke(app, [
        "export", dataset.url, "--out", str(out), "--cut-clips", "--video-root", str(out), "--time-format", "tokens",
    ])
    assert result.exit_code == 0, result.output
    assert "clips written: 1" in result.output and "other_time_format 1" in result.output
    (entry,) = json.loads((out / "strefer.json").read_text())
    assert entry["id"] == stable_id("clip") and entry["video"].startswith("clips/")
    assert list(entry["annotation"][0]) == ["1"]
    bad = CliRunner().invoke(app, ["export", dataset.url, "--out", str(out), "--time-format", "seconds"])
    assert bad.exit_code == 2
