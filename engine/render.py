"""An MP4 a person can watch: each masklet filled in its own color with its expression as label, clip
boundaries shown as a banner and a white flash on the first frames of each clip."""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

import numpy as np

from engine import masks
from engine.decode import decode_video
from engine.draw import draw_numbered_boxes, palette
from engine.probe import VideoInfo
from schemas import ClipRecord, MaskletRecord

FLASH_FRAMES = 3


class _Overlay:
    """Frame consumer that draws and encodes every frame (renders are the one stage that wants them all)."""

    def __init__(self, out_path: str, info: VideoInfo, masklets: Sequence[MaskletRecord], clips: Sequence[ClipRecord]):
        import av

        self.container = av.open(out_path, mode="w")
        self.stream = self.container.add_stream("libx264", rate=_rate(info.fps))
        self.stream.width, self.stream.height = info.decode_width, info.decode_height
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "23", "preset": "veryfast"}
        self.masklets = list(masklets)
        self.colors = palette(len(self.masklets))
        self.frame_keys = [[f.frame_index for f in m.frames] for m in self.masklets]
        # A mask is held over the frames between tracked ones: decode each RLE once, not once per frame.
        self.decoded: list[tuple[int, np.ndarray] | None] = [None] * len(self.masklets)
        # A mask is shown until the next tracked frame, but not across a gap of more than the masklet's tracking
        # interval (from its track_fps; for masks without one, the video's frames over those tracked).
        self.holds = [
            max(1, int(np.ceil(info.fps / m.track_fps))) if m.track_fps
            else 1 if m.track_fps == 0
            else max(1, int(np.ceil(max(info.num_frames, 1) / max(m.num_frames_tracked, 1))))
            for m in self.masklets
        ]
        self.clips = sorted(clips, key=lambda c: c.start_frame)
        self.frames_written = 0

    def wants(self, index: int, time: float) -> bool:
        return True

    def consume(self, index: int, time: float, frame: np.ndarray) -> None:
        import av

        canvas = frame.copy()
        labels = []
        for j, (m, keys, color) in enumerate(zip(self.masklets, self.frame_keys, self.colors)):
            k = bisect_right(keys, index) - 1
            if k < 0 or index - keys[k] >= self.holds[j]:
                continue
            fm = m.frames[k]
            cached = self.decoded[j]
            if cached is None or cached[0] != k:
                cached = self.decoded[j] = (k, masks.decode(fm.rle))
            mask = cached[1]
            if mask.shape != canvas.shape[:2]:
                continue
            canvas[mask] = (0.45 * canvas[mask] + 0.55 * np.array(color)).astype(np.uint8)
            labels.append((fm.box, f"{m.expression} [{m.method}]", color))
        if labels:
            boxes, texts, colors = zip(*labels)
            canvas = draw_numbered_boxes(canvas, boxes, texts, colors)
        self._draw_clip(canvas, index)
        packet_frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
        for packet in self.stream.encode(packet_frame):
            self.container.mux(packet)
        self.frames_written += 1

    def _draw_clip(self, canvas: np.ndarray, index: int) -> None:
        import cv2

        if not self.clips:
            return
        k = max(0, bisect_right([c.start_frame for c in self.clips], index) - 1)
        clip = self.clips[k]
        text = f"clip {k + 1}/{len(self.clips)} ({clip.method})  frame {index}"
        cv2.rectangle(canvas, (0, 0), (canvas.shape[1], 22), (0, 0, 0), thickness=-1)
        cv2.putText(canvas, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        if k > 0 and index - clip.start_frame < FLASH_FRAMES:
            cv2.rectangle(canvas, (0, 0), (canvas.shape[1] - 1, canvas.shape[0] - 1), (255, 255, 255), thickness=8)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(30)


def render_overlay(
    info: VideoInfo,
    out_path: str,
    *,
    masklets: Sequence[MaskletRecord],
    clips: Sequence[ClipRecord],
) -> int:
    """Decode the video again and write the overlay to `out_path` (a local file); returns frames written."""
    overlay = _Overlay(out_path, info, masklets, clips)
    try:
        decode_video(info, [overlay])
    finally:
        overlay.close()
    return overlay.frames_written
