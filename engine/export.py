"""Exporters: training formats people already use, written from a dataset's committed rows.

`engine export --format F` writes one of (each format's module documents its layout):
- `videorefer` (engine/export_videorefer.py): VideoRefer-700K JSON, `<out>/<data_type>.json`;
- `sama` (engine/export_sama.py): SAMA-239K style JSON, `<out>/sama/<data_type>.json` and
  `<out>/sama/mask_dict.json`;
- `ufvideo` (engine/export_ufvideo.py): UFVideo JSON, `<out>/ufvideo/<data_type>.json`;
- `hf` (engine/export_hf.py): Parquet files and a dataset card that `datasets.load_dataset("<out>/hf")` reads.

What every format shares, here:
- `video`: the source as the build read it, or relative to `video_root` (the trainer joins it to its data
  folder). With `cut_clips`, a sample about a clip or window points at that clip, written under
  `<out>/clips/` (a video file: H.264 at the source's display size) or `<out>/frames/` (a frame folder).
- `start`, `end`: seconds of `video` that the sample is about, on every sample whose scope is a clip or a
  window (Strefer's clip-level tasks, a caption manifest's start/end); left out where `video` is that clip.
- Frame indexes are of `video` as a trainer's loader counts them: of the whole source, or from the clip's
  first frame. A frame folder whose frames a text sort of its entries would list in another order (0.jpg,
  1.jpg, 10.jpg, ...; a stray .DS_Store) is written anew in that order with `cut_clips`, else its samples are
  left out (`frame_order_differs`).
- Masks (COCO RLE) are at the size of the frames a trainer decodes from `video` (`height` x `width`): a
  source larger than the build's decode bound has its masks scaled up, once, here; otherwise they are copied
  bit for bit. A masklet is exported only inside the sample's scope; one with no mask there leaves the sample
  out (`region_outside_scope`). Where a format holds masks, a frame the tracker skipped holds the mask of the
  nearest tracked frame, within half a tracking interval (`held_masks`).
- A format with data types of its own (sama, ufvideo) leaves the others out (`other_data_type`). Samples a
  check dropped are left out unless `include_dropped`; a sample written in both time forms (Strefer)
  is exported in the form `time_format` names. Every sample left out is counted by reason (`ExportSummary`).

Samples are streamed (`Dataset.scan`); the videos and the masklets they name are looked up in a temporary
SQLite index filled in one streamed pass over each table, and every file is written entry by entry, so the
export's memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import import_module
from typing import Any, Callable, Collection, Iterable, Iterator, TypeVar

from engine.errors import BadInputError, VideoError
from engine.probe import FRAME_FOLDER_CODEC
from engine.export_media import ClipFile, Span, cut_video, loader_order_matches, resize_rle, write_frame_folder
from engine.lookup import Lookup
from engine.storage import Dataset

# Format name -> the module whose `export_<name>(dataset, out, options)` writes it (imported when used).
FORMATS = {
    "videorefer": "engine.export_videorefer",
    "sama": "engine.export_sama",
    "ufvideo": "engine.export_ufvideo",
    "hf": "engine.export_hf",
}
# Format name -> what it writes, in a line (the command's help).
FORMAT_HELP = {
    "videorefer": "VideoRefer-700K JSON, OUT/<data type>.json",
    "sama": "SAMA-239K style JSON and its mask dictionary, OUT/sama/",
    "ufvideo": "UFVideo JSON, OUT/ufvideo/",
    "hf": 'Parquet and a dataset card that datasets.load_dataset("OUT/hf") reads, OUT/hf/',
}
FRAME_CHOICES = ("sample", "tracked", "all")
TIME_FORMATS = ("timestamp", "tokens")
TOKENS = re.compile(r"<region>|\[SEG\]")  # the tokens `masklet_ids` answers, in order over the conversation
# What a person can do about a reason samples were left out.
HINTS = {
    "frame_order_differs": "their frame folders list in another order for the trainer's loader (a text sort of "
    "every file); rerun with --cut-clips to write those frames in the loader's order",
    "outside_video_root": "their video lies outside --video-root",
    "labels_missing": "UFVideo samples need the labels prompt_frame (with <region>) and label_frames (with [SEG])",
}
_SAMPLE_COLUMNS = (
    "sample_id", "video_id", "pipeline", "data_type", "task", "labels", "conversation", "masklet_ids", "frames",
    "window", "kept", "provenance", "refers_to",
)
T = TypeVar("T")


@dataclass
class ExportSummary:
    files: dict[str, int] = field(default_factory=dict)  # path -> entries (rows for Parquet)
    skipped: Counter = field(default_factory=Counter)  # reason -> samples left out
    clips: int = 0  # clip files and frame folders written


@dataclass(frozen=True)
class ExportOptions:
    include_dropped: bool = False
    frames: str = "sample"  # videorefer, hf: which frames a token's masks are on
    cut_clips: bool = False
    video_root: str | None = None
    time_format: str = "timestamp"
    version: int | None = None  # the dataset version read (None: every committed item)


class Skip(Exception):
    """A sample left out, and why (a short machine-friendly reason, counted in the summary)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def export(
    dataset_url: str,
    out: str,
    *,
    fmt: str = "videorefer",
    include_dropped: bool = False,
    frames: str = "sample",
    cut_clips: bool = False,
    video_root: str | None = None,
    time_format: str = "timestamp",
    version: int | None = None,
) -> ExportSummary:
    """Export a published version of the dataset (default: the latest; every committed item where none is
    published yet), so an export never sees a run still writing."""
    if fmt not in FORMATS:
        raise BadInputError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    if frames not in FRAME_CHOICES:
        raise BadInputError(f"unknown frames choice {frames!r}; choose from {', '.join(FRAME_CHOICES)}")
    if time_format not in TIME_FORMATS:
        raise BadInputError(f"unknown time format {time_format!r}; choose from {', '.join(TIME_FORMATS)}")
    dataset = Dataset(dataset_url)
    version = dataset.reading(version)
    options = ExportOptions(include_dropped, frames, cut_clips, video_root, time_format, version)
    writer = getattr(import_module(FORMATS[fmt]), f"export_{fmt}")
    return writer(dataset, out, options)


def held_masks(masked: dict[int, Any], *, fps: float, track_fps: float | None) -> dict[int, Any]:
    """`masked` (frame index -> mask) with each frame between tracked ones holding its nearest tracked
    frame's mask, when that one lies within half a tracking interval (ties go to the earlier frame)."""
    if not masked or not track_fps or track_fps >= fps:
        return dict(masked)
    reach = int(fps / track_fps) // 2
    out = {}
    for i in range(min(masked) - reach, max(masked) + reach + 1):
        near = next((j for d in range(reach + 1) for j in (i - d, i + d) if j in masked), None)
        if near is not None and i >= 0:
            out[i] = masked[near]
    return out


def tokens(sample: dict[str, Any]) -> list[str]:
    """The `<region>` and `[SEG]` tokens of the whole conversation, in order; one masklet id each, or the
    sample is left out."""
    found = [m.group() for turn in sample["conversation"] for m in TOKENS.finditer(turn["value"])]
    if len(found) != len(sample["masklet_ids"]):
        raise Skip("region_count_mismatch")
    return found


def conversations(sample: dict[str, Any]) -> list[dict[str, str]]:
    return [{"from": t["role"], "value": t["value"]} for t in sample["conversation"]]


def safe_name(name: str) -> str:
    """A data type or pipeline name as a file name: never a path."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "_"


@dataclass(frozen=True)
class Target:
    """What an entry points at: `video`, the source frame its frame 0 is, the frames it holds (None: all) and
    the size a trainer decodes them at."""

    video: str
    first_index: int
    num_frames: int | None
    height: int
    width: int
    cut: bool

    def holds(self, index: int) -> bool:
        return self.first_index <= index and (self.num_frames is None or index < self.first_index + self.num_frames)


@dataclass(frozen=True)
class Placement:
    """Where a sample's entry points: `video` as written (relative to the video root where given), the file
    behind it, the sample's scope in source frames and seconds, and its video row."""

    video: str
    target: Target
    span: Span | None
    row: dict[str, Any]

    def inside(self, index: int) -> bool:
        """Whether source frame `index` lies in the sample's scope and in the file the entry points at."""
        return (self.span is None or self.span.holds(index)) and self.target.holds(index)

    def times(self) -> dict[str, float]:
        """`start`/`end` of the scope in seconds of `video`, where `video` is not the clip itself."""
        if self.span is None or self.target.cut:
            return {}
        return {"start": self.span.start_s, "end": self.span.end_s}


class Index(Lookup):
    """The shared lookup of videos and masklets, plus what one export has written: its clips, and the keys of a
    mask dictionary's entries."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.db.executescript(
            "CREATE TABLE clips (path TEXT PRIMARY KEY, clip TEXT);"
            "CREATE TABLE keys (key TEXT PRIMARY KEY) WITHOUT ROWID;"
        )

    def want_samples(self, dataset: Dataset, include_dropped: bool, version: int | None) -> None:
        """Want the masklets of every exported sample."""
        import pyarrow.compute as pc

        for batch in dataset.scan("samples", ["masklet_ids", "kept"], version=version):
            ids = batch.column("masklet_ids")
            self.want(pc.list_flatten(ids if include_dropped else ids.filter(batch.column("kept"))).to_pylist())

    def clip(self, path: str) -> ClipFile | None | str:
        """The clip written at `path` earlier in this export, or why it could not be written."""
        row = self.db.execute("SELECT clip FROM clips WHERE path = ?", (path,)).fetchone()
        if row is None:
            return None
        value = json.loads(row[0])
        return value if isinstance(value, str) else ClipFile(**value)

    def add_clip(self, path: str, clip: ClipFile | str) -> None:
        value = clip if isinstance(clip, str) else clip.__dict__
        self.db.execute("INSERT OR REPLACE INTO clips VALUES (?, ?)", (path, json.dumps(value)))

    def known(self, key: str) -> bool:
        """Whether `key` was added earlier in this export (a mask dictionary's entry written once)."""
        return self.db.execute("SELECT 1 FROM keys WHERE key = ?", (key,)).fetchone() is not None

    def add_key(self, key: str) -> bool:
        """Adds `key`; False where it was there already."""
        return self.db.execute("INSERT OR IGNORE INTO keys VALUES (?)", (key,)).rowcount == 1

class ExportRun:
    """One export in progress, whatever its format: the output folder, the index, the summary, and how a
    sample's video and masks resolve. A format streams `entries(build)` and writes what `build` returns."""

    def __init__(self, dataset: Dataset, fs: Any, root: str, options: ExportOptions, index: Index) -> None:
        self.dataset, self.fs, self.root, self.options, self.index = dataset, fs, root, options, index
        self.summary = ExportSummary()
        # Samples of one video are stored together: a few cached lookups and folder listings cover them.
        self.video = lru_cache(maxsize=64)(index.video)
        self.masklet = lru_cache(maxsize=32)(index.masklet)
        self.order_matches = lru_cache(maxsize=64)(loader_order_matches)

    def entries(
        self, build: Callable[[dict[str, Any]], T], data_types: Collection[str] | None = None
    ) -> Iterator[tuple[dict[str, Any], T]]:
        """(sample, build(sample)) for every sample exported (of `data_types`, where the format has its own); a
        sample left out is counted, not yielded."""
        for batch in self.dataset.scan("samples", _SAMPLE_COLUMNS, version=self.options.version, batch_rows=1024):
            for sample in batch.to_pylist():
                sample["labels"] = dict(sample["labels"] or [])  # an Arrow map reads back as pairs
                try:
                    if data_types is not None and sample["data_type"] not in data_types:
                        raise Skip("other_data_type")
                    self._check(sample)
                    yield sample, build(sample)
                except Skip as skip:
                    self.summary.skipped[skip.reason] += 1

    def _check(self, sample: dict[str, Any]) -> None:
        if not sample["kept"] and not self.options.include_dropped:
            raise Skip("dropped_by_reviewer")
        if sample["labels"].get("time_format", self.options.time_format) != self.options.time_format:
            raise Skip("other_time_format")

    def place(self, sample: dict[str, Any]) -> Placement:
        video = self.video(sample["video_id"])
        if video is None:
            raise Skip("video_missing")
        span = _span(sample, video)
        target = self._target(video, span)
        path = _relative(target.video, self.options.video_root)
        if path is None:
            raise Skip("outside_video_root")
        return Placement(path, target, span, video)

    def masks(
        self, masklet_id: str, frames: Iterable[int] | None, place: Placement, *, hold: bool, missing: str = "region_outside_scope"
    ) -> dict[int, dict[str, Any]]:
        """A masklet's masks on `frames` (source frame indexes, in that order; None: every frame it has a mask
        on), where they lie in scope and it has one (held, with `hold`): frame index of `place.video` -> RLE at
        the size a trainer decodes. None found leaves the sample out, for reason `missing`."""
        found = self.masklet(masklet_id)
        if found is None:
            raise Skip("masklet_missing")
        track_fps, by_frame = found
        if not by_frame:
            raise Skip("region_without_mask")
        if hold:
            by_frame = held_masks(by_frame, fps=place.row["fps"], track_fps=track_fps)
        chosen = sorted(by_frame) if frames is None else frames
        target = place.target
        out = {
            i - target.first_index: resize_rle(by_frame[i], target.height, target.width)
            for i in chosen
            if i in by_frame and place.inside(i)
        }
        if not out:
            raise Skip(missing)
        return out

    def _target(self, video: dict[str, Any], span: Span | None) -> Target:
        source = video["source"]
        folder = video["codec"] == FRAME_FOLDER_CODEC
        if folder:
            try:
                in_order = self.order_matches(source)
            except OSError:
                raise Skip("frame_folder_unreadable") from None
            if not in_order and not self.options.cut_clips:
                raise Skip("frame_order_differs")
        if not self.options.cut_clips or (span is None and (not folder or in_order)):
            return Target(source, 0, None, video["height"], video["width"], cut=False)
        clip = self._clip(video, span, folder)
        if isinstance(clip, str):
            raise Skip(clip)
        return Target(clip.path, clip.first_index, clip.num_frames, clip.height, clip.width, cut=True)

    def _clip(self, video: dict[str, Any], span: Span | None, folder: bool) -> ClipFile | str:
        """The clip of `span` (None: the whole source, a frame folder in another order), written once."""
        if span is None:
            name = video["video_id"]
        elif span.start_frame is not None:
            name = f"{video['video_id']}-f{span.start_frame}-{span.end_frame}"
        else:
            name = f"{video['video_id']}-s{span.start_s:.3f}-{span.end_s:.3f}"
        path = os.path.join(self.root, "frames", name) if folder else os.path.join(self.root, "clips", f"{name}.mp4")
        known = self.index.clip(path)
        if known is not None:
            return known
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            if folder:
                clip: ClipFile | str = write_frame_folder(video["source"], path, span, video["fps"])
            else:
                clip = cut_video(video["source"], path, span)
            self.summary.clips += 1
        except (VideoError, OSError, ValueError):
            clip = "clip_not_written"  # the source is gone, unreadable, or has no frame in the window
        self.index.add_clip(path, clip)
        return clip


@contextmanager
def export_run(dataset: Dataset, out: str, options: ExportOptions) -> Iterator[ExportRun]:
    """An export into folder `out` (local or fsspec URL), its index filled; the index is gone afterwards."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(out)
    if options.cut_clips and not isinstance(fs, LocalFileSystem):
        raise BadInputError(f"--cut-clips writes video files with PyAV: give a local folder, not {out}")
    fs.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="engine-export-") as scratch:
        index = Index(os.path.join(scratch, "index.sqlite"))
        try:
            index.want_samples(dataset, options.include_dropped, options.version)
            index.fill(dataset, options.version)
            yield ExportRun(dataset, fs, root.rstrip("/"), options, index)
        finally:
            index.close()


def _span(sample: dict[str, Any], video: dict[str, Any]) -> Span | None:
    """The clip or window a sample is about: its own window, else its video row's (a manifest's start/end);
    None for a whole file."""
    window = sample.get("window")
    if window:
        return Span(window["start_s"], window["end_s"], window["start_frame"], window["end_frame"])
    if video["start_s"] is None and video["end_s"] is None:
        return None
    start = video["start_s"] or 0.0
    return Span(start, video["end_s"] if video["end_s"] is not None else start + video["duration_s"])


def _relative(path: str, root: str | None) -> str | None:
    """`path` relative to `root` (None when it lies outside); `path` itself without a root."""
    if root is None:
        return path
    if "://" in path or "://" in root:
        prefix = root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else None
    path, root = os.path.abspath(path), os.path.abspath(root)
    if os.path.commonpath([path, root]) != root:
        return None
    return os.path.relpath(path, root)


class JsonFiles:
    """JSON files under one folder, written entry by entry to `<name>.json.partial` and renamed when complete
    (a failed export leaves no file that looks whole): arrays (`append`) and objects (`put`)."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root
        self.files: dict[str, tuple[Any, str]] = {}  # path -> (file, closing bracket)
        self.counts: dict[str, int] = {}

    def append(self, name: str, entry: Any) -> None:
        self._write(name, "[]", json.dumps(entry))

    def put(self, name: str, key: str, value: Any) -> None:
        self._write(name, "{}", f"{json.dumps(key)}: {json.dumps(value)}")

    def _write(self, name: str, brackets: str, text: str) -> None:
        path = f"{self.root}/{safe_name(name)}.json"
        if path not in self.files:
            self.fs.makedirs(self.root, exist_ok=True)
            file = self.fs.open(f"{path}.partial", "w")
            file.write(brackets[0] + "\n")
            self.files[path], self.counts[path] = (file, brackets[1]), 0
        elif self.counts[path]:
            self.files[path][0].write(",\n")
        self.files[path][0].write(text)
        self.counts[path] += 1

    def __enter__(self) -> "JsonFiles":
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        for path, (file, closing) in self.files.items():
            if kind is None:
                file.write(f"\n{closing}\n")
            file.close()
            if kind is None:
                self.fs.mv(f"{path}.partial", path)
            else:
                self.fs.rm(f"{path}.partial")
