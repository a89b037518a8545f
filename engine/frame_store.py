"""Frames held JPEG-compressed in memory, squash-resized to a model's square input (a `FrameSource`).

One decode of a video fills a store; the tracker (and anything else that wants the frames again, such as the
detector through `resized`) reads them back from it. A frame at 1024x1024 costs about 100-300 KB here instead
of the 12 MiB of fp32 that sam2's own loader holds per frame for a whole video. Past `memory_budget_mb`,
further frames spill to a temporary folder (removed by `close` or when the store is collected), so memory
stays bounded whatever the video's length.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from engine.images import check_rgb_uint8


class FrameStore:
    """Append RGB uint8 frames of any size; read them back as RGB uint8 `(size, size, 3)` squares."""

    def __init__(self, *, size: int, quality: int = 95, memory_budget_mb: float | None = 1024) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int (the model's square input side), got {size!r}")
        if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an int JPEG quality in 1..100, got {quality!r}")
        if memory_budget_mb is not None and memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb must be >= 0 or None (no limit), got {memory_budget_mb!r}")
        self.size = size
        self.quality = quality
        self.memory_budget = None if memory_budget_mb is None else int(memory_budget_mb * 2**20)
        self._encoded: list[np.ndarray | Path] = []  # in memory, or the file it spilled to
        self._nbytes = 0
        self._spill_dir: Path | None = None
        self._cleanup: weakref.finalize | None = None

    def append(self, frame: np.ndarray) -> int:
        """Squash-resize `frame` (RGB uint8, (H, W, 3)) to size x size, compress it, return its position."""
        import cv2

        frame = check_rgb_uint8(frame, "frame")
        h, w = frame.shape[:2]
        if (h, w) != (self.size, self.size):
            # INTER_AREA when shrinking (what a loader does against aliasing), INTER_LINEAR when enlarging.
            shrinking = h * w > self.size * self.size
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            frame = cv2.resize(frame, (self.size, self.size), interpolation=interpolation)
        ok, encoded = cv2.imencode(
            ".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.quality]
        )
        if not ok:  # pragma: no cover - cv2 only fails here on a broken build
            raise RuntimeError("cv2.imencode failed to JPEG-encode a frame")
        if self.memory_budget is not None and self._nbytes + encoded.nbytes > self.memory_budget:
            path = self._spill_folder() / f"{len(self._encoded)}.jpg"
            encoded.tofile(path)
            self._encoded.append(path)
        else:
            self._encoded.append(encoded)
            self._nbytes += encoded.nbytes
        return len(self._encoded) - 1

    def _spill_folder(self) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="engine-frames-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        return self._spill_dir

    @property
    def spilled(self) -> int:
        """Frames held on disk rather than in memory."""
        return sum(isinstance(e, Path) for e in self._encoded)

    def close(self) -> None:
        """Drop every frame and remove the spill folder; the store is empty afterwards."""
        self._encoded.clear()
        self._nbytes = 0
        if self._cleanup is not None:
            self._cleanup()
            self._spill_dir = self._cleanup = None

    def __len__(self) -> int:
        return len(self._encoded)

    def __getitem__(self, position: int) -> np.ndarray:
        """The frame at `position` (negative counts from the end) as RGB uint8 (size, size, 3)."""
        import cv2

        encoded = self._encoded[self._index(position)]
        if isinstance(encoded, Path):
            encoded = np.fromfile(encoded, dtype=np.uint8)
        bgr = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def __iter__(self) -> Iterator[np.ndarray]:
        for position in range(len(self)):
            yield self[position]

    @property
    def nbytes(self) -> int:
        """Bytes of compressed frame data held in memory."""
        return self._nbytes

    def resized(self, position: int, width: int, height: int) -> np.ndarray:
        """The frame at `position` un-squashed to width x height (e.g. the source's aspect), RGB uint8."""
        import cv2

        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
            raise ValueError(f"width and height must be positive ints, got {width!r} x {height!r}")
        frame = self[position]
        if (height, width) == (self.size, self.size):
            return frame
        shrinking = width * height < self.size * self.size
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(frame, (width, height), interpolation=interpolation)

    def _index(self, position: int) -> int:
        n = len(self._encoded)
        if not isinstance(position, (int, np.integer)) or isinstance(position, bool):
            raise TypeError(f"frame position must be an int, got {type(position).__name__}")
        if not -n <= position < n:
            # IndexError (not ValueError) so the sequence protocol keeps working.
            raise IndexError(f"frame position {position} is out of range for a store of {n} frames")
        return int(position) % n



class TrackFrames:
    """Frame consumer: keeps the frames a tracker will see, at `fps` (0: every frame), in a FrameStore at the
    tracker's square size, with each kept frame's video index and time. Shared by every pass of a video
    that tracks at the same size and rate (see `engine.runner.VideoContext.track_frames`)."""

    def __init__(self, store: FrameStore, fps: float) -> None:
        from engine.decode import RateGate

        self.store = store
        self.gate = RateGate(fps)
        self.frame_index: list[int] = []
        self.times: list[float] = []

    def wants(self, index: int, time: float) -> bool:
        return self.gate.open(time)

    def consume(self, index: int, time: float, frame: np.ndarray) -> None:
        self.store.append(frame)
        self.frame_index.append(index)
        self.times.append(time)
        self.gate.take(time)

    def close(self) -> None:
        self.store.close()


class Keyframes:
    """Frame consumer: `count` frames spread uniformly over the expected frames, kept at decode size (long side
    capped at `max_side`) for VLM prompts and region captions. Positions are planned from the probe's frame
    count; if the stream is shorter, fewer frames are kept."""

    def __init__(self, *, count: int, expected_frames: int, first_frame: int = 0, max_side: int = 768) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        n = max(expected_frames, 1)
        self.wanted = sorted({first_frame + int(round(x)) for x in np.linspace(0, n - 1, num=min(count, n))})
        self._wanted = set(self.wanted)
        self.max_side: int | None = max_side
        self.frames: dict[int, np.ndarray] = {}
        self.times: dict[int, float] = {}

    @classmethod
    def at(cls, indexes: Sequence[int], *, max_side: int | None = None) -> "Keyframes":
        """The frames at `indexes` (of the whole file) exactly, long side capped at `max_side` (None: decode size)."""
        keyframes = cls.__new__(cls)
        keyframes.wanted = sorted(set(indexes))
        keyframes._wanted = set(keyframes.wanted)
        keyframes.max_side = max_side
        keyframes.frames, keyframes.times = {}, {}
        return keyframes

    def wants(self, index: int, time: float) -> bool:
        return index in self._wanted

    def consume(self, index: int, time: float, frame: np.ndarray) -> None:
        import cv2

        h, w = frame.shape[:2]
        scale = 1.0 if self.max_side is None else self.max_side / max(h, w)
        if scale < 1:
            frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        self.frames[index] = frame.copy()  # the decoder's frame is shared: keep our own
        self.times[index] = time

    def chat_video(self):
        """The kept frames, in time order, as a `ChatVideo` for a video LLM (None when none were kept); its
        fps is the rate they were sampled at."""
        from engine.models.interfaces import ChatVideo

        if not self.frames:
            return None
        shown = sorted(self.frames)
        span = max(self.times[shown[-1]] - self.times[shown[0]], 1e-6)
        return ChatVideo(tuple(self.frames[i] for i in shown), fps=max(len(shown) - 1, 1) / span)

    def close(self) -> None:
        self.frames.clear()


class ClipFrames(TrackFrames):
    """Frame consumer: the item's frames at a fixed dense rate `fps`, long side scaled to at most `max_side`,
    kept JPEG-compressed, so that each clip (known only after the decode: cuts and clusters come at its end)
    can be shown `count` frames of its own (`chat_video`). Memory stays under `memory_mb` whatever the video's
    length: past it, frames spill to a temporary folder (a 448-pixel frame is about 20-50 KB, so at 8 fps a
    3-minute video holds 1440 frames, 30-70 MB). Frames are held squashed to a square, as in `FrameStore`, and
    given back at the source's aspect."""

    def __init__(
        self, *, fps: float, width: int, height: int, max_side: int = 448, quality: int = 90, memory_mb: float = 256
    ) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0 (a fixed sampling rate), got {fps}")
        if width < 1 or height < 1 or max_side < 1:
            raise ValueError(f"width, height and max_side must be >= 1, got {width}, {height}, {max_side}")
        scale = min(1.0, max_side / max(width, height))
        self.width, self.height = max(1, round(width * scale)), max(1, round(height * scale))
        self.fps = fps
        # frame_index ascends: frames arrive in decode order
        super().__init__(FrameStore(size=max(self.width, self.height), quality=quality, memory_budget_mb=memory_mb), fps)

    def positions(self, start_frame: int, end_frame: int, count: int) -> list[int]:
        """Store positions of up to `count` kept frames spread evenly over frames [start_frame, end_frame)."""
        import bisect

        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        lo = bisect.bisect_left(self.frame_index, start_frame)
        hi = bisect.bisect_left(self.frame_index, end_frame)
        if hi - lo <= count:
            return list(range(lo, hi))
        if count == 1:
            return [(lo + hi - 1) // 2]
        step = (hi - 1 - lo) / (count - 1)  # > 1: the positions are distinct
        return [lo + int(round(i * step)) for i in range(count)]

    def chat_video(self, start_frame: int, end_frame: int, count: int):
        """Up to `count` frames of [start_frame, end_frame), in time order, as a `ChatVideo` at the source's
        aspect whose fps is the rate they are spread at; None when no kept frame falls in the range."""
        from engine.models.interfaces import ChatVideo

        chosen = self.positions(start_frame, end_frame, count)
        if not chosen:
            return None
        span = self.times[chosen[-1]] - self.times[chosen[0]]
        fps = (len(chosen) - 1) / span if span > 0 else self.fps
        return ChatVideo(tuple(self.store.resized(p, self.width, self.height) for p in chosen), fps=fps)
