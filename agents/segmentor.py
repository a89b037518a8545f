"""Segmentor (VideoRefer §3.1.1): each noun's box from the open-set detector on a frame, a mask from the
box-prompted segmenter, and the tracker propagating that mask both ways into a masklet.

The paper picks a random frame. `frame_choice: best` (the default) detects on several uniformly sampled
frames and keeps the highest-scoring box, so a noun that is small or hidden on one frame still gets its
best view; `random` is the paper's behaviour (seeded by the video id, so reruns agree). Nouns whose boxes
come from the same frame share one tracking session.

A plural noun the caption counts ("two dogs": `counts={"dog": 2}`) gives one masklet per instance: on the
sampled frame where the detector sees at least that many of it, best by the weakest of its top boxes, those
boxes are tracked together, numbered left to right ("dog 1 of 2", "dog 2 of 2"). Where no sampled frame shows
that many, the noun is a `missing_instances` failure: fewer boxes than the caption counts would describe the
wrong number of objects.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

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


def instance_name(noun: str, index: int, count: int) -> str:
    """The name of one instance of a counted plural noun: "dog 1 of 2" (numbered left to right)."""
    return f"{noun} {index + 1} of {count}"


@dataclass
class NounMasklet:
    noun: str
    masklet: MaskletRecord | None
    reason: str | None = None  # why there is none: no_frames, no_detection, missing_instances, empty_masklet
    detail: str = ""
    instance: int | None = None  # the instance's number (0-based, left to right) of a counted plural noun
    count: int = 1  # instances the caption counts

    @property
    def name(self) -> str:
        """The noun, or "dog 1 of 2" for an instance: unique among the results of one call."""
        return self.noun if self.instance is None else instance_name(self.noun, self.instance, self.count)


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
        counts: Mapping[str, int] | None = None,
    ) -> list[NounMasklet]:
        """One masklet per noun, or per instance of a noun `counts` gives more than one of (in order), over the
        stored frames; masks at width x height. A noun without a masklet is one result with its reason."""
        nouns = list(dict.fromkeys(nouns))
        counts = {noun: (counts or {}).get(noun, 1) for noun in nouns}
        if any(c < 1 for c in counts.values()):
            raise ValueError(f"instance counts must be >= 1, got {counts}")
        n = len(frames.store)
        if n == 0:
            return [NounMasklet(noun, None, "no_frames", "no frames were decoded") for noun in nouns]
        if not nouns:
            return []
        positions = self._positions(n, video_id)
        detections = self._detect(frames, positions, nouns, width, height)

        # noun -> (position, its chosen boxes left to right, boxes of it there)
        best: dict[str, tuple[int, list[Detection], int]] = {}
        most: dict[str, int] = {noun: 0 for noun in nouns}  # most boxes of a noun on one frame, for the detail
        score: dict[str, float] = {}
        for position, dets in zip(positions, detections):
            for noun in nouns:
                mine = sorted((d for d in dets if d.label == noun), key=lambda d: -d.score)
                most[noun] = max(most[noun], len(mine))
                top = mine[: counts[noun]]
                if len(top) < counts[noun]:
                    continue
                weakest = top[-1].score  # every instance must be seen well on the start frame
                if noun not in best or weakest > score[noun]:
                    best[noun] = (position, sorted(top, key=lambda d: d.box[0] + d.box[2]), len(mine))
                    score[noun] = weakest

        by_start: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for noun, (position, chosen, _) in best.items():
            by_start[position] += [(noun, k) for k in range(len(chosen))]
        out: dict[tuple[str, int], NounMasklet] = {}
        for start, group in sorted(by_start.items()):
            image = frames.store.resized(start, width, height)
            boxes = np.array([best[noun][1][k].box for noun, k in group], dtype=np.float32)
            with self.stats.timer("segmentor.segment"):
                seg = self.box_segmenter.segment(image, boxes)
            self.stats.count("box_segmenter_calls")
            tracks = track_objects(
                self.tracker, frames, width=width, height=height, prompts=dict(enumerate(seg)), start=start,
                both_directions=True, stats=self.stats, timer="segmentor.track",
            )
            for obj_id, (noun, k) in enumerate(group):
                _, chosen, found = best[noun]
                instance = None if counts[noun] == 1 else k
                result = NounMasklet(noun, None, instance=instance, count=counts[noun])
                if tracks[obj_id]:
                    result.masklet = self._record(frames, result, chosen[k], found, start, tracks[obj_id], video_id,
                                                  provenance)
                else:  # nothing to show a region captioner or a trainer
                    result.reason = "empty_masklet"
                    result.detail = f"the tracker found no mask of '{result.name}' on any frame"
                out[noun, k] = result
        results: list[NounMasklet] = []
        for noun in nouns:
            if noun in best:
                results += [out[noun, k] for k in range(counts[noun])]
            elif counts[noun] == 1:
                detail = (f"no '{noun}' box on any of {len(positions)} sampled frames "
                          f"(box_threshold {self.config.box_threshold})")
                results.append(NounMasklet(noun, None, "no_detection", detail))
            else:
                detail = (f"the caption counts {counts[noun]} '{noun}', but no sampled frame of {len(positions)} shows "
                          f"that many (at most {most[noun]}; box_threshold {self.config.box_threshold})")
                results.append(NounMasklet(noun, None, "missing_instances", detail, count=counts[noun]))
        return results

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
        self, frames: TrackFrames, result: NounMasklet, det: Detection, found: int, start: int, track, video_id: str,
        provenance: Provenance,
    ) -> MaskletRecord:
        self.stats.count("masklets_videorefer")
        # A singular noun keeps the id it always had; an instance's id holds its number too.
        instance = () if result.instance is None else (result.instance, result.count)
        return MaskletRecord(
            masklet_id=stable_id(video_id, provenance.config_hash, METHOD, result.noun, *instance),
            video_id=video_id,
            expression=result.name,
            noun=result.noun,
            method=METHOD,
            start_frame=frames.frame_index[start],
            start_time=round(frames.times[start], 6),
            detector_score=round(float(det.score), 6),
            detector_box=[round(float(v), 2) for v in det.box],
            assignment=Assignment(
                method="detector-noun", candidate_index=result.instance or 0, num_candidates=found,
                score=round(float(det.score), 6),
            ),
            num_frames_tracked=len(frames.store),
            track_fps=self.config.track_fps,
            prompts=[TrackPrompt(
                frame_index=frames.frame_index[start], timestamp=round(frames.times[start], 6),
                box=[round(float(v), 2) for v in det.box], detector_score=round(float(det.score), 6), reason="start", track=0,
            )],
            frames=frame_masks(frames, track),
            provenance=provenance,
        )
