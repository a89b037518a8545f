"""Probe a video before decoding it: what it is, how big, and whether it is within the decode bounds.

A local folder of images (.jpg, .jpeg, .png) is a video too: its frames are the images in name order
(`natural_key`), timed by a frame rate the caller gives (images carry no timing).

Every failure is an `engine.errors.VideoError` with a one-line message that names the file and says what is
wrong, so a batch can record it as a rejection and go on.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from engine.errors import BadInputError, VideoError

if TYPE_CHECKING:
    from engine.decode import DecodeLimits


FRAME_FOLDER_CODEC = "image-sequence"  # the codec a folder of frames is probed as


@dataclass(frozen=True)
class VideoInfo:
    path: str
    duration_s: float
    fps: float  # the stream's average frame rate
    num_frames: int  # the container's frame count, else duration * fps
    width: int  # display size: rotation applied
    height: int
    rotation: int  # clockwise degrees (0, 90, 180, 270) to turn a stored frame upright; already applied
    codec: str
    decode_width: int  # the size frames are decoded to: display size bounded by limits.max_side, even
    decode_height: int
    limits: DecodeLimits
    frames: tuple[str, ...] = ()  # a frame folder's image paths in frame order; empty for a video file


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (FFmpeg and fsspec messages can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


@contextmanager
def open_container(path: str) -> Iterator[Any]:
    """Open `path` (a local path or an fsspec URL) as a PyAV input container."""
    import av

    if "://" in path:
        import fsspec

        # PyAV reads (and seeks) through the file object, so remote storage needs no local copy.
        with fsspec.open(path, "rb") as file, av.open(file, "r") as container:
            yield container
    else:
        with av.open(path, "r") as container:
            yield container


def probe_video(path: str, *, limits: DecodeLimits, frame_rate: float | None = None) -> VideoInfo:
    """Read the metadata of `path` and decode its first frame (for the rotation and to prove it decodes).

    A local folder of images is probed as a frame sequence timed at `frame_rate` (required for a folder,
    ignored for a file): num_frames is the image count, sizes come from the first image.
    """
    import av

    if "://" not in path and os.path.isdir(path):
        return _probe_frames(path, limits, frame_rate)
    _check_exists(path)
    try:
        with open_container(path) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams})
                if "audio" in kinds:
                    raise VideoError(f"{path} is audio-only: it has no video stream")
                raise VideoError(f"{path} has no video stream (streams: {', '.join(kinds) or 'none'})")
            stream = container.streams.video[0]
            try:
                first = next(iter(container.decode(stream)), None)
            except av.error.FFmpegError as exc:
                raise VideoError(
                    f"{path} is corrupt or truncated: its first frame does not decode ({one_line(exc)})"
                ) from exc
            if first is None:
                raise VideoError(f"{path} has a video stream but no frames")
            return _info(path, container, stream, first, limits)
    except VideoError:
        raise
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path} is not a video PyAV can read: {one_line(exc)}") from exc
    except OSError as exc:
        raise VideoError(f"{path} cannot be read: {one_line(exc)}") from exc


def _check_exists(path: str) -> None:
    if "://" in path:
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(path)
        exists, is_file = fs.exists(fs_path), fs.isfile(fs_path)
    else:
        import os

        exists, is_file = os.path.exists(path), os.path.isfile(path)
    if not exists:
        raise VideoError(f"video not found: {path}")
    if not is_file:
        raise VideoError(f"{path} is not a file")


def _info(path: str, container: Any, stream: Any, first: Any, limits: DecodeLimits) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise VideoError(f"{path} has no frame rate in its video stream")
    fps = float(rate)

    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE units
    else:
        duration = stream.frames / fps
    _check_duration(path, duration, limits)
    num_frames = stream.frames if stream.frames > 0 else max(1, round(duration * fps))

    # PyAV reports the display matrix as a counter-clockwise angle; upright needs the opposite turn.
    rotation = (-round(first.rotation / 90) * 90) % 360
    width, height = first.width, first.height
    if rotation in (90, 270):
        width, height = height, width
    decode_width, decode_height = decode_size(width, height, max_side=limits.max_side)
    return VideoInfo(
        path=path,
        duration_s=duration,
        fps=fps,
        num_frames=num_frames,
        width=width,
        height=height,
        rotation=rotation,
        codec=stream.codec_context.name,
        decode_width=decode_width,
        decode_height=decode_height,
        limits=limits,
    )


def decode_size(width: int, height: int, *, max_side: int) -> tuple[int, int]:
    """Scale (width, height) down so the long side is at most max_side; both even (video encoders need it)."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def _check_duration(path: str, duration: float, limits: DecodeLimits) -> None:
    if duration > limits.max_duration_s:
        raise VideoError(
            f"{path} is {duration:.0f} s long, above the limit of {limits.max_duration_s:.0f} s "
            "(raise DecodeLimits.max_duration_s to accept it)"
        )


# -- folders of frames ---------------------------------------------------------------------------------------


def natural_key(name: str) -> tuple[tuple[int | str, ...], str]:
    """Sort key that compares digit runs by value: 2.jpg < 10.jpg, 00005.jpg < 00010.jpg."""
    # re.split with a group alternates text and digits, so ints only ever meet ints in the comparison.
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def list_frame_images(folder: str) -> list[str]:
    """Names of the images directly in `folder`, in frame order (natural_key). Hidden files (macOS "._"
    copies) are not frames."""
    names = [
        entry.name
        for entry in os.scandir(folder)
        if entry.name.lower().endswith(IMAGE_SUFFIXES) and not entry.name.startswith(".") and entry.is_file()
    ]
    return sorted(names, key=natural_key)


def read_image(path: str) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), pixels as stored, or a VideoError naming it."""
    import cv2

    try:
        data = np.fromfile(path, dtype=np.uint8)
        # EXIF orientation is ignored: mask annotations of frame datasets refer to the stored pixels.
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    except (OSError, cv2.error) as exc:
        raise VideoError(f"image {path} cannot be read: {one_line(exc)}") from exc
    if bgr is None:
        raise VideoError(f"image {path} is empty, corrupt or not a JPEG/PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _probe_frames(path: str, limits: DecodeLimits, frame_rate: float | None) -> VideoInfo:
    names = list_frame_images(path)
    if not names:
        raise VideoError(f"{path} is not a file, nor a folder of frames: it holds no .jpg, .jpeg or .png image")
    if frame_rate is None:
        raise BadInputError(f"{path} is a folder of frames: give its frame_rate (frames per second)")
    if not (math.isfinite(frame_rate) and frame_rate > 0):
        raise BadInputError(f"frame_rate of {path} must be a positive number of frames per second: {frame_rate}")
    duration = len(names) / frame_rate
    _check_duration(path, duration, limits)
    frames = tuple(os.path.join(path, name) for name in names)
    height, width = read_image(frames[0]).shape[:2]
    decode_width, decode_height = decode_size(width, height, max_side=limits.max_side)
    return VideoInfo(
        path=path,
        duration_s=duration,
        fps=float(frame_rate),
        num_frames=len(frames),
        width=width,
        height=height,
        rotation=0,
        codec=FRAME_FOLDER_CODEC,
        decode_width=decode_width,
        decode_height=decode_height,
        limits=limits,
        frames=frames,
    )
