"""The one streaming decode pass: each frame is decoded once and handed to every consumer that wants it.

Consumers (cut detector, embedding sampler, detector sampler) never open the video themselves; several of them
share one pass. Frames are never accumulated here: a consumer keeps what it needs.
"""

from __future__ import annotations

import math
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Generator, Protocol, Sequence

import numpy as np

from engine.errors import BadInputError, VideoError
from engine.probe import VideoInfo, one_line, open_container, read_image


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what an untrusted video may cost to decode."""

    max_side: int = 1920  # frames are decoded with their long side scaled down to at most this
    max_duration_s: float = 3600.0  # longer videos are rejected by the probe; decoding stops here
    max_frames: int | None = None  # decode at most this many frames (None: all)

    def __post_init__(self) -> None:
        if self.max_side < 16:
            raise ValueError(f"DecodeLimits.max_side must be at least 16 pixels, got {self.max_side}")
        if not self.max_duration_s > 0:
            raise ValueError(f"DecodeLimits.max_duration_s must be positive, got {self.max_duration_s}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"DecodeLimits.max_frames must be None or at least 1, got {self.max_frames}")


class FrameConsumer(Protocol):
    def wants(self, index: int, time: float) -> bool:
        """Whether `consume` should get this frame. Called for every frame before any conversion: keep it cheap."""
        ...

    def consume(self, index: int, time: float, frame: np.ndarray) -> None:
        """`frame` is RGB uint8 (decode_height, decode_width, 3), upright, shared between consumers: do not
        modify it in place."""
        ...

    # Optional: `end_of_stream()`, called once after the last frame of the pass (a detector's final flush).


class RateGate:
    """Time-based frame sampling for consumers: the first frame at or after each slot k / fps passes (every
    frame when fps <= 0). Robust to variable frame rates, unlike a fixed frame stride."""

    def __init__(self, fps: float) -> None:
        self.fps = fps
        self._next_slot = 0

    def open(self, time: float) -> bool:
        return self.fps <= 0 or time * self.fps >= self._next_slot - 1e-6

    def take(self, time: float) -> None:
        """Record that the frame at `time` was taken: the gate opens again at the next slot."""
        if self.fps > 0:
            self._next_slot = math.floor(time * self.fps + 1e-6) + 1


@dataclass(frozen=True)
class DecodeResult:
    # Frames read from the source, those skipped before a window's start included: one past the last index.
    frames_decoded: int
    end_time: float  # end of the last decoded frame: its timestamp plus one frame duration (1 / fps)
    error: str | None = None  # set when a corrupt or truncated stream stopped the pass early
    limit_reached: str | None = None  # set when DecodeLimits stopped the pass early
    first_index: int = 0  # the first frame inside the decode window (0 without start_s)
    first_time: float = 0.0  # its timestamp


# A decoded frame's timestamp and a thunk that converts it to RGB at the decode size: frames no consumer
# wants are never converted (a frame folder's images are never even read).
Frames = Generator[tuple[float, Callable[[], np.ndarray]], None, None]


def decode_video(
    info: VideoInfo,
    consumers: Sequence[FrameConsumer],
    *,
    progress: Callable[[int, float], None] | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
) -> DecodeResult:
    """Decode `info.path` once, front to back; `progress(frames_decoded, time)` is called after each frame.

    Timestamps are seconds from the first frame (pts * time_base; index / fps where a frame has no pts, and
    for a frame folder). A stream that breaks after at least one frame ends the pass with
    `DecodeResult.error` set; one that yields no frame at all raises `VideoError`.

    A window [start_s, end_s) limits what consumers see: frames before start_s are decoded (a video file is
    read front to back) but neither converted nor offered to consumers; the pass stops at the first frame at
    or after end_s. Frame indexes and times stay those of the whole source (index 0 is its first frame), and
    DecodeLimits.max_frames counts from there too. A window with no frame in it raises `VideoError`.
    """
    import av

    _check_window(start_s, end_s)
    limits = info.limits
    frames = _image_frames(info) if info.frames else _stream_frames(info)
    index, last_time = 0, 0.0
    first: tuple[int, float] | None = None  # (index, time) of the first frame inside the window
    error: str | None = None
    limit_reached: str | None = None
    try:
        with closing(frames):  # closes the container even when the loop stops early
            for time, convert in frames:
                if end_s is not None and time >= end_s:
                    break
                if limits.max_frames is not None and index >= limits.max_frames:
                    limit_reached = f"stopped after DecodeLimits.max_frames={limits.max_frames} frames"
                    break
                if time > limits.max_duration_s:
                    limit_reached = f"stopped at DecodeLimits.max_duration_s={limits.max_duration_s:g} s"
                    break
                if start_s is None or time >= start_s:
                    first = first or (index, time)
                    wanting = [c for c in consumers if c.wants(index, time)]
                    if wanting:
                        rgb = convert()
                        for consumer in wanting:
                            consumer.consume(index, time, rgb)
                index, last_time = index + 1, time
                if progress is not None:
                    progress(index, time)
    except av.error.FFmpegError as exc:
        if index == 0:
            raise VideoError(f"{info.path} is corrupt: no frame could be decoded ({one_line(exc)})") from exc
        error = f"decoding stopped after {index} frames ({last_time:.2f} s): {one_line(exc)}"
    except (OSError, VideoError) as exc:  # VideoError: an image of a frame folder that does not read
        if index == 0:
            raise VideoError(f"{info.path} cannot be read: {one_line(exc)}") from exc
        error = f"reading stopped after {index} frames ({last_time:.2f} s): {one_line(exc)}"
    if index == 0:
        raise VideoError(f"{info.path} has a video stream but no frames")
    for consumer in consumers:
        flush = getattr(consumer, "end_of_stream", None)
        if flush is not None:
            flush()
    end_time = last_time + 1.0 / info.fps
    if first is None:
        why = error or limit_reached or f"the video ends at {end_time:.2f} s"
        raise VideoError(f"{info.path} has no frame in the window from {start_s or 0.0:g} s: {why}")
    return DecodeResult(
        frames_decoded=index,
        end_time=end_time,
        error=error,
        limit_reached=limit_reached,
        first_index=first[0],
        first_time=first[1],
    )


def _check_window(start_s: float | None, end_s: float | None) -> None:
    if start_s is not None and not (math.isfinite(start_s) and start_s >= 0):
        raise BadInputError(f"decode window start_s must be a time in seconds >= 0, got {start_s}")
    if end_s is not None and not end_s > (start_s or 0.0):
        raise BadInputError(f"decode window end_s={end_s} must be after start_s={start_s or 0.0}")


def _stream_frames(info: VideoInfo) -> Frames:
    """The frames of a video file, decoded with PyAV, converted (scaled, upright) only on demand."""
    # swscale works on the stored (unrotated) frame, so ask it for the rotated-back size.
    turned = info.rotation in (90, 270)
    out_w, out_h = (info.decode_height, info.decode_width) if turned else (info.decode_width, info.decode_height)
    color: dict[str, int] | None = None

    def convert(frame: Any) -> np.ndarray:
        nonlocal color
        if color is None:
            color = _color_conversion(frame)
        rgb = frame.to_ndarray(format="rgb24", width=out_w, height=out_h, **color)
        return _upright(rgb, info.rotation)

    with open_container(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: decoding is most of the cost
        time_base = stream.time_base
        first_pts = None
        for index, frame in enumerate(container.decode(stream)):
            if frame.pts is None or time_base is None:
                time = index / info.fps
            else:
                first_pts = frame.pts if first_pts is None else first_pts
                time = float((frame.pts - first_pts) * time_base)
            yield time, partial(convert, frame)


def _image_frames(info: VideoInfo) -> Frames:
    """The images of a frame folder at index / fps, each read only when a consumer wants it. An image of
    another size than the first is resized to the decode size like the others (frame folders are not
    always uniform)."""
    size = (info.decode_width, info.decode_height)

    def convert(path: str) -> np.ndarray:
        import cv2

        rgb = read_image(path)
        if rgb.shape[1::-1] != size:
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        return rgb

    for index, path in enumerate(info.frames):
        yield index / info.fps, partial(convert, path)


def _color_conversion(frame: Any) -> dict[str, int]:
    """swscale arguments that convert with the frame's own YUV matrix and range.

    Left alone, PyAV converts every frame with BT.601 limited range, which shifts colours of BT.709 (HD)
    video by up to ~12 levels. PyAV only applies a colorspace when source and destination differ, hence the
    explicit pair. This matches what OpenCV 4.10+/5 (and so PySceneDetect's default backend) produces.
    """
    # AVColorSpace -> SWS_CS_* (BT.709, FCC, SMPTE 240M, BT.2020); everything else is BT.601.
    src = {1: 1, 4: 4, 7: 7, 9: 9, 10: 9}.get(int(frame.colorspace), 5)
    kwargs: dict[str, int] = {}
    if src != 5:
        kwargs.update(src_colorspace=src, dst_colorspace=5)
    if int(frame.color_range) == 2:  # AVCOL_RANGE_JPEG: full-range YUV in a non-"j" pixel format
        kwargs.update(src_color_range=2, dst_color_range=1)
    return kwargs


def _upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    if rotation == 0:
        return rgb
    turned = {90: np.rot90(rgb, k=-1), 180: rgb[::-1, ::-1], 270: np.rot90(rgb, k=1)}[rotation]
    return np.ascontiguousarray(turned)
