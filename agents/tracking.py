"""One tracking session over a video's stored frames: every object prompted on one frame, propagated forward
and (optionally) backward together. Shared by the Referring Masklet Generator and the Segmentor."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from engine import masks
from engine.frame_store import TrackFrames
from engine.models.interfaces import Box, Tracker
from engine.stats import Stats
from schemas import FrameMask, Rle

Prompt = Box | np.ndarray  # an xyxy box, or a boolean mask at the output resolution
Track = dict[int, tuple[Rle, list[float]]]  # store position -> (mask, its tight box)


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
) -> dict[int, Track]:
    """Prompt every object on store position `start` in one session, propagate forward, then backward from
    it; returns, per object id, the positions where its mask is not empty. The two passes share the session
    and its objects, so merging them on the start frame is by object id (Strefer Algorithm 1, Step 3)."""
    tracks: dict[int, Track] = {obj_id: {} for obj_id in prompts}
    session = tracker.start(frames.store, height=height, width=width)
    try:
        for obj_id, prompt in prompts.items():
            if isinstance(prompt, np.ndarray) and prompt.ndim == 2:
                session.add_mask(start, obj_id, prompt)
            else:
                session.add_box(start, obj_id, tuple(float(v) for v in prompt))  # type: ignore[arg-type]
        for reverse in [False, True] if both_directions else [False]:
            stats.count("tracker_passes")
            with stats.timer(timer):
                for position, obj_masks in session.propagate(start, reverse=reverse):
                    stats.count("frames_tracked")
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
