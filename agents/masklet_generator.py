"""Referring Masklet Generator (Strefer §2.1.3, Algorithm 1), with re-detection, and Grounded-SAM-2's video
demo as a baseline.

One decode pass fills a frame store at the tracker's resolution (`consumers`); `finish` then
1. samples frames uniformly and reorders them middle-first (Step 1),
2. detects the generalized nouns on the sampled frames and picks the start frame, the first (middle-first)
   where every expression can have a box (Step 2),
3. prompts one tracking session with every box of that frame and propagates forward and backward (Step 3),
4. assigns each referring expression to masklets with the grounder, one-to-one (Step 4).

Beyond the paper (`redetect`, on by default): the paper's single start frame loses an entity absent from it,
and one that leaves for longer than SAM 2's memory. Here every sampled frame is detected, and detections that
no live track explains prompt new sessions (as DEVA does); duplicates are merged, and the grounder assigns
expressions over every candidate. With re-detection, identity checks (`identity_checks`, agents.identity)
catch the tracker's identity switches at every re-detection frame: a track that follows another object after
a crossing is cut where it switched, and the object it lost gets a new track. Every cut is recorded in the cut
track's masklet (`MaskletRecord.cuts`: the frame it was cut after, the failing frame, the signals), every
re-prompt in the new track's (`prompts`, reason "identity"). Either way no track crosses a
hard cut: each shot is tracked on its own, and only the grounder links an entity's tracks across a cut.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from agents.identity import CHI2_99_4DOF, Cut, IdentityChecker, Lost, best_iou
from agents.tracking import Prompt, Track, frame_masks, track_objects
from engine import masks
from engine.frame_store import FrameStore, TrackFrames
from engine.ids import stable_id
from engine.models.interfaces import BoxSegmenter, Detection, Detector, Embedder, Grounder, Tracker
from engine.stats import Stats
from schemas import Assignment, EntityRef, MaskletRecord, Provenance, RejectionRecord, TrackPrompt
from schemas.records import TrackCut

Method = Literal["strefer", "grounded-sam2"]


@dataclass(frozen=True)
class MaskletConfig:
    num_sample_frames: int = 32
    box_threshold: float = 0.25  # Strefer's released settings
    text_threshold: float = 0.3
    track_fps: float = 10.0  # 0 tracks every decoded frame
    detect_batch: int = 8  # sampled frames per detector call (one batched forward)
    prompt: Literal["box", "mask"] = "box"
    frame_jpeg_quality: int = 95
    frame_memory_mb: float = 1024  # tracked frames beyond this spill to a temporary folder
    max_candidates_per_noun: int = 8  # boxes of one noun prompted per session, best scores first
    redetect: bool = True  # False: Algorithm 1 as published (one start frame, detection stops at it)
    redetect_iou: float = 0.3  # a detection overlapping no live track of its noun this much starts a new one
    # Two tracks are one object when, on every prompt frame of either that the other covers (at least one), the
    # other's mask box overlaps that prompt box this much, and their masks overlap this much (mean over shared frames).
    merge_iou: float = 0.5
    max_sessions_per_shot: int = 8  # tracking sessions per shot: the start frame's, then re-detections
    # Identity checks (with re-detection; agents.identity): every live track is checked at every re-detection
    # frame for the tracker's identity switch; a failing track is cut and its lost object prompted anew.
    identity_checks: bool = True
    identity_history: int = 4  # recent region embeddings a track is compared with, beside its prompt frame's
    appearance_margin: float = 0.03  # cosine by which another detection must look more like a track to count
    motion_gate: float = CHI2_99_4DOF  # CUSUM of Kalman innovations (squared Mahalanobis) at which motion breaks

    def __post_init__(self) -> None:
        if self.num_sample_frames < 1:
            raise ValueError(f"num_sample_frames must be >= 1, got {self.num_sample_frames}")
        for name in ("box_threshold", "text_threshold", "redetect_iou", "merge_iou", "appearance_margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.track_fps < 0:
            raise ValueError(f"track_fps must be >= 0 (0 = every frame), got {self.track_fps}")
        if self.detect_batch < 1 or self.max_candidates_per_noun < 1 or self.max_sessions_per_shot < 1:
            raise ValueError("detect_batch, max_candidates_per_noun and max_sessions_per_shot must be >= 1")
        if self.identity_history < 0 or not self.motion_gate > 0:
            raise ValueError(
                f"identity_history must be >= 0 and motion_gate > 0, got {self.identity_history} and {self.motion_gate}"
            )
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


def link_chains(
    scores: np.ndarray, frames: Sequence[set[int]], matched: Sequence[tuple[int, int]]
) -> dict[int, list[int]]:
    """Per expression (row), its matched candidate then the other candidates the grounder named for it, best
    score first, that no expression took and that share no frame with the candidates it already has."""
    chains = {i: [j] for i, j in matched}
    taken = {j for _, j in matched}
    extras = sorted(
        ((scores[i, j], i, j) for i in chains for j in range(scores.shape[1]) if j not in taken and scores[i, j] > 0),
        key=lambda x: (-x[0], x[1], x[2]),
    )
    for _, i, j in extras:
        if j not in taken and not any(frames[j] & frames[k] for k in chains[i]):
            chains[i].append(j)
            taken.add(j)
    return chains


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes (N, 4) x (M, 4), by torchvision."""
    import torch
    from torchvision.ops import box_iou as tv_box_iou

    return tv_box_iou(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).numpy()


@dataclass
class _Track:
    """One object's track in one session: its prompt(s), the stored positions where its mask is not empty, and
    the identity cuts made on it. A track lives inside one shot; merged duplicates add their prompts and cuts."""

    obj_id: int
    label: str  # the noun (the phrase, for the baseline)
    shot: int
    prompts: list[tuple[int, Detection, str]]  # (store position, detection, reason); the first is its own
    frames: Track = field(default_factory=dict)
    cuts: list[Cut] = field(default_factory=list)  # agents.identity appends one per cut

    @property
    def position(self) -> int:
        return self.prompts[0][0]

    @property
    def detection(self) -> Detection:
        return self.prompts[0][1]

    def visible(self, position: int) -> bool:
        return position in self.frames or any(p == position for p, _, _ in self.prompts)

    def box_at(self, position: int) -> list[float]:
        """The detector's box on a prompt frame, else the tracked mask's box."""
        for p, det, _ in self.prompts:
            if p == position:
                return list(det.box)
        return self.frames[position][1]


@dataclass
class MaskletResult:
    masklets: list[MaskletRecord]
    rejections: list[RejectionRecord]
    start_frames: list[int]  # video frame index of each prompt frame (one per tracking session), in order


class ReferringMaskletGenerator:
    method: Method = "strefer"

    def __init__(
        self,
        *,
        detector: Detector,
        tracker: Tracker,
        grounder: Grounder | None,
        box_segmenter: BoxSegmenter | None = None,
        embedder: Embedder | None = None,
        config: MaskletConfig = MaskletConfig(),
        stats: Stats | None = None,
    ) -> None:
        if self.method == "strefer" and grounder is None:
            raise ValueError("the Strefer masklet generator needs a grounder")
        if config.prompt == "mask" and box_segmenter is None:
            raise ValueError("prompt='mask' needs a box_segmenter")
        if self.method == "strefer" and self.checks_identity(config) and embedder is None:
            raise ValueError(
                "identity checks (masklets.identity_checks, on with redetect) need an embedder: pass the embedder "
                "role, or set identity_checks: false"
            )
        self.detector = detector
        self.tracker = tracker
        self.grounder = grounder
        self.box_segmenter = box_segmenter
        self.embedder = embedder
        self.config = config
        self.stats = stats or Stats()

    @staticmethod
    def checks_identity(config: MaskletConfig) -> bool:
        """Identity checks run with re-detection: they need its detections on every sampled frame."""
        return config.redetect and config.identity_checks

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
        self._next_id = 0  # object ids, unique over the video's sessions

    # -- results -----------------------------------------------------------------------------------------
    def finish(self, cuts: Sequence[int] = ()) -> MaskletResult:
        """Run the method over the stored frames (and free them when this pass owns them). `cuts` are the video
        frame indexes where a hard cut starts a new shot: no track crosses one."""
        runs = {"strefer": self._strefer, "grounded-sam2": self._grounded_sam2}
        try:
            return runs[self.method](cuts)
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
        """Detections on `positions`, `detect_batch` frames per detector call."""
        out: list[list[Detection]] = []
        for i in range(0, len(positions), self.cfg.detect_batch):
            batch = positions[i : i + self.cfg.detect_batch]
            images = [self.frames.store.resized(p, self.width, self.height) for p in batch]
            with self.stats.timer("masklets.detect"):
                out += self.gen.detector.detect(
                    images, list(phrases), box_threshold=self.cfg.box_threshold, text_threshold=self.cfg.text_threshold
                )
            self.stats.count("detector_calls")
            self.stats.count("frames_detected", len(batch))
        return out

    def _shots(self, cuts: Sequence[int]) -> list[tuple[int, int]]:
        """Store positions [lo, hi) of each shot between hard cuts."""
        n = len(self.frames.store)
        bounds = sorted({bisect.bisect_left(self.frames.frame_index, c) for c in cuts} - {0, n} | {0, n})
        return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]

    # -- Strefer Algorithm 1, plus re-detection ----------------------------------------------------------
    def _strefer(self, cuts: Sequence[int]) -> MaskletResult:
        n = len(self.frames.store)
        if n == 0:
            reasons = [self._reject(e, "decode", "no_frames", "no frames were decoded", "strefer") for e in self.entities]
            return MaskletResult([], reasons, [])
        shots = self._shots(cuts)
        needed = Counter(e.noun for e in self.entities)
        nouns = list(dict.fromkeys(e.noun for e in self.entities))
        if self.cfg.redetect:
            samples = self._samples(n, shots)
            detections = dict(zip(samples, self._detect(samples, nouns)))
            tracks = [t for k, shot in enumerate(shots) for t in self._shot_tracks(k, shot, samples, detections, needed, nouns)]
        else:
            tracks = self._paper_tracks(n, shots, needed, nouns)
            samples = sorted({t.position for t in tracks})
        if not tracks:
            detail = f"no box for {nouns} on any sampled frame (box_threshold {self.cfg.box_threshold})"
            rejections = [self._reject(e, "detect", "no_detection", detail, "strefer") for e in self.entities]
            return MaskletResult([], rejections, [])
        masklets, rejections = self._assign(tracks, samples, shots)
        starts = [self.frames.frame_index[p] for p in dict.fromkeys(t.position for t in tracks)]
        return MaskletResult(masklets, rejections, starts)

    def _paper_tracks(
        self, n: int, shots: list[tuple[int, int]], needed: Counter[str], nouns: list[str]
    ) -> list[_Track]:
        """Algorithm 1 as published: detect on the sample frames in middle-first order, batch by batch, stop at
        the first frame where every expression can have a box (Step 2), and track that frame's boxes forward
        and backward (Step 3), here only within its shot."""
        order = middle_first(sample_positions(n, self.cfg.num_sample_frames))
        seen: list[int] = []
        seen_dets: list[list[Detection]] = []
        for i in range(0, len(order), self.cfg.detect_batch):
            batch = order[i : i + self.cfg.detect_batch]
            seen += batch
            seen_dets += self._detect(batch, nouns)
            if any(covers(d, needed) >= len(self.entities) for d in seen_dets[-len(batch) :]):
                break
        best, _ = select_start_frame(seen, seen_dets, needed)
        if not seen_dets[best]:
            return []
        k = next(k for k, (lo, hi) in enumerate(shots) if lo <= seen[best] < hi)
        return self._session(seen_dets[best], seen[best], k, shots[k], "start", nouns)

    def _samples(self, n: int, shots: list[tuple[int, int]]) -> list[int]:
        """`num_sample_frames` positions spread over the video, plus the middle of any shot they all miss."""
        samples = set(sample_positions(n, self.cfg.num_sample_frames))
        for lo, hi in shots:
            if not any(lo <= p < hi for p in samples):
                samples.add((lo + hi - 1) // 2)
        return sorted(samples)

    def _shot_tracks(
        self,
        k: int,
        shot: tuple[int, int],
        samples: list[int],
        detections: dict[int, list[Detection]],
        needed: Counter[str],
        nouns: list[str],
    ) -> list[_Track]:
        """Tracks of one shot. Algorithm 1's start frame first (its Steps 1-3 within the shot); then, as DEVA
        does, the other sampled frames are checked against the live tracks: the frame with the most
        detections that overlap no track of their noun (box IoU below `redetect_iou`) prompts a new session,
        until every detection is explained or `max_sessions_per_shot` is reached. An entity absent from the
        start frame, or lost after it left for longer than the tracker's memory, gets a track this way.
        Sessions prompt on one frame each (sam2's batched predictor takes objects not prompted on a frame
        that carries prompts as absent there); duplicates of one object are merged afterwards.

        With identity checks, every new track is checked at the shot's sampled frames first (agents.identity);
        a track that switched to another object is cut there (each cut recorded on it, see `_Track.cuts`), and
        the object it lost, where a detection of it was found and no track holds it, is prompted in a session of
        its own ("identity") before any re-detection, within the same `max_sessions_per_shot`."""
        order = middle_first([p for p in samples if shot[0] <= p < shot[1]])
        if not order:
            return []
        best, _ = select_start_frame(order, [detections[p] for p in order], needed)
        tracks = self._session(detections[order[best]], order[best], k, shot, "start", nouns)
        prompted, sessions = {order[best]}, 1
        checker = self._identity_checker(order, detections) if self.gen.checks_identity(self.cfg) else None
        checked: set[int] = set()
        lost: list[Lost] = []
        while True:
            if checker is not None:
                lost += checker.check([t for t in tracks if t.obj_id not in checked], tracks)
                checked |= {t.obj_id for t in tracks}
                lost = [x for x in lost if not self._held(x, tracks, detections)]
            if sessions >= self.cfg.max_sessions_per_shot:
                break
            if lost:  # a track switched identity: prompt the object it lost where the switch was found
                frame = Counter(x.position for x in lost).most_common(1)[0][0]
                fresh, reason = [x.detection for x in lost if x.position == frame], "identity"
                lost = [x for x in lost if x.position != frame]
                self.stats.count("identity_sessions")
            else:
                frame, fresh = None, []
                for p in order:
                    unexplained = [] if p in prompted else self._unexplained(detections[p], tracks, p)
                    if len(unexplained) > len(fresh):
                        frame, fresh = p, unexplained
                if frame is None:
                    break
                reason = "redetect"
                self.stats.count("redetect_sessions")
            prompted.add(frame)
            sessions += 1
            tracks += self._session(fresh, frame, k, shot, reason, nouns)
        return self._merge(tracks)

    def _identity_checker(self, samples: Sequence[int], detections: dict[int, list[Detection]]) -> IdentityChecker:
        assert self.gen.embedder is not None and self.gen.grounder is not None
        expressions: dict[str, list[str]] = {}
        for e in self.entities:
            expressions.setdefault(e.noun, []).append(e.expression)
        return IdentityChecker(
            embedder=self.gen.embedder, grounder=self.gen.grounder,
            image=lambda p: self.frames.store.resized(p, self.width, self.height),
            detections=detections, expressions=expressions, samples=samples, overlap_iou=self.cfg.redetect_iou,
            history=self.cfg.identity_history, appearance_margin=self.cfg.appearance_margin,
            motion_gate=self.cfg.motion_gate, stats=self.stats,
        )

    def _held(self, lost: Lost, tracks: Sequence[_Track], detections: dict[int, list[Detection]]) -> bool:
        """Whether a track holds the lost object's detection: it is the detection that track's mask box
        overlaps most. Mere overlap is not enough: where a switch is found, the lost object is often still
        next to the one that took its track."""
        p, det = lost.position, lost.detection
        boxes = [d.box for d in detections[p] if d.label == det.label]
        return any(
            best_iou(t.frames[p][1], boxes, self.cfg.redetect_iou) == boxes.index(det.box)
            for t in tracks
            if t.label == det.label and p in t.frames
        )

    def _unexplained(self, detections: Sequence[Detection], tracks: Sequence[_Track], position: int) -> list[Detection]:
        """Detections whose box overlaps the mask box of no track of their label at `position`."""
        out = []
        for det in detections:
            live = [t.frames[position][1] for t in tracks if t.label == det.label and position in t.frames]
            if not live or box_iou(np.array([det.box]), np.array(live)).max() < self.cfg.redetect_iou:
                out.append(det)
        return out

    def _merge(self, tracks: list[_Track]) -> list[_Track]:
        """Join tracks of one object found from two prompt frames: same label and `_same_object` (the prompt boxes
        held where covered, masks overlapping by at least `merge_iou`). A track joins the first earlier one that
        qualifies, adding its frames, prompts and cuts; on a frame both cover, the mask of the track prompted
        nearer in time is kept."""
        merged: list[_Track] = []
        for track in tracks:
            twin = next((m for m in merged if m.label == track.label and self._same_object(m, track)), None)
            if twin is None:
                merged.append(track)
                continue
            self.stats.count("tracks_merged")
            for position, value in track.frames.items():
                mine = min(abs(position - p) for p, _, _ in twin.prompts)
                if position not in twin.frames or abs(position - track.position) < mine:
                    twin.frames[position] = value
            twin.prompts += track.prompts
            twin.cuts += track.cuts
        return merged

    def _same_object(self, a: _Track, b: _Track) -> bool:
        """Whether two tracks follow one object. Masks that overlap are not enough: after an identity switch two
        tracks cover one object, and at a crossing two objects' masks touch. So their prompts must vouch for it,
        where the detector gave the object its identity: on every prompt frame of either track that the other
        track covers, the other's mask box must overlap that prompt's box by `merge_iou` (box IoU), and there
        must be at least one such frame. One direction can suffice: where `b` has no mask on `a`'s prompt
        frames, `a` holding `b`'s prompt box on `b`'s is enough. Then their masks must overlap by `merge_iou`
        on average (mask IoU, mean over the frames both cover; none shared, never one object)."""
        shared = sorted(set(a.frames) & set(b.frames))
        held = [
            box_iou(np.array([det.box]), np.array([other.frames[p][1]]))[0, 0] >= self.cfg.merge_iou
            for one, other in ((a, b), (b, a))
            for p, det, _ in one.prompts
            if p in other.frames
        ]
        if not shared or not held or not all(held):
            return False
        ious = [masks.iou(a.frames[p][0], b.frames[p][0]) for p in shared]
        return float(np.mean(ious)) >= self.cfg.merge_iou

    def _session(
        self,
        detections: Sequence[Detection],
        position: int,
        shot_index: int,
        shot: tuple[int, int],
        reason: str,
        labels: Sequence[str],
        *,
        both_directions: bool = True,
    ) -> list[_Track]:
        """One tracking session: `position`'s boxes, best first per label and capped per label, prompted
        together and tracked over the shot (see agents.tracking.track_objects)."""
        chosen = [
            det
            for label in labels
            for det in sorted((d for d in detections if d.label == label), key=lambda d: -d.score)[: self.cfg.max_candidates_per_noun]
        ]
        if not chosen:
            return []
        ids = range(self._next_id, self._next_id + len(chosen))
        self._next_id += len(chosen)
        prompts: dict[int, Prompt] = {i: det.box for i, det in zip(ids, chosen)}
        if self.cfg.prompt == "mask":
            assert self.gen.box_segmenter is not None
            image = self.frames.store.resized(position, self.width, self.height)
            boxes = np.array([det.box for det in chosen], dtype=np.float32)
            with self.stats.timer("masklets.segment"):
                prompts = dict(zip(prompts, self.gen.box_segmenter.segment(image, boxes)))
        tracked = track_objects(
            self.gen.tracker, self.frames, width=self.width, height=self.height, prompts=prompts, start=position,
            both_directions=both_directions, stats=self.stats, timer="masklets.track", span=shot,
        )
        return [
            _Track(obj_id=i, label=det.label, shot=shot_index, prompts=[(position, det, reason)], frames=tracked[i])
            for i, det in zip(ids, chosen)
        ]

    def _assign(
        self, tracks: list[_Track], samples: Sequence[int], shots: list[tuple[int, int]]
    ) -> tuple[list[MaskletRecord], list[RejectionRecord]]:
        """Step 4: per noun, ask the grounder which numbered box each expression means (RexSeek's prompt), on
        frames chosen so every candidate is shown where it is visible, and match one-to-one so two
        expressions never share a masklet. An expression then also takes the other candidates the grounder
        named for it that no expression took and that never overlap its own in time: the same entity on
        another track, after it left the tracker's memory or across a hard cut (the tracker alone never
        links those)."""
        masklets: list[MaskletRecord] = []
        rejections: list[RejectionRecord] = []
        for noun in dict.fromkeys(e.noun for e in self.entities):
            exprs = [e for e in self.entities if e.noun == noun]
            group = [t for t in tracks if t.label == noun]
            if not group:
                detail = f"no '{noun}' box on the sampled frames tracked"
                rejections += [self._reject(e, "assign", "no_candidate", detail, "strefer") for e in exprs]
                continue
            if len(exprs) == 1 and len(group) == 1:
                assignment = Assignment(method="sole-candidate", candidate_index=0, num_candidates=1, score=1.0)
                masklets.append(self._masklet(exprs[0], [group[0]], assignment, "strefer", shots))
                continue
            scores, texts = self._ground(group, exprs, samples)
            chains = link_chains(scores, [set(t.frames) | {t.position} for t in group], assign_one_to_one(scores))
            for i, entity in enumerate(exprs):
                if i not in chains:
                    detail = f"grounder named none of the {len(group)} free '{noun}' boxes (answer: {texts[i]!r})"
                    rejections.append(self._reject(entity, "assign", "grounder_no_match", detail, "strefer"))
                    continue
                first, *linked = chains[i]
                assignment = Assignment(
                    method="grounder", candidate_index=first, num_candidates=len(group), score=float(scores[i, first]),
                    grounder_answer=texts[i], linked=linked,
                )
                masklets.append(self._masklet(entity, [group[j] for j in chains[i]], assignment, "strefer", shots))
        return masklets, rejections

    def _ground(self, group: list[_Track], exprs: list[EntityRef], samples: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        """Scores (expressions x candidates) from the grounder, asked on as few frames as show every candidate
        once: greedily the frame (prompt frames and sampled frames) where most not-yet-shown candidates are
        visible, prompt frames first among equals. Every candidate visible there is numbered on it."""
        scores = np.zeros((len(exprs), len(group)))
        texts: list[list[str]] = [[] for _ in exprs]
        prompt_frames = {p for t in group for p, _, _ in t.prompts}
        views = sorted(prompt_frames | set(samples))
        remaining = set(range(len(group)))
        while remaining:
            position = max(
                views, key=lambda p: (sum(group[j].visible(p) for j in remaining), p in prompt_frames, -p)
            )
            shown = [j for j, t in enumerate(group) if t.visible(position)]
            if not remaining & set(shown):  # a candidate visible on no view frame: cannot be shown
                break
            image = self.frames.store.resized(position, self.width, self.height)
            with self.stats.timer("masklets.ground"):
                answers = self.gen.grounder.ground(
                    image, [tuple(group[j].box_at(position)) for j in shown], [e.expression for e in exprs]
                )
            self.stats.count("grounder_calls")
            for i, answer in enumerate(answers):
                texts[i].append(answer.text)
                for rank, idx in enumerate(answer.indexes):
                    if 0 <= idx < len(shown):
                        scores[i, shown[idx]] = max(scores[i, shown[idx]], 1.0 / (1 + rank))
            remaining -= set(shown)
        return scores, [" | ".join(t) for t in texts]

    # -- Grounded-SAM-2 video demo -----------------------------------------------------------------------
    def _grounded_sam2(self, cuts: Sequence[int]) -> MaskletResult:
        """What Grounded-SAM-2's video demo does: detect the text prompt on the first frame, prompt SAM 2 with
        those boxes, track forward only, across cuts; each box is labelled by the detector's phrase."""
        n = len(self.frames.store)
        if n == 0:
            reasons = [self._reject(e, "decode", "no_frames", "no frames were decoded", "grounded-sam2") for e in self.entities]
            return MaskletResult([], reasons, [])
        phrases = [e.expression for e in self.entities]
        (detections,) = self._detect([0], phrases)
        tracks = self._session(detections, 0, 0, (0, n), "first-frame", phrases, both_directions=False)
        masklets, rejections = [], []
        for entity in self.entities:
            mine = [t for t in tracks if t.label == entity.expression]  # best-scoring box first
            if not mine:
                detail = "the detector found no box for this phrase on the first frame"
                rejections.append(self._reject(entity, "detect", "no_detection", detail, "grounded-sam2"))
                continue
            assignment = Assignment(
                method="detector-phrase", candidate_index=0, num_candidates=len(mine), score=mine[0].detection.score
            )
            masklets.append(self._masklet(entity, mine[:1], assignment, "grounded-sam2", [(0, n)]))
        return MaskletResult(masklets, rejections, [self.frames.frame_index[0]] if tracks else [])

    # -- records -----------------------------------------------------------------------------------------
    def _masklet(
        self, entity: EntityRef, chain: list[_Track], assignment: Assignment, method: Method, shots: list[tuple[int, int]]
    ) -> MaskletRecord:
        index, times = self.frames.frame_index, self.frames.times
        track: Track = {}
        for t in chain:  # tracks of a chain never share a frame
            track.update(t.frames)
        prompts = [
            TrackPrompt(
                frame_index=index[p], timestamp=round(times[p], 6), box=[round(float(v), 2) for v in det.box],
                detector_score=round(float(det.score), 6), reason=reason, track=k,  # type: ignore[arg-type]
            )
            for k, t in enumerate(chain)
            for p, det, reason in t.prompts
        ]
        cuts = [
            TrackCut(
                frame_index=index[c.after], timestamp=round(times[c.after], 6), found_frame_index=index[c.found],
                direction="forward" if c.forward else "backward", reason="identity", signals=list(c.signals), track=k,
            )
            for k, t in enumerate(chain)
            for c in t.cuts
        ]
        first = chain[0]
        self.stats.count(f"masklets_{method}")
        return MaskletRecord(
            masklet_id=stable_id(self.video_id, self.provenance.config_hash, method, entity.expression),
            video_id=self.video_id,
            expression=entity.expression,
            noun=entity.noun,
            method=method,
            start_frame=index[first.position],
            start_time=round(times[first.position], 6),
            detector_score=round(float(first.detection.score), 6),
            detector_box=[round(float(v), 2) for v in first.detection.box],
            assignment=assignment,
            num_frames_tracked=sum(hi - lo for lo, hi in {shots[t.shot] for t in chain}),
            track_fps=self.cfg.track_fps,
            prompts=prompts,
            cuts=cuts,
            frames=frame_masks(self.frames, track),
            provenance=self.provenance,
        )
