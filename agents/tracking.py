"""One tracking session over a video's stored frames (or a shot of them): every object prompted on one frame,
propagated forward and (optionally) backward together. Shared by the Referring Masklet Generator and the
Segmentor."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from engine import masks
from engine.frame_store import TrackFrames
from engine.models.interfaces import Box, FrameSource, Tracker
from engine.stats import Stats
from schemas import FrameMask, Rle

Prompt = Box | np.ndarray  # an xyxy box, or a boolean mask at the output resolution
Track = dict[int, tuple[Rle, list[float]]]  # store position -> (mask, its tight box)


class FrameSpan:
    """Store positions [lo, hi) as a FrameSource of their own, so a session sees one shot and nothing across
    its cuts (and sam2 holds state for that shot only)."""

    def __init__(self, frames: FrameSource, lo: int, hi: int) -> None:
        if not 0 <= lo < hi <= len(frames):
            raise ValueError(f"span [{lo}, {hi}) is empty or outside the {len(frames)} stored frames")
        self.frames, self.lo, self.hi = frames, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, position: int) -> np.ndarray:
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} is outside a span of {len(self)} frames")
        return self.frames[self.lo + position]


def track_objects(
    tracker: Tracker,
    frames: TrackFrames,
    *,
    width: int,
    height: int,
    prompts: Mapping[int, Prompt],
    start: int,
    both_directions: bool,
    stats: Stats,
    timer: str,
    span: tuple[int, int] | None = None,
) -> dict[int, Track]:
    """Prompt every object on store position `start` in one session, propagate forward, then backward from
    it; returns, per object id, the positions where its mask is not empty. The two passes share the session
    and its objects, so merging them on the start frame is by object id (Strefer Algorithm 1, Step 3).
    With `span` (lo, hi), the session sees only store positions [lo, hi): a shot between hard cuts.

    Every object is prompted on the one frame: sam2's batched predictor takes objects not prompted on a
    frame that carries prompts as absent there, so one session per prompt frame keeps that rule harmless."""
    lo, hi = span if span is not None else (0, len(frames.store))
    source = frames.store if span is None else FrameSpan(frames.store, lo, hi)
    if not lo <= start < hi:
        raise ValueError(f"start {start} is outside the tracked span [{lo}, {hi})")
    tracks: dict[int, Track] = {obj_id: {} for obj_id in prompts}
    session = tracker.start(source, height=height, width=width)
    stats.count("tracker_sessions")
    try:
        for obj_id, prompt in prompts.items():
            if isinstance(prompt, np.ndarray) and prompt.ndim == 2:
                session.add_mask(start - lo, obj_id, prompt)
            else:
                session.add_box(start - lo, obj_id, tuple(float(v) for v in prompt))  # type: ignore[arg-type]
        for reverse in [False, True] if both_directions else [False]:
            stats.count("tracker_passes")
            with stats.timer(timer):
                for local, obj_masks in session.propagate(start - lo, reverse=reverse):
                    stats.count("frames_tracked")
                    position = local + lo
                    for obj_id, mask in obj_masks.items():
                        box = masks.mask_box(mask)
                        if box is not None and position not in tracks[obj_id]:
                            tracks[obj_id][position] = (masks.encode(mask), box)
    finally:
        session.close()
    return tracks


def frame_masks(frames: TrackFrames, track: Track) -> list[FrameMask]:
    """A track as masklet frames, with each stored frame's video index and time."""
    return [
        FrameMask(frame_index=frames.frame_index[p], timestamp=round(frames.times[p], 6), rle=rle, box=box)
        for p, (rle, box) in sorted(track.items())
    ]
