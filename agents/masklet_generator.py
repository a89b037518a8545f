"""Referring Masklet Generator (Strefer §2.1.3, Algorithm 1), and Grounded-SAM-2's video demo as a baseline.

One decode pass fills a frame store at the tracker's resolution (`consumers`); `finish` then
1. samples frames uniformly and reorders them middle-first (Step 1),
2. detects the generalized nouns on the reordered frames, batch by batch, and stops at the first frame where
   every expression can have a box (Step 2),
3. prompts one tracking session with every box of that frame and propagates forward and backward (Step 3),
4. assigns each referring expression to one masklet with the grounder, one-to-one (Step 4).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from agents.tracking import Prompt, frame_masks, track_objects
from engine.frame_store import FrameStore, TrackFrames
from engine.ids import stable_id
from engine.models.interfaces import BoxSegmenter, Detection, Detector, Grounder, Tracker
from engine.stats import Stats
from schemas import Assignment, EntityRef, MaskletRecord, Provenance, RejectionRecord, Rle

Method = Literal["strefer", "grounded-sam2"]


@dataclass(frozen=True)
class MaskletConfig:
    num_sample_frames: int = 32
    box_threshold: float = 0.25  # Strefer's released settings
    text_threshold: float = 0.3
    track_fps: float = 10.0  # 0 tracks every decoded frame
    detect_batch: int = 4
    prompt: Literal["box", "mask"] = "box"
    frame_jpeg_quality: int = 95
    frame_memory_mb: float = 1024  # tracked frames beyond this spill to a temporary folder
    max_candidates_per_noun: int = 8

    def __post_init__(self) -> None:
        if self.num_sample_frames < 1:
            raise ValueError(f"num_sample_frames must be >= 1, got {self.num_sample_frames}")
        for name in ("box_threshold", "text_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.track_fps < 0:
            raise ValueError(f"track_fps must be >= 0 (0 = every frame), got {self.track_fps}")
        if self.detect_batch < 1 or self.max_candidates_per_noun < 1:
            raise ValueError("detect_batch and max_candidates_per_noun must be >= 1")
        if self.prompt not in ("box", "mask"):
            raise ValueError(f"prompt must be 'box' or 'mask', got {self.prompt!r}")
        if not 1 <= self.frame_jpeg_quality <= 100:
            raise ValueError(f"frame_jpeg_quality must be in [1, 100], got {self.frame_jpeg_quality}")


def sample_positions(n: int, k: int) -> list[int]:
    """k positions spread uniformly over range(n) (fewer when n < k)."""
    if n <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, num=min(k, n))})


def middle_first(items: Sequence[int]) -> list[int]:
    """Reorder by recursive halving: the middle, then the middles of each half, breadth first."""
    order: list[int] = []
    spans = [(0, len(items) - 1)]
    while spans:
        next_spans = []
        for lo, hi in spans:
            if lo > hi:
                continue
            mid = (lo + hi) // 2
            order.append(items[mid])
            next_spans += [(lo, mid - 1), (mid + 1, hi)]
        spans = next_spans
    return order


def covers(detections: Sequence[Detection], needed: Counter[str]) -> int:
    """How many expressions can get a box of their own noun on this frame."""
    found = Counter(d.label for d in detections)
    return sum(min(found[noun], n) for noun, n in needed.items())


def select_start_frame(
    positions: Sequence[int], detections: Sequence[Sequence[Detection]], needed: Counter[str]
) -> tuple[int, int]:
    """Index into `positions` of the start frame, and how many expressions it covers.

    Algorithm 1 (SelectInitialFrame) takes the first reordered frame with at least |R| detections. Counting
    per noun is the same test when every expression shares one noun, and it refuses a frame where two
    boxes of one noun hide the absence of another. With no such frame, the paper's fallback: most
    detections (first among equals), here ranked by expressions covered first.
    """
    total = sum(needed.values())
    best, best_key = 0, (-1, -1)
    for i, dets in enumerate(detections):
        covered = covers(dets, needed)
        if covered >= total:
            return i, covered
        key = (covered, len(dets))
        if key > best_key:
            best, best_key = i, key
    return best, max(best_key[0], 0)


def assign_one_to_one(scores: np.ndarray) -> list[tuple[int, int]]:
    """Hungarian assignment maximising score; pairs with zero score are not assignments."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-scores)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if scores[r, c] > 0]


@dataclass
class _Candidate:
    obj_id: int
    detection: Detection
    group_index: int  # index among the candidates of its noun, as numbered for the grounder
    frames: dict[int, tuple[Rle, list[float]]] = field(default_factory=dict)


@dataclass
class MaskletResult:
    masklets: list[MaskletRecord]
    rejections: list[RejectionRecord]
    start_frame: int | None  # video frame index the tracker was prompted on
    frames_tracked: int


class ReferringMaskletGenerator:
    method: Method = "strefer"

    def __init__(
        self,
        *,
        detector: Detector,
        tracker: Tracker,
        grounder: Grounder | None,
        box_segmenter: BoxSegmenter | None = None,
        config: MaskletConfig = MaskletConfig(),
        stats: Stats | None = None,
    ) -> None:
        if self.method == "strefer" and grounder is None:
            raise ValueError("the Strefer masklet generator needs a grounder")
        if config.prompt == "mask" and box_segmenter is None:
            raise ValueError("prompt='mask' needs a box_segmenter")
        self.detector = detector
        self.tracker = tracker
        self.grounder = grounder
        self.box_segmenter = box_segmenter
        self.config = config
        self.stats = stats or Stats()

    def start(
        self,
        *,
        video_id: str,
        source: str,
        width: int,
        height: int,
        entities: Sequence[EntityRef],
        provenance: Provenance,
        frames: TrackFrames | None = None,
    ) -> "MaskletPass":
        """Open the pass for one video. `frames` is a frame consumer shared with other passes that track at
        the same size and rate (its owner closes it); without it the pass keeps its own."""
        if not entities:
            raise ValueError("no entities given: pass at least one referring expression")
        duplicates = [e for e, n in Counter(e.expression for e in entities).items() if n > 1]
        if duplicates:
            raise ValueError(f"referring expressions must be distinct; repeated: {duplicates}")
        return MaskletPass(self, video_id, source, width, height, list(entities), provenance, self.method, frames)

    def track_frames(self) -> TrackFrames:
        """A frame consumer of its own (when no shared one is given)."""
        store = FrameStore(
            size=self.tracker.image_size, quality=self.config.frame_jpeg_quality, memory_budget_mb=self.config.frame_memory_mb
        )
        return TrackFrames(store, self.config.track_fps)


class GroundedSam2Baseline(ReferringMaskletGenerator):
    """What Grounded-SAM-2's video demo does, as a baseline on the same decode: the expressions prompt the
    detector on the first frame, SAM 2 tracks those boxes forward only, each labelled by the detector's
    phrase. No grounder."""

    method: Method = "grounded-sam2"

    def __init__(self, *, detector: Detector, tracker: Tracker, config: MaskletConfig = MaskletConfig(), stats: Stats | None = None) -> None:
        super().__init__(detector=detector, tracker=tracker, grounder=None, config=config, stats=stats)


class MaskletPass:
    """The state of one video between its decode and `finish` (one per video, not shared)."""

    def __init__(
        self,
        gen: ReferringMaskletGenerator,
        video_id: str,
        source: str,
        width: int,
        height: int,
        entities: list[EntityRef],
        provenance: Provenance,
        method: Method,
        frames: TrackFrames | None,
    ) -> None:
        self.gen, self.cfg, self.stats = gen, gen.config, gen.stats
        self.video_id, self.source = video_id, source
        self.width, self.height = width, height
        self.entities, self.provenance, self.method = entities, provenance, method
        self._owns_frames = frames is None
        self.frames = gen.track_frames() if frames is None else frames
        # A shared consumer is fed by its owner's registration; feeding it twice would store frames twice.
        self.consumers = [self.frames] if self._owns_frames else []

    # -- results -----------------------------------------------------------------------------------------
    def finish(self) -> MaskletResult:
        """Run the method over the stored frames (and free them when this pass owns them)."""
        runs = {"strefer": self._strefer, "grounded-sam2": self._grounded_sam2}
        try:
            return runs[self.method]()
        finally:
            if self._owns_frames:
                self.stats.count("frames_spilled_to_disk", self.frames.store.spilled)
                self.frames.close()

    def _reject(self, entity: EntityRef, stage: str, reason: str, detail: str, method: Method) -> RejectionRecord:
        self.stats.count(f"rejected_{reason}")
        return RejectionRecord(
            rejection_id=stable_id(self.video_id, self.provenance.config_hash, method, entity.expression, stage),
            source=self.source,
            video_id=self.video_id,
            stage=stage,  # type: ignore[arg-type]
            reason=reason,
            detail=f"[{method}] {detail}",
            expression=entity.expression,
        )

    def _detect(self, positions: Sequence[int], phrases: Sequence[str]) -> list[list[Detection]]:
        images = [self.frames.store.resized(p, self.width, self.height) for p in positions]
        with self.stats.timer("masklets.detect"):
            out = self.gen.detector.detect(
                images, list(phrases), box_threshold=self.cfg.box_threshold, text_threshold=self.cfg.text_threshold
            )
        self.stats.count("detector_calls")
        self.stats.count("frames_detected", len(positions))
        return out

    # -- Strefer Algorithm 1 -------------------------------------------------------------------------------
    def _strefer(self) -> MaskletResult:
        n = len(self.frames.store)
        if n == 0:
            reasons = [self._reject(e, "decode", "no_frames", "no frames were decoded", "strefer") for e in self.entities]
            return MaskletResult([], reasons, None, 0)
        needed = Counter(e.noun for e in self.entities)
        nouns = list(dict.fromkeys(e.noun for e in self.entities))
        order = middle_first(sample_positions(n, self.cfg.num_sample_frames))

        # Step 2: detect batch by batch in middle-first order; stop at the first frame that covers all.
        seen: list[int] = []
        seen_dets: list[list[Detection]] = []
        for i in range(0, len(order), self.cfg.detect_batch):
            batch = order[i : i + self.cfg.detect_batch]
            seen += batch
            seen_dets += self._detect(batch, nouns)
            if any(covers(d, needed) >= len(self.entities) for d in seen_dets[-len(batch) :]):
                break
        best, _ = select_start_frame(seen, seen_dets, needed)
        start, detections = seen[best], seen_dets[best]
        if not detections:
            detail = f"no box for {nouns} on any of {len(seen)} sampled frames (box_threshold {self.cfg.box_threshold})"
            rejections = [self._reject(e, "detect", "no_detection", detail, "strefer") for e in self.entities]
            return MaskletResult([], rejections, None, 0)

        candidates = self._candidates(detections, nouns)
        self._track(candidates, start, both_directions=True)
        masklets, rejections = self._assign(candidates, start)
        return MaskletResult(masklets, rejections, self.frames.frame_index[start], n)

    def _candidates(self, detections: Sequence[Detection], labels: Sequence[str]) -> list[_Candidate]:
        """The start frame's boxes, best first per label, capped per label; obj ids are list positions."""
        out: list[_Candidate] = []
        for label in labels:
            mine = sorted((d for d in detections if d.label == label), key=lambda d: -d.score)
            for j, det in enumerate(mine[: self.cfg.max_candidates_per_noun]):
                out.append(_Candidate(obj_id=len(out), detection=det, group_index=j))
        return out

    def _track(self, candidates: list[_Candidate], start: int, *, both_directions: bool) -> None:
        """All candidates in one tracking session from `start` (see agents.tracking.track_objects)."""
        prompts: dict[int, Prompt] = {c.obj_id: c.detection.box for c in candidates}
        if self.cfg.prompt == "mask":
            assert self.gen.box_segmenter is not None
            image = self.frames.store.resized(start, self.width, self.height)
            boxes = np.array([c.detection.box for c in candidates], dtype=np.float32)
            with self.stats.timer("masklets.segment"):
                prompts = dict(zip(prompts, self.gen.box_segmenter.segment(image, boxes)))
        tracks = track_objects(
            self.gen.tracker, self.frames, width=self.width, height=self.height, prompts=prompts, start=start,
            both_directions=both_directions, stats=self.stats, timer="masklets.track",
        )
        for cand in candidates:
            cand.frames = tracks[cand.obj_id]

    def _assign(self, candidates: list[_Candidate], start: int) -> tuple[list[MaskletRecord], list[RejectionRecord]]:
        """Step 4: per noun group, ask the grounder which numbered box each expression means (RexSeek's
        prompt) and match one-to-one, so two expressions never share a masklet."""
        masklets: list[MaskletRecord] = []
        rejections: list[RejectionRecord] = []
        image = None
        for noun in dict.fromkeys(e.noun for e in self.entities):
            exprs = [e for e in self.entities if e.noun == noun]
            group = [c for c in candidates if c.detection.label == noun]
            if not group:
                detail = f"no '{noun}' box on the start frame"
                rejections += [self._reject(e, "assign", "no_candidate", detail, "strefer") for e in exprs]
                continue
            if len(exprs) == 1 and len(group) == 1:
                assignment = Assignment(method="sole-candidate", candidate_index=0, num_candidates=1, score=1.0)
                masklets.append(self._masklet(exprs[0], group[0], start, assignment, "strefer"))
                continue
            if image is None:
                image = self.frames.store.resized(start, self.width, self.height)
            with self.stats.timer("masklets.ground"):
                answers = self.gen.grounder.ground(image, [c.detection.box for c in group], [e.expression for e in exprs])
            self.stats.count("grounder_calls")
            scores = np.zeros((len(exprs), len(group)))
            for i, answer in enumerate(answers):
                for rank, idx in enumerate(answer.indexes):
                    if 0 <= idx < len(group) and scores[i, idx] == 0:
                        scores[i, idx] = 1.0 / (1 + rank)
            matched = dict(assign_one_to_one(scores))
            for i, entity in enumerate(exprs):
                if i not in matched:
                    detail = f"grounder named none of the {len(group)} free '{noun}' boxes (answer: {answers[i].text!r})"
                    rejections.append(self._reject(entity, "assign", "grounder_no_match", detail, "strefer"))
                    continue
                j = matched[i]
                assignment = Assignment(
                    method="grounder",
                    candidate_index=j,
                    num_candidates=len(group),
                    score=float(scores[i, j]),
                    grounder_answer=answers[i].text,
                )
                masklets.append(self._masklet(entity, group[j], start, assignment, "strefer"))
        return masklets, rejections

    # -- Grounded-SAM-2 video demo -----------------------------------------------------------------------
    def _grounded_sam2(self) -> MaskletResult:
        """What Grounded-SAM-2's video demo does: detect the text prompt on the first frame, prompt SAM 2 with
        those boxes, track forward only; each box is labelled by the detector's phrase."""
        if len(self.frames.store) == 0:
            reasons = [self._reject(e, "decode", "no_frames", "no frames were decoded", "grounded-sam2") for e in self.entities]
            return MaskletResult([], reasons, None, 0)
        phrases = [e.expression for e in self.entities]
        (detections,) = self._detect([0], phrases)
        candidates = self._candidates(detections, phrases)
        masklets, rejections = [], []
        best = {}
        for cand in candidates:  # best-scoring box per phrase names the entity
            if cand.detection.label not in best:
                best[cand.detection.label] = cand
        if candidates:
            self._track(candidates, 0, both_directions=False)
        for entity in self.entities:
            cand = best.get(entity.expression)
            if cand is None:
                detail = "the detector found no box for this phrase on the first frame"
                rejections.append(self._reject(entity, "detect", "no_detection", detail, "grounded-sam2"))
                continue
            n_same = sum(c.detection.label == entity.expression for c in candidates)
            assignment = Assignment(
                method="detector-phrase", candidate_index=0, num_candidates=n_same, score=cand.detection.score
            )
            masklets.append(self._masklet(entity, cand, 0, assignment, "grounded-sam2"))
        return MaskletResult(masklets, rejections, self.frames.frame_index[0], len(self.frames.store))

    # -- records -----------------------------------------------------------------------------------------
    def _masklet(
        self, entity: EntityRef, cand: _Candidate, start: int, assignment: Assignment, method: Method
    ) -> MaskletRecord:
        index, times = self.frames.frame_index, self.frames.times
        frames = frame_masks(self.frames, cand.frames)
        self.stats.count(f"masklets_{method}")
        return MaskletRecord(
            masklet_id=stable_id(self.video_id, self.provenance.config_hash, method, entity.expression),
            video_id=self.video_id,
            expression=entity.expression,
            noun=entity.noun,
            method=method,
            start_frame=index[start],
            start_time=round(times[start], 6),
            detector_score=round(float(cand.detection.score), 6),
            detector_box=[round(float(v), 2) for v in cand.detection.box],
            assignment=assignment,
            num_frames_tracked=len(self.frames.store),
            frames=frames,
            provenance=self.provenance,
        )
