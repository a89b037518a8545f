"""Segmentor (VideoRefer §3.1.1): each noun's box from the open-set detector on a frame, a mask from the
box-prompted segmenter, and the tracker propagating that mask both ways into a masklet.

The paper picks a random frame. `frame_choice: best` (the default) detects on several uniformly sampled
frames and keeps the highest-scoring box, so a noun that is small or hidden on one frame still gets its
best view; `random` is the paper's behaviour (seeded by the video id, so reruns agree). Nouns whose boxes
come from the same frame share one tracking session.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from agents.masklet_generator import sample_positions
from agents.tracking import frame_masks, track_objects
from engine.frame_store import TrackFrames
from engine.ids import stable_id
from engine.models.interfaces import BoxSegmenter, Detection, Detector, Tracker
from engine.stats import Stats
from schemas import Assignment, MaskletRecord, Provenance, TrackPrompt

METHOD = "videorefer"


@dataclass(frozen=True)
class SegmentorConfig:
    frame_choice: Literal["best", "random"] = "best"
    num_detect_frames: int = 8  # frames sampled uniformly for `best`
    box_threshold: float = 0.25
    text_threshold: float = 0.25
    detect_batch: int = 8  # frames per detector call
    track_fps: float = 10.0  # frames per second given to the tracker; 0 tracks every frame
    frame_jpeg_quality: int = 95
    frame_memory_mb: float = 1024

    def __post_init__(self) -> None:
        if self.frame_choice not in ("best", "random"):
            raise ValueError(f"frame_choice must be 'best' or 'random', got {self.frame_choice!r}")
        if self.num_detect_frames < 1 or self.detect_batch < 1:
            raise ValueError("num_detect_frames and detect_batch must be >= 1")
        for name in ("box_threshold", "text_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.track_fps < 0:
            raise ValueError(f"track_fps must be >= 0 (0 = every frame), got {self.track_fps}")


@dataclass
class NounMasklet:
    noun: str
    masklet: MaskletRecord | None
    reason: str | None = None  # why there is none: no_frames, no_detection
    detail: str = ""


class Segmentor:
    def __init__(
        self,
        *,
        detector: Detector,
        box_segmenter: BoxSegmenter,
        tracker: Tracker,
        config: SegmentorConfig = SegmentorConfig(),
        stats: Stats | None = None,
    ) -> None:
        self.detector = detector
        self.box_segmenter = box_segmenter
        self.tracker = tracker
        self.config = config
        self.stats = stats or Stats()

    def segment(
        self,
        frames: TrackFrames,
        nouns: Sequence[str],
        *,
        video_id: str,
        width: int,
        height: int,
        provenance: Provenance,
    ) -> list[NounMasklet]:
        """One masklet per noun (in order) over the stored frames; masks at width x height."""
        nouns = list(dict.fromkeys(nouns))
        n = len(frames.store)
        if n == 0:
            return [NounMasklet(noun, None, "no_frames", "no frames were decoded") for noun in nouns]
        if not nouns:
            return []
        positions = self._positions(n, video_id)
        detections = self._detect(frames, positions, nouns, width, height)

        best: dict[str, tuple[int, Detection, int]] = {}  # noun -> (position, detection, boxes of it there)
        for position, dets in zip(positions, detections):
            for noun in nouns:
                mine = [d for d in dets if d.label == noun]
                top = max(mine, key=lambda d: d.score, default=None)
                if top is not None and (noun not in best or top.score > best[noun][1].score):
                    best[noun] = (position, top, len(mine))

        by_start: dict[int, list[str]] = defaultdict(list)
        for noun, (position, _, _) in best.items():
            by_start[position].append(noun)
        out: dict[str, NounMasklet] = {}
        for start, group in sorted(by_start.items()):
            image = frames.store.resized(start, width, height)
            boxes = np.array([best[noun][1].box for noun in group], dtype=np.float32)
            with self.stats.timer("segmentor.segment"):
                seg = self.box_segmenter.segment(image, boxes)
            self.stats.count("box_segmenter_calls")
            tracks = track_objects(
                self.tracker, frames, width=width, height=height, prompts=dict(enumerate(seg)), start=start,
                both_directions=True, stats=self.stats, timer="segmentor.track",
            )
            for obj_id, noun in enumerate(group):
                _, det, count = best[noun]
                out[noun] = NounMasklet(noun, self._record(frames, noun, det, count, start, tracks[obj_id], video_id, provenance))
        return [
            out.get(noun)
            or NounMasklet(
                noun, None, "no_detection",
                f"no '{noun}' box on any of {len(positions)} sampled frames (box_threshold {self.config.box_threshold})",
            )
            for noun in nouns
        ]

    def _positions(self, n: int, video_id: str) -> list[int]:
        if self.config.frame_choice == "random":
            return [random.Random(video_id).randrange(n)]
        return sample_positions(n, self.config.num_detect_frames)

    def _detect(self, frames: TrackFrames, positions: list[int], nouns: list[str], width: int, height: int) -> list[list[Detection]]:
        out: list[list[Detection]] = []
        step = self.config.detect_batch
        for i in range(0, len(positions), step):
            images = [frames.store.resized(p, width, height) for p in positions[i : i + step]]
            with self.stats.timer("segmentor.detect"):
                out += self.detector.detect(
                    images, nouns, box_threshold=self.config.box_threshold, text_threshold=self.config.text_threshold
                )
            self.stats.count("detector_calls")
            self.stats.count("frames_detected", len(images))
        return out

    def _record(
        self, frames: TrackFrames, noun: str, det: Detection, count: int, start: int, track, video_id: str, provenance: Provenance
    ) -> MaskletRecord:
        self.stats.count("masklets_videorefer")
        return MaskletRecord(
            masklet_id=stable_id(video_id, provenance.config_hash, METHOD, noun),
            video_id=video_id,
            expression=noun,
            noun=noun,
            method=METHOD,
            start_frame=frames.frame_index[start],
            start_time=round(frames.times[start], 6),
            detector_score=round(float(det.score), 6),
            detector_box=[round(float(v), 2) for v in det.box],
            assignment=Assignment(method="detector-noun", candidate_index=0, num_candidates=count, score=round(float(det.score), 6)),
            num_frames_tracked=len(frames.store),
            track_fps=self.config.track_fps,
            prompts=[TrackPrompt(
                frame_index=frames.frame_index[start], timestamp=round(frames.times[start], 6),
                box=[round(float(v), 2) for v in det.box], detector_score=round(float(det.score), 6), reason="start", track=0,
            )],
            frames=frame_masks(frames, track),
            provenance=provenance,
        )
