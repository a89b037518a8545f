"""Identity checks for the Referring Masklet Generator's tracks (beyond Strefer's Algorithm 1).

SAM 2's known failure is the identity switch: when two look-alikes cross, or one passes in front of another, the
track follows the wrong object afterwards and keeps its mask confidently (the failure SAMURAI, SAM2Long and
DAM4SAM were written to fix). Re-detection alone cannot see it: after a switch both objects are "explained",
one of them twice. So at every re-detection frame each live track is checked against the signals a real system
has:
- motion: a constant-velocity Kalman filter on the track's box (centre and size), frame by frame, with the noise
  weights SAMURAI uses as SAM 2's motion prior; one box far outside the filter's prediction, or a run of boxes
  somewhat outside it, is a break, and the prediction from before the break says where the object should be;
- appearance: an embedding (the `embedder` role, SigLIP) of the track's masked region against its prompt-frame
  embedding and its recent history, and of the detections it does not hold against the same references;
- the detector's boxes: which detection the track holds, and whether another track holds it too;
- where these disagree, the grounder, asked again on that frame which box the track's expression means.
A failing track is cut at the last frame it passed (at the motion break where there is one), and the object it
lost is handed back to be prompted anew; the grounder's assignment then joins the pieces, as across exits. Every
cut is kept on the track that was cut (`Cut`: the frame it was cut after, the check that failed and the signals
that failed it), whether or not its lost object is prompted again, and its masklet carries it
(`MaskletRecord.cuts`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, MutableMapping, Protocol, Sequence

import numpy as np

from engine import masks
from engine.models.interfaces import Detection, Embedder, Grounder
from engine.stats import Stats
from schemas import Rle

Box = Sequence[float]  # xyxy pixels
FILL = 128  # outside a region's mask: SigLIP's mean gray (0 after its normalisation)
CHI2_99_4DOF = 13.28  # squared Mahalanobis distance that 99% of a 4-d Gaussian's samples stay under
DRIFT = 6.0  # taken off each frame's innovation in the CUSUM (a consistent filter's average 4, at 4 dof)
EMBED_CHUNK = 256  # crops per embedder call: bounds the crops held at once (SigLIP so400m: 384 px each)


Signal = Literal["motion", "appearance", "detector", "grounder"]


@dataclass(frozen=True)
class Cut:
    """One identity cut of a track, in store positions: its frames beyond `after` (in the walk's direction from its
    prompt frame) were dropped. `after` is the last frame it kept on that side (its prompt frame where it kept
    none); `found` the check frame where it failed; `signals` what spoke against it there, in a fixed order:
    motion (the prediction from before a break lands elsewhere), appearance (another detection looks more like
    it), detector (another track holds its detection, or its mask sits on another noun's), and grounder last
    where the others disagreed and the grounder named another box (without it, motion and appearance agreed)."""

    after: int
    found: int
    forward: bool
    signals: tuple[Signal, ...]


class TrackLike(Protocol):
    obj_id: int
    label: str
    frames: MutableMapping[int, tuple[Rle, list[float]]]  # store position -> (mask, its box)
    cuts: list[Cut]  # the identity cuts made on it, in the order they were made

    @property
    def position(self) -> int: ...

    @property
    def detection(self) -> Detection: ...


# -- motion ---------------------------------------------------------------------------------------------------


class BoxKalman:
    """Constant-velocity Kalman filter on (cx, cy, w, h), one step per tracked frame. Noise scales with the box,
    with ByteTrack's weights that SAMURAI uses for SAM 2: 1/20 of the size for position, 1/160 for velocity."""

    POSITION, VELOCITY = 1 / 20, 1 / 160

    def __init__(self, box: Box) -> None:
        z = _xywh(box)
        self.mean = np.concatenate([z, np.zeros(4)])
        scale = np.array([z[2], z[3], z[2], z[3]])
        self.cov = np.diag(np.concatenate([2 * self.POSITION * scale, 10 * self.VELOCITY * scale]) ** 2)

    def copy(self) -> "BoxKalman":
        twin = object.__new__(BoxKalman)
        twin.mean, twin.cov = self.mean.copy(), self.cov.copy()
        return twin

    def _scale(self) -> np.ndarray:
        w, h = max(self.mean[2], 1.0), max(self.mean[3], 1.0)
        return np.array([w, h, w, h])

    def predict(self, steps: int = 1) -> None:
        f = np.eye(8)
        f[:4, 4:] = np.eye(4)
        for _ in range(steps):
            scale = self._scale()
            q = np.diag(np.concatenate([self.POSITION * scale, self.VELOCITY * scale]) ** 2)
            self.mean = f @ self.mean
            self.cov = f @ self.cov @ f.T + q

    def _innovation(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        s = self.cov[:4, :4] + np.diag((self.POSITION * self._scale()) ** 2)
        return _xywh(box) - self.mean[:4], s

    def distance(self, box: Box) -> float:
        """Squared Mahalanobis distance of `box` from the prediction."""
        d, s = self._innovation(box)
        return float(d @ np.linalg.solve(s, d))

    def update(self, box: Box) -> None:
        d, s = self._innovation(box)
        gain = np.linalg.solve(s, self.cov[:4, :]).T  # P H^T S^-1 (S is symmetric)
        self.mean = self.mean + gain @ d
        self.cov = self.cov - gain @ self.cov[:4, :]

    @property
    def box(self) -> list[float]:
        cx, cy, w, h = self.mean[:4]
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _xywh(box: Box) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])


@dataclass
class MotionTrace:
    """A track's boxes walked outward from its prompt frame through the filter. `breaks` are the positions (in
    walk order) where the box left the gate; `before[b]` is the filter predicted to `b` without the box seen
    there, i.e. where the object it followed until then should be. After a break the filter restarts."""

    forward: bool
    breaks: list[int] = field(default_factory=list)
    before: dict[int, BoxKalman] = field(default_factory=dict)

    def beyond(self, position: int, than: int) -> bool:
        """`position` lies further from the prompt frame than `than` does, in this walk's direction."""
        return position > than if self.forward else position < than

    def first_break(self, after: int, upto: int) -> int | None:
        """The first break beyond `after` and not beyond `upto`."""
        return next((b for b in self.breaks if self.beyond(b, after) and not self.beyond(b, upto)), None)

    def predicted(self, brk: int, position: int) -> list[float]:
        """Where the object followed before break `brk` should be at `position`."""
        kf = self.before[brk].copy()
        kf.predict(abs(position - brk))
        return kf.box


def motion_trace(boxes: Sequence[tuple[int, Box]], gate: float, *, forward: bool) -> MotionTrace:
    """Run the filter over `(position, box)` in walk order (outward from the prompt frame); gaps between
    positions (frames without a mask) are predicted through. Breaks are found by a CUSUM of the innovations
    (squared Mahalanobis distances less DRIFT) against `gate`: one jump beyond gate + DRIFT breaks at once,
    and so does a run of moderate ones (a switch onto a look-alike next to the object, which then moves
    differently). The break is placed where the run began, and the filter restarts there."""
    trace = MotionTrace(forward=forward)
    if not boxes:
        return trace
    kf, last = BoxKalman(boxes[0][1]), boxes[0][0]
    run, start, before = 0.0, 1, kf
    i = 1
    while i < len(boxes):
        position, box = boxes[i]
        kf.predict(abs(position - last))
        last = position
        if run == 0.0:  # a run of large innovations would begin here
            start, before = i, kf.copy()
        run = max(0.0, run + kf.distance(box) - DRIFT)
        if run > gate:
            brk = boxes[start][0]
            trace.breaks.append(brk)
            trace.before[brk] = before
            kf, last, run = BoxKalman(boxes[start][1]), brk, 0.0
            i = start + 1  # replay the frames since the break on the restarted filter
            continue
        kf.update(box)
        i += 1
    return trace


# -- appearance -----------------------------------------------------------------------------------------------


def region_crop(image: np.ndarray, mask: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The masked region in its box, gray outside the mask, squash-resized to the embedder's input size."""
    import cv2

    x0, y0, x1, y1 = _pixel_box(box, image.shape)
    crop = image[y0:y1, x0:x1].copy()
    crop[~mask[y0:y1, x0:x1]] = FILL
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def box_crop(image: np.ndarray, box: Box, size: int) -> np.ndarray:
    import cv2

    x0, y0, x1, y1 = _pixel_box(box, image.shape)
    return cv2.resize(image[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)


def _pixel_box(box: Box, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    h, w = shape[:2]
    x0, y0 = min(max(int(np.floor(box[0])), 0), w - 1), min(max(int(np.floor(box[1])), 0), h - 1)
    x1, y1 = max(min(int(np.ceil(box[2])), w), x0 + 1), max(min(int(np.ceil(box[3])), h), y0 + 1)
    return x0, y0, x1, y1


def appearance_pick(
    own: np.ndarray, candidates: Mapping[int, np.ndarray], references: Sequence[np.ndarray], margin: float
) -> int | None:
    """The candidate that looks more like the track's references (mean cosine) than the track's own region does,
    by at least `margin`; None when none does."""
    if not candidates:
        return None
    refs = np.stack(references)

    def similarity(e: np.ndarray) -> float:
        return float((refs @ e).mean())

    best = max(candidates, key=lambda j: similarity(candidates[j]))
    return best if similarity(candidates[best]) > similarity(own) + margin else None


# -- the verdict ----------------------------------------------------------------------------------------------

ELSEWHERE = -1  # motion: the object should be where no detection is
Verdict = Literal["pass", "cut", "ask", "unsure"]  # unsure: the grounder could not say


def judge(held: int | None, motion: int | None, appearance: int | None, doubt: bool) -> tuple[Verdict, int | None]:
    """Combine the signals at one frame. `held`: the detection the track's mask holds; `motion`: None while the
    box moved on smoothly, else the detection the prediction from before the break lands on (or ELSEWHERE);
    `appearance`: a detection that looks more like the track than its own region does, else None; `doubt`: the
    detector's boxes contradict the track (another track holds the same detection, or the mask sits on an
    object of another noun). Pass when nothing speaks against the track; cut when motion and appearance both
    name the same other detection; otherwise ask the grounder."""
    against = [x for x in (motion, appearance) if x is not None and x != held]
    if not against and not doubt:
        return "pass", None
    if not doubt and motion == appearance and motion not in (None, ELSEWHERE, held):
        return "cut", motion
    return "ask", None


def spoke_against(held: int | None, motion: int | None, appearance: int | None, doubt: bool) -> tuple[Signal, ...]:
    """The signals (judge's inputs) that speak against the track at one check, in a fixed order."""
    out: list[Signal] = []
    if motion not in (None, held):
        out.append("motion")
    if appearance not in (None, held):
        out.append("appearance")
    if doubt:
        out.append("detector")
    return tuple(out)


def best_iou(box: Box, boxes: Sequence[Box], at_least: float) -> int | None:
    """Index of the box overlapping `box` most, if that IoU reaches `at_least`."""
    if not boxes:
        return None
    ious = [_iou(box, b) for b in boxes]
    best = int(np.argmax(ious))
    return best if ious[best] >= at_least else None


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# -- the checker ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lost:
    """An object a track lost at an identity switch: its detection on the frame the switch was found."""

    position: int
    detection: Detection


class IdentityChecker:
    """Checks tracks of one shot at its sampled (re-detection) frames and cuts those that switched identity.

    The embeddings a check needs (every region and detection crop) are computed up front in batched embedder
    calls; grounder answers are cached per frame and noun."""

    def __init__(
        self,
        *,
        embedder: Embedder,
        grounder: Grounder,
        image: Callable[[int], np.ndarray],
        detections: Mapping[int, list[Detection]],
        expressions: Mapping[str, list[str]],
        samples: Sequence[int],
        overlap_iou: float,
        history: int,
        appearance_margin: float,
        motion_gate: float,
        stats: Stats,
    ) -> None:
        self.embedder, self.grounder, self.image = embedder, grounder, image
        self.detections, self.expressions, self.samples = detections, expressions, sorted(samples)
        self.overlap_iou, self.history = overlap_iou, history
        self.appearance_margin, self.motion_gate = appearance_margin, motion_gate
        self.stats = stats
        self._det_embeddings: dict[tuple[int, int], np.ndarray] = {}
        self._answers: dict[tuple[int, str, tuple[float, ...] | None], list[int | None]] = {}

    def check(self, tracks: Sequence[TrackLike], live: Sequence[TrackLike]) -> list[Lost]:
        """Check `tracks` (new ones) in both directions from their prompt frames; `live` are all tracks of the
        shot, for which detections are held. Failing tracks are cut in place, and each cut is appended to its
        track's `cuts`. Returns the objects they lost (none where the right detection was not found)."""
        with self.stats.timer("masklets.identity"):
            regions = self._embed(tracks)
            lost: list[Lost] = []
            for track in tracks:
                for forward in (True, False):
                    found = self._walk(track, forward, regions, live)
                    if found is not None:
                        lost.append(found)
            return lost

    # -- embeddings -------------------------------------------------------------------------------------
    def _checks(self, track: TrackLike, forward: bool) -> list[int]:
        p0 = track.position
        return [p for p in (self.samples if forward else self.samples[::-1])
                if (p > p0 if forward else p < p0) and p in track.frames]

    def _embed(self, tracks: Sequence[TrackLike]) -> dict[tuple[int, int], np.ndarray]:
        """Region embeddings per (track, position): its prompt frame and every check frame; crops of the
        detections of its noun on those frames, once. Batched, EMBED_CHUNK crops per embedder call."""
        size = self.embedder.input_size
        crops: list[np.ndarray] = []
        keys: list[tuple[str, int, int]] = []
        queued: set[tuple[int, int]] = set()
        images: dict[int, np.ndarray] = {}
        regions: dict[tuple[int, int], np.ndarray] = {}

        def image(p: int) -> np.ndarray:
            if p not in images:
                images[p] = self.image(p)
            return images[p]

        def flush() -> None:
            with self.stats.timer("masklets.embed"):
                vectors = np.asarray(self.embedder.embed(crops), dtype=np.float32)
            self.stats.count("identity_embedder_calls")
            self.stats.count("identity_crops_embedded", len(crops))
            for (kind, a, b), v in zip(keys, vectors):
                (regions if kind == "track" else self._det_embeddings)[a, b] = v
            crops.clear()
            keys.clear()

        for track in tracks:
            for p in [track.position, *self._checks(track, True), *self._checks(track, False)]:
                if p in track.frames:
                    rle, box = track.frames[p]
                    crops.append(region_crop(image(p), masks.decode(rle), box, size))
                else:  # no mask on its own prompt frame: the detector's box stands in
                    crops.append(box_crop(image(p), track.detection.box, size))
                keys.append(("track", track.obj_id, p))
                for j, det in enumerate(self.detections.get(p, [])):
                    if det.label == track.label and (p, j) not in self._det_embeddings and (p, j) not in queued:
                        crops.append(box_crop(image(p), det.box, size))
                        keys.append(("det", p, j))
                        queued.add((p, j))
                if len(crops) >= EMBED_CHUNK:
                    flush()
        if crops:
            flush()
        return regions

    # -- one direction of one track --------------------------------------------------------------------
    def _walk(
        self, track: TrackLike, forward: bool, regions: Mapping[tuple[int, int], np.ndarray], live: Sequence[TrackLike]
    ) -> Lost | None:
        p0 = track.position
        walk = sorted((p for p in track.frames if p == p0 or (p > p0 if forward else p < p0)), reverse=not forward)
        trace = motion_trace([(p, track.frames[p][1]) for p in walk], self.motion_gate, forward=forward)
        references = [regions[track.obj_id, p0]]
        recent: deque[np.ndarray] = deque(maxlen=self.history)
        anchor = p0  # the last check the track passed clearly: no motion break since, or the grounder agreed
        for p in self._checks(track, forward):
            dets = [d for d in self.detections.get(p, []) if d.label == track.label]
            index = [j for j, d in enumerate(self.detections.get(p, [])) if d.label == track.label]
            box = track.frames[p][1]
            held = best_iou(box, [d.box for d in dets], self.overlap_iou)
            motion = None
            brk = trace.first_break(anchor, p)
            if brk is not None:
                moved = best_iou(trace.predicted(brk, p), [d.box for d in dets], self.overlap_iou)
                motion = ELSEWHERE if moved is None else moved
            own = regions[track.obj_id, p]
            others = {k: self._det_embeddings[p, index[k]] for k in range(len(dets)) if k != held}
            appearance = appearance_pick(own, others, [*references, *recent], self.appearance_margin)
            doubt = self._doubt(track, p, box, held, dets, live)
            self.stats.count("identity_checks")
            verdict, pick = judge(held, motion, appearance, doubt)
            signals = spoke_against(held, motion, appearance, doubt)
            confirmed = False
            if verdict == "ask":
                verdict, pick = self._ask(track, p, dets, held, box)
                confirmed = verdict == "pass"
                signals += ("grounder",)
            if verdict in ("pass", "unsure"):
                # After a break, a track that merely sits where its object should be (an occluder in front of
                # it does too) has not shown it still holds the object: the break stays open until it does.
                if confirmed or (verdict == "pass" and brk is None):
                    anchor = p
                    recent.append(own)
                continue
            after = self._cut(track, trace, anchor, brk)
            track.cuts.append(Cut(after=after, found=p, forward=forward, signals=signals))
            self.stats.count("identity_cuts")
            return Lost(p, dets[pick]) if pick is not None and pick >= 0 else None
        return None

    def _doubt(
        self, track: TrackLike, p: int, box: Box, held: int | None, dets: list[Detection], live: Sequence[TrackLike]
    ) -> bool:
        """The detector's boxes contradict the track at `p`: another live track of its noun holds the same
        detection (two tracks on one object: one of them may have taken it from the other, whose own object
        then has none), or its mask holds no detection of its noun but one of another noun."""
        if held is None:
            other = [d.box for d in self.detections.get(p, []) if d.label != track.label]
            return best_iou(box, other, self.overlap_iou) is not None
        peers = [t for t in live if t is not track and t.label == track.label and p in t.frames]
        return any(best_iou(t.frames[p][1], [d.box for d in dets], self.overlap_iou) == held for t in peers)

    def _ask(
        self, track: TrackLike, p: int, dets: list[Detection], held: int | None, box: Box
    ) -> tuple[Verdict, int | None]:
        """The grounder, on the track's prompt frame (which expression its object is) and on `p` (where that
        expression's object is now). Without an answer on either it is unsure, and the track is not cut: no cut
        without evidence."""
        start = [d for d in self.detections.get(track.position, []) if d.label == track.label]
        mine = next((j for j, d in enumerate(start) if tuple(d.box) == tuple(track.detection.box)), None)
        if mine is None:
            return "unsure", None
        at_start = self._grounded(track.position, track.label, [d.box for d in start], None)
        expressions = [k for k, j in enumerate(at_start) if j == mine]
        if not expressions:
            return "unsure", None
        extra = None if held is not None else tuple(float(v) for v in box)  # the track's own box, to be named
        now = self._grounded(p, track.label, [d.box for d in dets], extra)[expressions[0]]
        if now is None:
            return "unsure", None
        if now == held or (extra is not None and now == len(dets)):
            return "pass", None
        return "cut", now

    def _grounded(
        self, p: int, noun: str, boxes: list[Box], extra: tuple[float, ...] | None
    ) -> list[int | None]:
        """Per expression of `noun`, the index of the box the grounder names first on frame `p` (None: none)."""
        key = (p, noun, extra)
        if key not in self._answers:
            shown = [tuple(b) for b in boxes] + ([extra] if extra is not None else [])
            with self.stats.timer("masklets.ground"):
                answers = self.grounder.ground(self.image(p), shown, self.expressions[noun])
            self.stats.count("identity_grounder_calls")  # apart from the assignment's `grounder_calls`
            self._answers[key] = [
                next((i for i in a.indexes if 0 <= i < len(shown)), None) for a in answers
            ]
        return self._answers[key]

    @staticmethod
    def _cut(track: TrackLike, trace: MotionTrace, anchor: int, brk: int | None) -> int:
        """Drop the track's frames beyond the last check it passed: from the motion break on where there is one
        (the switch happened there), else every frame beyond `anchor`. Returns the frame it was cut after: the
        last it kept on that side of its prompt frame (the prompt frame itself where it kept none there)."""
        for p in [p for p in track.frames if trace.beyond(p, anchor)]:
            if brk is None or not trace.beyond(brk, p):
                del track.frames[p]
        p0 = track.position
        kept = [p for p in track.frames if p == p0 or trace.beyond(p, p0)]
        if not kept:
            return p0
        return max(kept) if trace.forward else min(kept)
