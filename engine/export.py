"""Exporters: training formats people already use, written from a dataset's committed rows.

`videorefer`: the JSON VideoRefer's training code reads (VideoRefer-700K), one file per data type:
    [{"id", "video", "conversations": [{"from": "human", "value": "<video>\\n...<region>..."},
                                       {"from": "gpt", "value": "..."}],
      "annotation": [{"<frame_idx>": {"segmentation": <COCO RLE>}, ...}, ... one per <region>, in order],
      "height", "width", "start", "end"}]
- `video`: the source as the build read it, or relative to `video_root` (the trainer joins it to its data
  folder). With `cut_clips`, a sample about a clip or window points at that clip, written under
  `<out>/clips/` (a video file: H.264 at the source's display size) or `<out>/frames/` (a frame folder).
- `start`, `end`: seconds of `video` that the sample is about, on every sample whose scope is a clip or a
  window (Strefer's clip-level tasks, a caption manifest's start/end); left out where `video` is that clip.
- Annotation keys are frame indexes of `video` as the trainer's loader counts them: of the whole source, or
  from the clip's first frame. A frame folder whose frames a text sort of its entries would list in another
  order (0.jpg, 1.jpg, 10.jpg, ...; a stray .DS_Store) is written anew in that order with `cut_clips`, else
  its samples are left out (`frame_order_differs`).
- Masks are at the size of the frames the trainer decodes from `video` (`height` x `width`): a source larger
  than the build's decode bound has its masks scaled up, once, here; otherwise they are copied bit for bit.
- A region is annotated only inside the sample's scope; a region with no mask there leaves the sample out
  (`region_outside_scope`).

Which frames each region is annotated on (`frames`):
- `sample`: the frames the sample names (its keyframes), as VideoRefer-700K does;
- `tracked`: every frame the masklet has a mask on (the tracker ran at the masklet's `track_fps`);
- `all`: every decoded frame: a frame the tracker skipped holds the mask of the nearest tracked frame, when
  one lies within half a tracking interval (so a frame is never filled across an absence). Set
  `masklets.track_fps: 0` to track every frame instead of holding masks.

Samples are streamed (`Dataset.scan`); the videos and the masklets they name are looked up in a temporary
SQLite index filled in one streamed pass over each table, and every file is written entry by entry, so the
export's memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

from engine.errors import BadInputError, VideoError
from engine.export_media import ClipFile, Span, cut_video, loader_order_matches, resize_rle, write_frame_folder
from engine.lookup import Lookup
from engine.storage import Dataset

FORMATS = ("videorefer",)
FRAME_CHOICES = ("sample", "tracked", "all")
TIME_FORMATS = ("timestamp", "tokens")
REGION = "<region>"
FRAME_FOLDER_CODEC = "image-sequence"  # engine.probe's codec of a folder of frames
# What a person can do about a reason samples were left out.
HINTS = {
    "frame_order_differs": "their frame folders list in another order for the trainer's loader (a text sort of "
    "every file); rerun with --cut-clips to write those frames in the loader's order",
    "outside_video_root": "their video lies outside --video-root",
}
_SAMPLE_COLUMNS = (
    "sample_id", "video_id", "data_type", "labels", "conversation", "masklet_ids", "frames", "window", "kept"
)


@dataclass
class ExportSummary:
    files: dict[str, int] = field(default_factory=dict)  # path -> entries
    skipped: Counter = field(default_factory=Counter)  # reason -> samples left out
    clips: int = 0  # clip files and frame folders written


@dataclass(frozen=True)
class ExportOptions:
    include_dropped: bool = False
    frames: str = "sample"
    cut_clips: bool = False
    video_root: str | None = None
    time_format: str = "timestamp"
    version: int | None = None  # the dataset version read (None: every committed item)


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
    dataset.require()
    if version is None:
        version = dataset.latest_version()
    dataset.table_versions(version)  # an unknown version: one line, before anything is written
    options = ExportOptions(include_dropped, frames, cut_clips, video_root, time_format, version)
    return export_videorefer(dataset, out, options)


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


def export_videorefer(dataset: Dataset, out: str, options: ExportOptions = ExportOptions()) -> ExportSummary:
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(out)
    if options.cut_clips and not isinstance(fs, LocalFileSystem):
        raise BadInputError(f"--cut-clips writes video files with PyAV: give a local folder, not {out}")
    fs.makedirs(root, exist_ok=True)
    summary = ExportSummary()
    with tempfile.TemporaryDirectory(prefix="engine-export-") as scratch:
        index = _Index(os.path.join(scratch, "index.sqlite"))
        try:
            index.want_samples(dataset, options.include_dropped, options.version)
            index.fill(dataset, options.version)
            with _JsonArrays(fs, root.rstrip("/")) as files:
                entries = _Entries(index, summary, options, root.rstrip("/"))
                for sample in _samples(dataset, options.version):
                    entry = entries.entry(sample)
                    if entry is not None:
                        files.write(sample["data_type"], entry)
            summary.files = files.counts
        finally:
            index.close()
    return summary


def _samples(dataset: Dataset, version: int | None) -> Iterator[dict[str, Any]]:
    for batch in dataset.scan("samples", _SAMPLE_COLUMNS, version=version, batch_rows=1024):
        for sample in batch.to_pylist():
            sample["labels"] = dict(sample["labels"] or [])  # an Arrow map reads back as pairs
            yield sample


class _Index(Lookup):
    """The shared lookup, plus the clips this export has written."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.db.execute("CREATE TABLE clips (path TEXT PRIMARY KEY, clip TEXT)")

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

    def close(self) -> None:
        self.db.close()


@dataclass(frozen=True)
class _Target:
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


class _Entries:
    def __init__(self, index: _Index, summary: ExportSummary, options: ExportOptions, out: str) -> None:
        self.summary, self.options, self.out = summary, options, out
        self.index = index
        # Samples of one video are stored together: a few cached lookups and folder listings cover them.
        self.video = lru_cache(maxsize=64)(index.video)
        self.masklet = lru_cache(maxsize=32)(index.masklet)
        self.order_matches = lru_cache(maxsize=64)(loader_order_matches)

    def entry(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        reason, entry = self._entry(sample)
        if reason:
            self.summary.skipped[reason] += 1
        return entry

    def _entry(self, sample: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        if not sample["kept"] and not self.options.include_dropped:
            return "dropped_by_reviewer", None
        if sample["labels"].get("time_format", self.options.time_format) != self.options.time_format:
            return "other_time_format", None
        video = self.video(sample["video_id"])
        if video is None:
            return "video_missing", None
        regions = sum(t["value"].count(REGION) for t in sample["conversation"] if t["role"] == "human")
        if regions != len(sample["masklet_ids"]):
            return "region_count_mismatch", None
        span = _span(sample, video)
        reason, target = self._target(video, span)
        if target is None:
            return reason, None
        path = _relative(target.video, self.options.video_root)
        if path is None:
            return "outside_video_root", None
        annotation = []
        for masklet_id in sample["masklet_ids"]:
            reason, frames = self._region(masklet_id, sample, video, span, target)
            if frames is None:
                return reason, None
            annotation.append(frames)
        entry = {
            "id": sample["sample_id"],
            "video": path,
            "conversations": [{"from": t["role"], "value": t["value"]} for t in sample["conversation"]],
            "annotation": annotation,
            "height": target.height,
            "width": target.width,
        }
        if span is not None and not target.cut:
            entry["start"], entry["end"] = span.start_s, span.end_s
        return None, entry

    def _target(self, video: dict[str, Any], span: Span | None) -> tuple[str | None, _Target | None]:
        source = video["source"]
        folder = video["codec"] == FRAME_FOLDER_CODEC
        if folder:
            try:
                in_order = self.order_matches(source)
            except OSError:
                return "frame_folder_unreadable", None
            if not in_order and not self.options.cut_clips:
                return "frame_order_differs", None
        if not self.options.cut_clips or (span is None and (not folder or in_order)):
            return None, _Target(source, 0, None, video["height"], video["width"], cut=False)
        clip = self._clip(video, span, folder)
        if isinstance(clip, str):
            return clip, None
        return None, _Target(clip.path, clip.first_index, clip.num_frames, clip.height, clip.width, cut=True)

    def _clip(self, video: dict[str, Any], span: Span | None, folder: bool) -> ClipFile | str:
        """The clip of `span` (None: the whole source, a frame folder in another order), written once."""
        if span is None:
            name = video["video_id"]
        elif span.start_frame is not None:
            name = f"{video['video_id']}-f{span.start_frame}-{span.end_frame}"
        else:
            name = f"{video['video_id']}-s{span.start_s:.3f}-{span.end_s:.3f}"
        path = os.path.join(self.out, "frames", name) if folder else os.path.join(self.out, "clips", f"{name}.mp4")
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

    def _region(
        self, masklet_id: str, sample: dict[str, Any], video: dict[str, Any], span: Span | None, target: _Target
    ) -> tuple[str | None, dict[str, Any] | None]:
        found = self.masklet(masklet_id)
        if found is None:
            return "masklet_missing", None
        track_fps, by_frame = found
        if not by_frame:
            return "region_without_mask", None
        if self.options.frames == "all":
            by_frame = held_masks(by_frame, fps=video["fps"], track_fps=track_fps)
        chosen = sample["frames"] if self.options.frames == "sample" else sorted(by_frame)
        # Only frames inside the sample's scope, and inside the clip the entry points at.
        frames = [i for i in chosen if i in by_frame and (span is None or span.holds(i)) and target.holds(i)]
        if not frames:
            return "region_outside_scope", None
        return None, {
            str(i - target.first_index): {"segmentation": resize_rle(by_frame[i], target.height, target.width)}
            for i in frames
        }


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


class _JsonArrays:
    """One JSON array per data type, written entry by entry to `<name>.json.partial` and renamed when complete
    (a failed export leaves no file that looks whole)."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root
        self.files: dict[str, Any] = {}  # one per data type
        self.counts: dict[str, int] = {}

    def write(self, data_type: str, entry: dict[str, Any]) -> None:
        path = f"{self.root}/{data_type}.json"
        if path not in self.files:
            self.files[path] = self.fs.open(f"{path}.partial", "w")
            self.files[path].write("[\n")
            self.counts[path] = 0
        elif self.counts[path]:
            self.files[path].write(",\n")
        self.files[path].write(json.dumps(entry))
        self.counts[path] += 1

    def __enter__(self) -> "_JsonArrays":
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        for path, file in self.files.items():
            if kind is None:
                file.write("\n]\n")
            file.close()
            if kind is None:
                self.fs.mv(f"{path}.partial", path)
            else:
                self.fs.rm(f"{path}.partial")
