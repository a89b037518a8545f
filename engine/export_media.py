"""What an exporter writes besides JSON: clips cut from their source, frame folders in the order a trainer's
loader reads them, and masks at the size of the frames that loader decodes.

VideoRefer's loader opens a video file by frame index (all frames, stored size) and a folder of frames as
`sorted(os.listdir(folder))`: a plain text sort in which every file counts. The engine numbers a folder's
frames by `engine.probe.list_frame_images` (numbers by value, hidden files skipped), so the two agree only
when the folder holds nothing else and its names sort the same both ways.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from engine.decode import DecodeLimits, decode_video
from engine.probe import list_frame_images, probe_video

# A clip is cut from frames at their stored size: no bound on resolution or length beyond the build's own.
_FULL_SIZE = DecodeLimits(max_side=1 << 16, max_duration_s=math.inf)


@dataclass(frozen=True)
class Span:
    """Frames [start_frame, end_frame) of a source (None: not known, find them from the seconds), seconds
    [start_s, end_s)."""

    start_s: float
    end_s: float
    start_frame: int | None = None
    end_frame: int | None = None

    def holds(self, index: int) -> bool:
        return self.start_frame is None or self.start_frame <= index < (self.end_frame or math.inf)


@dataclass(frozen=True)
class ClipFile:
    """A clip written for a trainer: its frame 0 is frame `first_index` of the source."""

    path: str
    first_index: int
    num_frames: int
    height: int
    width: int


def loader_order_matches(folder: str) -> bool:
    """Whether a text sort of every entry of `folder` lists exactly the engine's frames, in the engine's order."""
    return sorted(os.listdir(folder)) == list_frame_images(folder)


def resize_rle(rle: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """A COCO RLE ({"size", "counts": str}) at height x width: decoded, resized nearest, encoded once."""
    if list(rle["size"]) == [height, width]:
        return {"size": [height, width], "counts": rle["counts"]}
    import cv2
    from pycocotools import mask as mask_utils

    mask = mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")})
    resized = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    encoded = mask_utils.encode(np.asfortranarray(resized))
    return {"size": [height, width], "counts": encoded["counts"].decode("ascii")}


def write_frame_folder(source: str, dest: str, span: Span | None, fps: float) -> ClipFile:
    """The engine's frames of folder `source` (those of `span`, else all) as `dest`/000000.jpg, ... named so
    that a text sort is their order; files are hard-linked where the filesystem allows, else copied."""
    from PIL import Image

    names = list_frame_images(source)
    indexes = [i for i in range(len(names)) if _inside(span, i, i / fps)]
    if not indexes:
        raise ValueError(f"{source} has no frame in the window {span}")
    partial = f"{dest}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    digits = max(6, len(str(len(indexes) - 1)))
    for k, i in enumerate(indexes):
        src = os.path.join(source, names[i])
        target = os.path.join(partial, f"{k:0{digits}d}{os.path.splitext(names[i])[1].lower()}")
        try:
            os.link(src, target)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(src, target)
    with Image.open(os.path.join(source, names[indexes[0]])) as image:
        width, height = image.size
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)
    return ClipFile(dest, indexes[0], len(indexes), height, width)


def cut_video(source: str, dest: str, span: Span | None) -> ClipFile:
    """The frames of `span` (else all) of video `source` (frame indexes and times as the engine's decode counts
    them), as an H.264 MP4 at the source's display size, written to a partial file then renamed."""
    info = probe_video(source, limits=_FULL_SIZE)
    partial = f"{dest}.partial.mp4"
    writer = _ClipWriter(partial, span, info.fps, info.decode_width, info.decode_height)
    start_s = end_s = None
    if span is not None:
        by_frames = span.start_frame is not None
        # A known frame range stops the decode just past its end (a second of margin for timing jitter).
        start_s, end_s = (None, span.end_s + 1.0) if by_frames else (span.start_s, span.end_s)
    try:
        decode_video(info, [writer], start_s=start_s, end_s=end_s)
    finally:
        writer.close()
    if writer.first_index is None:
        os.remove(partial)
        raise ValueError(f"{source} has no frame in the window {span}")
    os.replace(partial, dest)
    return ClipFile(dest, writer.first_index, writer.count, info.decode_height, info.decode_width)


def _inside(span: Span | None, index: int, time: float) -> bool:
    if span is None:
        return True
    if span.start_frame is not None:
        return span.holds(index)
    return span.start_s <= time < span.end_s


class _ClipWriter:
    """Frame consumer that encodes the frames of a span, in order, from pts 0."""

    def __init__(self, path: str, span: Span | None, fps: float, width: int, height: int) -> None:
        import av

        self.span = span
        self.container = av.open(path, mode="w", options={"movflags": "faststart"})
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = {"crf": "18", "preset": "veryfast"}
        self.first_index: int | None = None
        self.count = 0

    def wants(self, index: int, time: float) -> bool:
        return _inside(self.span, index, time)

    def consume(self, index: int, time: float, frame: np.ndarray) -> None:
        import av

        self.first_index = index if self.first_index is None else self.first_index
        video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        video_frame.pts = self.count
        self.container.mux(self.stream.encode(video_frame))
        self.count += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()
