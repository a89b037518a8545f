"""`engine view`: static HTML pages to look at a dataset's samples, opened from disk (no server, no external
assets).

    OUT/index.html                 every sample written, filterable by pipeline, data type and kept/dropped
    OUT/samples/<sample>.html      its frames with each region's mask over it, and its conversation
    OUT/media/frames/<video>/<frame>.jpg  decoded frames, at the video row's decode size (shared by samples)
    OUT/media/masks/<sample>/<frame>.png  that sample's masks, one color per region, stacked over the frame

A page's frames are the sample's own (`frames`), else those its regions have masks on, else a few spread over
its window, at most MAX_FRAMES of them. Each `<region>` or `[SEG]` token of the conversation names, in order,
one of `masklet_ids`; it is colored like that masklet's mask. A masklet missing from the dataset, a video that
no longer decodes, or tokens that do not match the ids are noted on the page, which is written anyway.

Samples are streamed and only the first `limit` that pass the filters are kept; masklets and videos are looked
up in a temporary SQLite index (engine.lookup), and each video is decoded once, up to the last frame wanted.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from engine.errors import BadInputError
from engine.lookup import VIDEO_COLUMNS, Lookup
from engine.storage import Dataset

DEFAULT_LIMIT = 200
MAX_FRAMES = 8  # frames shown per sample: a page stays quick to open
TOKENS = re.compile(r"<region>|\[SEG\]")
FILL_ALPHA = 0.45  # mask fill opacity: the object stays visible under it
_SAMPLE_COLUMNS = (
    "sample_id", "video_id", "source", "pipeline", "data_type", "task", "labels", "conversation", "masklet_ids",
    "frames", "window", "kept", "review",
)
_VIDEO_COLUMNS = (*VIDEO_COLUMNS, "num_frames", "decode_width", "decode_height")
# The build already accepted each video; the pass here stops at the last frame wanted (DecodeLimits.max_frames).
_MAX_DURATION_S = 24 * 3600.0

# progress(description, done, total)
Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class ViewOptions:
    sample_id: str | None = None
    limit: int = DEFAULT_LIMIT
    pipeline: str | None = None
    data_type: str | None = None
    version: int | None = None  # the dataset version read (None: every committed item)


@dataclass
class ViewSummary:
    index: str = ""  # path of index.html
    pages: int = 0
    frames: int = 0  # frame images written
    limited: bool = False  # more samples matched than `limit`
    notes: Counter = field(default_factory=Counter)  # kind of note -> pages that carry it


@dataclass
class _Region:
    number: int  # 1-based, in order of first mention
    masklet_id: str
    color: tuple[int, int, int]
    expression: str | None = None
    masks: dict[int, dict[str, Any]] = field(default_factory=dict)  # frame index -> RLE (held between tracked)

    @property
    def css(self) -> str:
        return "rgb({}, {}, {})".format(*self.color)

    @property
    def ink(self) -> str:
        r, g, b = self.color  # black on light fills, white on dark ones (BT.601 luma)
        return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


@dataclass
class _Page:
    sample: dict[str, Any]
    video: dict[str, Any] | None
    regions: list[_Region]
    tokens: list[int | None]  # region number of each token of the conversation, in order
    frames: list[int]
    notes: list[tuple[str, str]] = field(default_factory=list)  # (kind, text for a person)


def view(
    dataset_url: str,
    out: str,
    *,
    sample_id: str | None = None,
    limit: int = DEFAULT_LIMIT,
    pipeline: str | None = None,
    data_type: str | None = None,
    version: int | None = None,
    progress: Progress | None = None,
) -> ViewSummary:
    """Write the pages of a published version of the dataset (default: the latest; every committed item where
    none is published yet) under the local folder `out`."""
    if "://" in out:
        raise BadInputError(f"--out must be a local folder (the pages are opened from disk), not {out}")
    if limit < 1:
        raise BadInputError(f"--limit must be at least 1, got {limit}")
    dataset = Dataset(dataset_url)
    version = dataset.reading(version)
    options = ViewOptions(sample_id, limit, pipeline, data_type, version)
    return write_pages(dataset, out, options, progress=progress)


def write_pages(dataset: Dataset, out: str, options: ViewOptions, *, progress: Progress | None = None) -> ViewSummary:
    report = progress or (lambda *_: None)
    samples, limited = _select(dataset, options)
    if options.sample_id is not None and not samples:
        where = f"version {options.version}" if options.version is not None else "the committed items"
        raise BadInputError(f"no sample {options.sample_id!r} in {dataset.url} ({where})")
    summary = ViewSummary(limited=limited)
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="engine-view-") as scratch:
        lookup = Lookup(os.path.join(scratch, "lookup.sqlite"), video_columns=_VIDEO_COLUMNS)
        try:
            lookup.want(i for s in samples for i in s["masklet_ids"])
            lookup.fill(dataset, options.version)
            pages = [_plan(sample, lookup) for sample in samples]
        finally:
            lookup.close()
    times = _write_frames(pages, out, summary, report)
    from jinja2 import Environment, FileSystemLoader

    env = Environment(loader=FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")), autoescape=True)
    sample_template = env.get_template("view_sample.html.j2")
    for k, page in enumerate(pages):
        _write_page(page, out, times, sample_template)
        summary.pages += 1
        summary.notes.update({kind for kind, _ in page.notes})
        report("write pages", k + 1, len(pages))
    summary.index = os.path.join(out, "index.html")
    rows = [_index_row(page) for page in pages]
    html = env.get_template("view_index.html.j2").render(
        dataset=dataset.url, version=options.version, rows=rows, limited=limited, limit=options.limit,
        pipelines=sorted({r["pipeline"] for r in rows}), data_types=sorted({r["data_type"] for r in rows}),
    )
    with open(summary.index, "w", encoding="utf-8") as file:
        file.write(html)
    return summary


def _select(dataset: Dataset, options: ViewOptions) -> tuple[list[dict[str, Any]], bool]:
    """The first `limit` samples that pass the filters (filtered column-wise: the others never become Python
    objects), and whether more matched."""
    import pyarrow.compute as pc

    wanted = {"sample_id": options.sample_id, "pipeline": options.pipeline, "data_type": options.data_type}
    chosen: list[dict[str, Any]] = []
    for batch in dataset.scan("samples", _SAMPLE_COLUMNS, version=options.version, batch_rows=1024):
        for column, value in wanted.items():
            if value is not None and batch.num_rows:
                batch = batch.filter(pc.equal(batch[column], value))
        for sample in batch.to_pylist():
            if len(chosen) == options.limit:
                return chosen, True
            sample["labels"] = dict(sample["labels"] or [])  # an Arrow map reads back as pairs
            chosen.append(sample)
    return chosen, False


def _plan(sample: dict[str, Any], lookup: Lookup) -> _Page:
    """A page's regions, tokens, frames and notes; no pixels yet."""
    from engine.draw import palette
    from engine.export import held_masks

    video = lookup.video(sample["video_id"])
    ids = list(dict.fromkeys(sample["masklet_ids"]))  # several tokens may name one masklet
    colors = palette(len(ids))
    regions = [_Region(n + 1, masklet_id, colors[n]) for n, masklet_id in enumerate(ids)]
    page = _Page(sample, video, regions, tokens=[], frames=[])
    for region in regions:
        found = lookup.masklet(region.masklet_id)
        if found is None:
            page.notes.append(("masklet_missing", f"region {region.number}: masklet {region.masklet_id} is not in the dataset"))
            continue
        track_fps, by_frame = found
        region.expression = lookup.expression(region.masklet_id)
        region.masks = held_masks(by_frame, fps=video["fps"], track_fps=track_fps) if video else by_frame
    number = {r.masklet_id: r.number for r in regions}
    count = sum(len(TOKENS.findall(turn["value"])) for turn in sample["conversation"])
    page.tokens = [number[i] for i in sample["masklet_ids"][:count]] + [None] * (count - len(sample["masklet_ids"]))
    if count != len(sample["masklet_ids"]):
        page.notes.append((
            "token_mismatch",
            f"the conversation has {count} <region>/[SEG] tokens but the sample names {len(sample['masklet_ids'])} masklets",
        ))
    if video is None:
        page.notes.append(("video_missing", f"video {sample['video_id']} is not in the dataset: no frames to show"))
        return page
    page.frames = _frames(sample, video, regions)
    return page


def _frames(sample: dict[str, Any], video: dict[str, Any], regions: list[_Region]) -> list[int]:
    """The sample's frames, else those its regions have masks on (inside its window), else a few spread over the
    window or the video; at most MAX_FRAMES, evenly picked."""
    window = sample["window"]
    if window:
        start, end = window["start_frame"], window["end_frame"]
    else:
        start = round((video["start_s"] or 0.0) * video["fps"])
        end = start + video["num_frames"]
    frames = sorted(set(sample["frames"]))
    if not frames:
        frames = sorted({i for r in regions for i in r.masks if start <= i < end})
    if not frames:
        frames = list(range(start, end))
    if len(frames) > MAX_FRAMES:
        picks = np.linspace(0, len(frames) - 1, MAX_FRAMES).round().astype(int)
        frames = [frames[k] for k in dict.fromkeys(picks.tolist())]
    return frames


class _FrameWriter:
    """Frame consumer: writes each wanted frame as a JPEG at the video row's decode size."""

    def __init__(self, folder: str, wanted: set[int], width: int, height: int) -> None:
        self.folder, self.wanted, self.size = folder, wanted, (width, height)
        self.times: dict[int, float] = {}

    def wants(self, index: int, time: float) -> bool:
        return index in self.wanted

    def consume(self, index: int, time: float, frame: np.ndarray) -> None:
        import cv2

        if (frame.shape[1], frame.shape[0]) != self.size:  # the build's decode bound rounded otherwise
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        path = os.path.join(self.folder, f"{index}.jpg")
        if not cv2.imwrite(path, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise OSError(f"could not write {path}")
        self.times[index] = time


def _write_frames(pages: list[_Page], out: str, summary: ViewSummary, report: Progress) -> dict[str, dict[int, float]]:
    """Decode each video once, up to the last frame any page wants; returns video id -> frame index -> time.
    A video that no longer decodes leaves a note on its pages."""
    from engine.decode import DecodeLimits, decode_video
    from engine.probe import probe_video

    wanted: dict[str, set[int]] = defaultdict(set)
    for page in pages:
        if page.frames:
            wanted[page.sample["video_id"]].update(page.frames)
    times: dict[str, dict[int, float]] = {}
    failed: dict[str, str] = {}  # video id -> why it did not decode
    stopped: dict[str, str] = {}  # video id -> why frames past the pass's end would be missing
    for k, (video_id, frames) in enumerate(wanted.items()):
        video = next(p.video for p in pages if p.sample["video_id"] == video_id)
        folder = os.path.join(out, "media", "frames", _safe(video_id))
        os.makedirs(folder, exist_ok=True)
        writer = _FrameWriter(folder, frames, video["decode_width"], video["decode_height"])
        limits = DecodeLimits(
            max_side=max(video["decode_width"], video["decode_height"], 16),
            max_duration_s=_MAX_DURATION_S,
            max_frames=max(frames) + 1,
        )
        try:
            info = probe_video(video["source"], limits=limits, frame_rate=video["fps"])
            stopped[video_id] = decode_video(info, [writer]).error or "they lie past the end of the video"
        except (BadInputError, OSError) as exc:  # gone, unreadable, or now out of bounds
            failed[video_id] = str(exc).splitlines()[0]
        times[video_id] = writer.times
        summary.frames += len(writer.times)
        report("decode frames", k + 1, len(wanted))
    for page in pages:
        video_id = page.sample["video_id"]
        absent = [i for i in page.frames if i not in times.get(video_id, {})]
        if video_id in failed:
            page.notes.append(("video_unreadable", f"frames could not be decoded: {failed[video_id]}"))
        elif absent:
            page.notes.append(("frames_missing", f"frames {_few(absent)} were not decoded: {stopped[video_id]}"))
    return times


def _write_page(page: _Page, out: str, times: dict[str, dict[int, float]], template: Any) -> None:
    sample = page.sample
    decoded = times.get(sample["video_id"], {})
    frames = []
    for index in page.frames:
        if index not in decoded:
            continue
        overlay, tags = _overlay(page, index, out)
        frames.append({
            "index": index,
            "time": decoded[index],
            "image": f"../media/frames/{_safe(sample['video_id'])}/{index}.jpg",
            "overlay": overlay,
            "tags": tags,
        })
    html = template.render(
        sample=sample,
        regions=page.regions,
        frames=frames,
        turns=_turns(sample["conversation"], page),
        notes=[text for _, text in page.notes],
        source=page.video["source"] if page.video else sample["source"],
    )
    with open(os.path.join(out, "samples", f"{_safe(sample['sample_id'])}.html"), "w", encoding="utf-8") as file:
        file.write(html)


def _overlay(page: _Page, index: int, out: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The page's masks on frame `index` as one RGBA PNG (each region filled in its color, its edge opaque),
    and a tag per region at its box's top-left corner, in percent of the frame."""
    import cv2

    from engine import masks
    from engine.export_media import resize_rle
    from schemas.records import Rle

    width, height = page.video["decode_width"], page.video["decode_height"]
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    tags = []
    for region in page.regions:
        rle = region.masks.get(index)
        if rle is None:
            continue
        mask = masks.decode(Rle(**resize_rle(rle, height, width)))  # masks are at the decode size; guard anyway
        box = masks.mask_box(mask)
        if box is None:
            continue
        edge = mask & ~_eroded(mask)
        rgba[mask] = (*region.color, round(255 * FILL_ALPHA))
        rgba[edge] = (*region.color, 255)
        tags.append({
            "region": region, "left": 100 * box[0] / width, "top": 100 * box[1] / height,
        })
    if not tags:
        return None, []
    name = f"media/masks/{_safe(page.sample['sample_id'])}/{index}.png"
    os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
    if not cv2.imwrite(os.path.join(out, name), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)):
        raise OSError(f"could not write {os.path.join(out, name)}")
    return f"../{name}", tags


def _eroded(mask: np.ndarray) -> np.ndarray:
    """`mask` shrunk by one pixel (4-neighbourhood), without cv2's morphology border rules."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _turns(conversation: list[dict[str, str]], page: _Page) -> list[dict[str, Any]]:
    """Each turn as text parts and token parts; a token part carries the region it names (None: no masklet)."""
    regions = {r.number: r for r in page.regions}
    numbers: Iterator[int | None] = iter(page.tokens)
    turns = []
    for turn in conversation:
        parts: list[dict[str, Any]] = []
        last = 0
        for match in TOKENS.finditer(turn["value"]):
            parts.append({"text": turn["value"][last : match.start()]})
            number = next(numbers, None)
            parts.append({"token": match.group(), "region": regions.get(number) if number else None})
            last = match.end()
        parts.append({"text": turn["value"][last:]})
        turns.append({"role": turn["role"], "parts": parts})
    return turns


def _index_row(page: _Page) -> dict[str, Any]:
    sample = page.sample
    first = next((t["value"] for t in sample["conversation"] if t["role"] == "human"), "")
    first = first.replace("<video>", "").strip()
    return {
        "href": f"samples/{_safe(sample['sample_id'])}.html",
        "sample_id": sample["sample_id"],
        "pipeline": sample["pipeline"],
        "data_type": sample["data_type"],
        "task": sample["task"] or "",
        "kept": sample["kept"],
        "regions": len(page.regions),
        "question": first if len(first) <= 140 else first[:139] + "…",
        "notes": len(page.notes),
    }


def _safe(name: str) -> str:
    """A file name for an id: the id itself when it is plain, else its hash (ids are untrusted text)."""
    from engine.ids import stable_id

    return name if re.fullmatch(r"[A-Za-z0-9_-]{1,100}", name) else stable_id(name)


def _few(indexes: list[int]) -> str:
    return ", ".join(str(i) for i in indexes[:5]) + (", ..." if len(indexes) > 5 else "")
