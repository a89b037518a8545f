"""Synthetic MP4 videos with exact ground truth, written with PyAV (a helper for tests and benchmarks).

Flat saturated shapes on flat backgrounds, each a distinct hue, so a test can segment them by color despite
compression. Ground truth (scene cuts, per-frame masks and boxes, visibility) comes from the same specs that
drew the frames. Also: broken inputs for the error paths (audio-only, frameless, truncated, rotated).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

RGB = tuple[int, int, int]
Center = tuple[float, float]


@dataclass(frozen=True)
class ShapeSpec:
    name: str
    category: str
    color: RGB
    shape: Literal["rect", "circle"]
    size: tuple[int, int]  # (w, h) pixels; a circle is the ellipse inscribed in that box
    track: Callable[[int], Center | None]  # center (x, y) at frame i, None while absent


@dataclass(frozen=True)
class SceneSpec:
    start_frame: int
    background: RGB
    # 0: a hard cut. n > 0: the background blends from the previous scene's over n frames (no cut).
    fade_frames: int = 0


@dataclass(frozen=True)
class GroundTruth:
    path: Path
    width: int
    height: int
    fps: float
    num_frames: int
    scenes: tuple[SceneSpec, ...]
    shapes: tuple[ShapeSpec, ...]  # in drawing order: a later shape hides an earlier one where they overlap

    @property
    def cuts(self) -> list[int]:
        """Frames where a hard cut starts a new scene."""
        return [s.start_frame for s in self.scenes[1:] if s.fade_frames == 0]

    @property
    def changes(self) -> list[int]:
        """Every scene start after the first, hard cut or fade."""
        return [s.start_frame for s in self.scenes[1:]]

    def background(self, frame: int) -> np.ndarray:
        k = max(i for i, s in enumerate(self.scenes) if s.start_frame <= frame)
        scene = self.scenes[k]
        color = np.array(scene.background, dtype=np.float64)
        if k > 0 and frame < scene.start_frame + scene.fade_frames:
            alpha = (frame - scene.start_frame + 1) / (scene.fade_frames + 1)
            color = (1 - alpha) * np.array(self.scenes[k - 1].background, dtype=np.float64) + alpha * color
        return np.round(color).astype(np.uint8)

    def shape(self, name: str) -> ShapeSpec:
        for spec in self.shapes:
            if spec.name == name:
                return spec
        raise KeyError(f"no shape named {name!r}; shapes: {[s.name for s in self.shapes]}")

    def mask(self, name: str, frame: int) -> np.ndarray:
        """Visible pixels of the shape at `frame` (bool, height x width): its footprint minus later shapes."""
        out = np.zeros((self.height, self.width), dtype=bool)
        after = False
        for spec in self.shapes:
            piece = _footprint(spec, frame, self.width, self.height)
            if spec.name == name:
                after = True
                if piece is not None:
                    ys, xs, window = piece
                    out[ys, xs] |= window
            elif after and piece is not None:
                ys, xs, window = piece
                out[ys, xs] &= ~window
        if not after:
            raise KeyError(f"no shape named {name!r}")
        return out

    def footprint(self, name: str, frame: int) -> np.ndarray:
        """All pixels of the shape at `frame` (bool, height x width), hidden by later shapes or not."""
        out = np.zeros((self.height, self.width), dtype=bool)
        piece = _footprint(self.shape(name), frame, self.width, self.height)
        if piece is not None:
            ys, xs, window = piece
            out[ys, xs] = window
        return out

    def box(self, name: str, frame: int) -> tuple[int, int, int, int] | None:
        """Tight xyxy box of the visible mask, x1 and y1 exclusive (max pixel + 1); None when not visible."""
        mask = self.mask(name, frame)
        if not mask.any():
            return None
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1

    def visible(self, name: str, frame: int) -> bool:
        return bool(self.mask(name, frame).any())

    def render(self, frame: int) -> np.ndarray:
        image = np.empty((self.height, self.width, 3), dtype=np.uint8)
        image[:] = self.background(frame)
        for spec in self.shapes:
            piece = _footprint(spec, frame, self.width, self.height)
            if piece is not None:
                ys, xs, window = piece
                image[ys, xs][window] = spec.color
        return image


def _footprint(spec: ShapeSpec, frame: int, width: int, height: int) -> tuple[slice, slice, np.ndarray] | None:
    """The shape's pixels as (row slice, column slice, bool window), clipped to the frame; None if none."""
    center = spec.track(frame)
    if center is None:
        return None
    w, h = spec.size
    x0, y0 = int(round(center[0] - w / 2)), int(round(center[1] - h / 2))
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    if spec.shape == "rect":
        window = np.ones((cy1 - cy0, cx1 - cx0), dtype=bool)
    else:
        yy, xx = np.mgrid[cy0:cy1, cx0:cx1]
        window = ((xx + 0.5 - center[0]) / (w / 2)) ** 2 + ((yy + 0.5 - center[1]) / (h / 2)) ** 2 <= 1.0
    return slice(cy0, cy1), slice(cx0, cx1), window


@lru_cache(maxsize=1)
def video_codec() -> str:
    """libx264 where the installed PyAV wheel has it (the PyPI wheels do), else FFmpeg's native mpeg4."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # av raises UnknownCodecError, whose class moved between PyAV versions
        return "mpeg4"


def make_video(
    path: str | Path,
    *,
    width: int,
    height: int,
    fps: float,
    num_frames: int,
    scenes: Sequence[SceneSpec],
    shapes: Sequence[ShapeSpec] = (),
) -> GroundTruth:
    """Write an H.264 (or MPEG-4 Part 2) yuv420p MP4 with the moov atom first (so a truncated copy still
    opens) and return its ground truth."""
    import av

    starts = [s.start_frame for s in scenes]
    if not starts or starts[0] != 0 or any(a >= b for a, b in zip(starts, starts[1:])):
        raise ValueError(f"scene start frames must begin at 0 and increase, got {starts}")
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {width}x{height}")
    truth = GroundTruth(Path(path), width, height, float(fps), num_frames, tuple(scenes), tuple(shapes))
    codec = video_codec()
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "12"}
        else:
            stream.bit_rate = 20 * width * height
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(truth.render(i), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return truth


def blocky_scene(seed: int, height: int = 96, width: int = 160) -> np.ndarray:
    """Blocky noise with a flat red rectangle whose place depends on the seed: an image for a model to look at."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    image = np.kron(image, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width].copy()
    image[10:40, 20 + seed * 10 : 60 + seed * 10] = (230, 30, 30)
    return image


# -- scenarios shared by the tests ------------------------------------------------------------------------


def _linear(start: Center, end: Center, frames: int) -> Callable[[int], Center]:
    def at(i: int) -> Center:
        t = min(max(i / max(frames - 1, 1), 0.0), 1.0)
        return start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])

    return at


def hard_cuts_video(path: str | Path) -> GroundTruth:
    """160x120, 15 fps, 80 frames: three scenes with very different backgrounds (cuts at 25 and 55) and a
    moving square that stays across them."""
    n = 80
    return make_video(
        path,
        width=160,
        height=120,
        fps=15,
        num_frames=n,
        scenes=[SceneSpec(0, (30, 60, 200)), SceneSpec(25, (230, 200, 40)), SceneSpec(55, (40, 170, 60))],
        shapes=[ShapeSpec("square", "box", (230, 30, 200), "rect", (20, 20), _linear((20, 60), (140, 60), n))],
    )


def entities_video(path: str | Path) -> GroundTruth:
    """320x240, 12 fps, 5 s: two "person"s of different colors crossing, a "ball" that enters at frame 20,
    and a "dog" that leaves at frame 25 and comes back at frame 40."""
    n = 60
    ball = _linear((40, 200), (280, 200), n)
    dog = _linear((260, 40), (60, 40), n)
    return make_video(
        path,
        width=320,
        height=240,
        fps=12,
        num_frames=n,
        scenes=[SceneSpec(0, (60, 60, 60))],
        shapes=[
            ShapeSpec("red person", "person", (230, 30, 30), "rect", (30, 60), _linear((40, 110), (280, 110), n)),
            ShapeSpec("blue person", "person", (30, 60, 230), "rect", (30, 60), _linear((280, 130), (40, 130), n)),
            ShapeSpec("ball", "ball", (240, 220, 30), "circle", (30, 30), lambda i: ball(i) if i >= 20 else None),
            ShapeSpec("dog", "dog", (40, 200, 60), "rect", (50, 30), lambda i: None if 25 <= i < 40 else dog(i)),
        ],
    )


# Backgrounds of slow_change_video, for a fake embedder's palette.
SLOW_CHANGE_PALETTE: tuple[RGB, RGB] = ((40, 180, 60), (40, 60, 200))


def slow_change_video(path: str | Path) -> GroundTruth:
    """96x64, 6 fps, 12 s, no hard cut: green until frame 61, then a 6-frame fade to blue (frames 61-66),
    blue to the end. Too gradual for ContentDetector; a short distinct tail for the clustering."""
    green, blue = SLOW_CHANGE_PALETTE
    return make_video(
        path,
        width=96,
        height=64,
        fps=6,
        num_frames=72,
        scenes=[SceneSpec(0, green), SceneSpec(61, blue, fade_frames=6)],
    )


def short_video(path: str | Path, *, seconds: float = 2.0, fps: float = 10) -> GroundTruth:
    """A short single-scene clip with one moving square (below the clipper's 3 s floor by default)."""
    n = max(1, round(seconds * fps))
    return make_video(
        path,
        width=96,
        height=64,
        fps=fps,
        num_frames=n,
        scenes=[SceneSpec(0, (40, 180, 60))],
        shapes=[ShapeSpec("square", "box", (230, 30, 200), "rect", (12, 12), _linear((10, 32), (86, 32), n))],
    )


def long_video(
    path: str | Path, seconds: float, width: int = 1280, height: int = 720, fps: float = 30
) -> GroundTruth:
    """A benchmark input: three moving shapes over four scenes (hard cuts at each quarter)."""
    n = max(4, round(seconds * fps))
    backgrounds = [(30, 60, 200), (230, 200, 40), (40, 170, 60), (90, 40, 120)]
    sx, sy = width / 320, height / 240

    def orbit(cx: float, cy: float, r: float, period: float) -> Callable[[int], Center]:
        return lambda i: (cx + r * math.cos(2 * math.pi * i / period), cy + r * math.sin(2 * math.pi * i / period))

    return make_video(
        path,
        width=width,
        height=height,
        fps=fps,
        num_frames=n,
        scenes=[SceneSpec(k * n // 4, bg) for k, bg in enumerate(backgrounds)],
        shapes=[
            ShapeSpec(
                "red", "person", (230, 30, 30), "rect", (int(30 * sx), int(60 * sy)),
                _linear((20 * sx, 110 * sy), (300 * sx, 110 * sy), n),
            ),
            ShapeSpec(
                "white", "ball", (245, 245, 245), "circle", (int(30 * sx), int(30 * sy)),
                orbit(160 * sx, 120 * sy, 60 * sy, 4 * fps),
            ),
            ShapeSpec(
                "cyan", "box", (30, 220, 220), "rect", (int(40 * sx), int(20 * sy)),
                _linear((300 * sx, 40 * sy), (20 * sx, 200 * sy), n),
            ),
        ],
    )


# -- broken and unusual inputs -----------------------------------------------------------------------------


def audio_only_file(path: str | Path, *, seconds: float = 1.0) -> Path:
    """An MP4 with one AAC audio stream and no video."""
    import av

    rate, chunk = 16000, 1024
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        for i in range(math.ceil(seconds * rate / chunk)):
            t = (np.arange(chunk, dtype=np.float32) + i * chunk) / rate
            frame = av.AudioFrame.from_ndarray(np.sin(2 * np.pi * 440 * t)[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i * chunk
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return Path(path)


def truncated_copy(src: str | Path, dst: str | Path, *, fraction: float = 0.5) -> Path:
    """The first `fraction` of the bytes of `src`: a download cut short. With make_video's moov-first
    layout the copy still opens and decodes up to the cut."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def frameless_video(path: str | Path) -> Path:
    """An MP4 whose video track lists a frame but holds no frame data (cut right after the moov atom)."""
    short_video(path, seconds=0.1)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: data.index(b"mdat") + 4])
    return Path(path)


def set_mp4_rotation(path: str | Path, degrees: int) -> Path:
    """Rewrite the first track header's display matrix so players turn the video `degrees` clockwise
    (what a phone writes). The stored frames are unchanged."""
    data = bytearray(Path(path).read_bytes())
    at = data.index(b"tkhd")  # the moov atom comes first in make_video's files
    version = data[at + 4]
    # box type(4) version+flags(4), times and ids (20 or 32 bytes), reserved/layer/group/volume (16)
    offset = at + 4 + 4 + (32 if version == 1 else 20) + 16
    width, height = struct.unpack(">II", data[offset + 36 : offset + 44])
    one = 1 << 16
    matrices = {
        0: (one, 0, 0, 0, one, 0, 0, 0, 1 << 30),
        90: (0, one, 0, -one, 0, 0, height, 0, 1 << 30),
        180: (-one, 0, 0, 0, -one, 0, width, height, 1 << 30),
        270: (0, -one, 0, one, 0, 0, 0, width, 1 << 30),
    }
    data[offset : offset + 36] = struct.pack(">9i", *matrices[degrees])
    Path(path).write_bytes(bytes(data))
    return Path(path)
