"""Fake model backends for tests of the code around the models. Each reads flat colors off the frames, so
its output is exact ground truth on the synthetic scenes the tests draw; none of them is a real model. The
oracles at the end read a scene's ground truth instead, for look-alikes that share a color."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from engine.masks import mask_box
from engine.models.interfaces import Box, ChatRequest, Detection, FrameSource, GroundingAnswer

if TYPE_CHECKING:
    from tests.synthetic import GroundTruth

TOLERANCE = 60  # JPEG and H.264 shift flat colors a little


def color_mask(image: np.ndarray, color: Sequence[int]) -> np.ndarray:
    return (np.abs(image.astype(np.int16) - np.array(color, dtype=np.int16)).max(axis=2) < TOLERANCE)


class FakeColorDetector:
    """'Detects' a phrase wherever a color registered for it covers enough pixels."""

    model_id = "fake/color-detector"

    def __init__(self, colors_by_phrase: dict[str, list[tuple[int, int, int]]], min_pixels: int = 20) -> None:
        self.colors_by_phrase = colors_by_phrase
        self.min_pixels = min_pixels
        self.calls: list[int] = []  # batch sizes
        self.phrases: list[tuple[str, ...]] = []  # the phrases of each call

    def detect(self, images, phrases, *, box_threshold, text_threshold) -> list[list[Detection]]:
        self.calls.append(len(images))
        self.phrases.append(tuple(phrases))
        out = []
        for image in images:
            dets = []
            for phrase in phrases:
                for color in self.colors_by_phrase.get(phrase, []):
                    mask = color_mask(image, color)
                    if mask.sum() >= self.min_pixels:
                        dets.append(Detection(box=tuple(mask_box(mask)), score=0.9, label=phrase))
            out.append(dets)
        return out


class FakeColorBoxSegmenter:
    """'Segments' the flat color that fills most of each box: the pixels of the box's median color, inside the
    box (a box-prompted segmenter such as SAM 2 in image mode)."""

    model_id = "fake/color-box-segmenter"

    def __init__(self) -> None:
        self.calls: list[int] = []  # boxes per call

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        self.calls.append(len(boxes))
        h, w = image.shape[:2]
        out = np.zeros((len(boxes), h, w), dtype=bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
            x1, y1 = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
            if x1 <= x0 or y1 <= y0:
                continue
            patch = image[y0:y1, x0:x1]
            out[i, y0:y1, x0:x1] = color_mask(patch, np.median(patch.reshape(-1, 3), axis=0))
        return out


class _FakeSession:
    def __init__(self, tracker: "FakeColorTracker", frames: FrameSource, height: int, width: int) -> None:
        self.tracker, self.frames, self.height, self.width = tracker, frames, height, width
        self.colors: dict[int, np.ndarray] = {}

    def _frame(self, position: int) -> np.ndarray:
        import cv2

        return cv2.resize(self.frames[position], (self.width, self.height), interpolation=cv2.INTER_NEAREST)

    def add_box(self, position: int, obj_id: int, box: Box) -> None:
        # The object's color is the median color inside the box on the prompt frame.
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        patch = self._frame(position)[y0:y1, x0:x1].reshape(-1, 3)
        self.colors[obj_id] = np.median(patch, axis=0)

    def add_mask(self, position: int, obj_id: int, mask: np.ndarray) -> None:
        self.colors[obj_id] = np.median(self._frame(position)[mask], axis=0)

    def propagate(self, start: int, *, reverse: bool = False) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        if not self.colors:
            raise ValueError("propagate before any prompt")
        self.tracker.passes.append((start, reverse))
        positions = range(start, -1, -1) if reverse else range(start, len(self.frames))
        memory = self.tracker.memory
        absent = {obj: 0 for obj in self.colors}  # frames in a row without the object, this pass
        for p in positions:
            frame = self._frame(p)
            out = {}
            for obj, color in self.colors.items():
                mask = color_mask(frame, color)
                lost = memory is not None and absent[obj] > memory
                absent[obj] = 0 if mask.any() and not lost else absent[obj] + 1
                out[obj] = np.zeros_like(mask) if lost else mask
            yield p, out

    def close(self) -> None:
        self.tracker.closed += 1


class FakeColorTracker:
    """'Tracks' each prompted object by the color it had on the prompt frame. With `memory`, like SAM 2, it
    loses an object for the rest of a pass once it was absent for more than `memory` frames in a row."""

    model_id = "fake/color-tracker"

    def __init__(self, image_size: int = 64, memory: int | None = None) -> None:
        self.image_size = image_size
        self.memory = memory
        self.sessions = 0
        self.closed = 0
        self.passes: list[tuple[int, bool]] = []
        self.session_frames: list[int] = []  # frames each session could see

    def start(self, frames: FrameSource, *, height: int, width: int) -> _FakeSession:
        self.sessions += 1
        self.session_frames.append(len(frames))
        return _FakeSession(self, frames, height, width)


class FakeColorGrounder:
    """Answers with the box whose center has the color registered for the expression."""

    model_id = "fake/color-grounder"

    def __init__(self, color_by_expression: dict[str, tuple[int, int, int]]) -> None:
        self.color_by_expression = color_by_expression
        self.calls = 0

    def ground(self, image, boxes, expressions) -> list[GroundingAnswer]:
        self.calls += 1
        answers = []
        for expression in expressions:
            color = self.color_by_expression.get(expression)
            hits = []
            for i, (x0, y0, x1, y1) in enumerate(boxes):
                cy, cx = int((y0 + y1) / 2), int((x0 + x1) / 2)
                if color is not None and color_mask(image[cy : cy + 1, cx : cx + 1], color).all():
                    hits.append(i)
            answers.append(GroundingAnswer(indexes=hits, text=" ".join(map(str, hits)) or "none"))
        return answers


class FakeEmbedder:
    """One-hot embedding of the frame's dominant background color among `palette`."""

    model_id = "fake/embedder"

    def __init__(self, palette: Sequence[tuple[int, int, int]], input_size: int = 32) -> None:
        self.palette = np.array(palette, dtype=np.float64)
        self.input_size = input_size

    def embed(self, images) -> np.ndarray:
        out = np.zeros((len(images), len(self.palette)), dtype=np.float32)
        for i, image in enumerate(images):
            mean = image.reshape(-1, 3).astype(np.float64).mean(axis=0)
            out[i, np.argmin(((self.palette - mean) ** 2).sum(axis=1))] = 1.0
        return out


class FakeChat:
    """Scripted chat model: answers from a list (one per request, in order) or from a function of the request.
    Records every batch it was sent."""

    model_id = "fake/chat"

    def __init__(self, answers: Sequence[str] | None = None, *, fn: Callable[[ChatRequest], str] | None = None):
        if (answers is None) == (fn is None):
            raise ValueError("give answers or fn")
        self.answers = list(answers or [])
        self.fn = fn
        self.batches: list[list[ChatRequest]] = []

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        self.batches.append(list(requests))
        out = []
        for request in requests:
            if self.fn is not None:
                out.append(self.fn(request))
            else:
                assert self.answers, "FakeChat ran out of scripted answers"
                out.append(self.answers.pop(0))
        return out

    @property
    def batch_sizes(self) -> list[int]:
        return [len(b) for b in self.batches]

    @property
    def requests(self) -> list[ChatRequest]:
        return [r for b in self.batches for r in b]


class Recorder:
    """A frame consumer (not a model) that keeps the frames it wants, every `every`-th, and what it was asked."""

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.asked: list[int] = []
        self.got: list[tuple[int, float, np.ndarray]] = []

    def wants(self, index: int, time: float) -> bool:
        self.asked.append(index)
        return index % self.every == 0

    def consume(self, index: int, time: float, frame: np.ndarray) -> None:
        self.got.append((index, time, frame))


# -- oracles over a synthetic scene's ground truth, for scenes whose objects share a color ----------------------


class SceneTruth:
    """A synthetic scene's ground truth per frame (visible masks, boxes, footprints), and which frame an image
    shows: the nearest of the scene's renders, so fakes that only get images can read the truth."""

    MATCH_SIZE = (80, 60)

    def __init__(self, truth: "GroundTruth") -> None:
        import cv2

        self.truth = truth
        self.names = [s.name for s in truth.shapes]
        self.visible = {(n, i): truth.mask(n, i) for n in self.names for i in range(truth.num_frames)}
        self.footprints = {(n, i): truth.footprint(n, i) for n in self.names for i in range(truth.num_frames)}
        renders = [truth.render(i) for i in range(truth.num_frames)]
        small = [cv2.resize(r, self.MATCH_SIZE, interpolation=cv2.INTER_AREA) for r in renders]
        self._renders = np.stack(small).astype(np.float32)

    def frame_of(self, image: np.ndarray) -> int:
        import cv2

        small = cv2.resize(image, self.MATCH_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)
        return int(((self._renders - small) ** 2).mean(axis=(1, 2, 3)).argmin())

    def box(self, name: str, frame: int) -> list[float] | None:
        return mask_box(self.visible[name, frame])

    def visible_share(self, name: str, frame: int) -> float:
        whole = self.footprints[name, frame].sum()
        return float(self.visible[name, frame].sum() / whole) if whole else 0.0

    def covered_share(self, name: str, by: str, frame: int) -> float:
        """Share of `name`'s box (its whole footprint's) that `by`'s visible pixels cover."""
        box = mask_box(self.footprints[name, frame])
        if box is None:
            return 0.0
        x0, y0, x1, y1 = (int(v) for v in box)
        return float(self.visible[by, frame][y0:y1, x0:x1].mean())


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FakeTruthDetector:
    """'Detects' each shape registered for a phrase where at least `min_visible` of it is in sight, with its
    exact visible box: an oracle detector that, like a real one, misses what is mostly hidden."""

    model_id = "fake/truth-detector"

    def __init__(self, scene: SceneTruth, shapes_by_phrase: dict[str, list[str]], min_visible: float = 0.3) -> None:
        self.scene, self.shapes_by_phrase, self.min_visible = scene, shapes_by_phrase, min_visible
        self.calls: list[int] = []

    def detect(self, images, phrases, *, box_threshold, text_threshold) -> list[list[Detection]]:
        self.calls.append(len(images))
        out = []
        for image in images:
            i = self.scene.frame_of(image)
            dets = []
            for phrase in phrases:
                for name in self.shapes_by_phrase.get(phrase, []):
                    if self.scene.visible_share(name, i) >= self.min_visible:
                        dets.append(Detection(box=tuple(self.scene.box(name, i)), score=0.9, label=phrase))
            out.append(dets)
        return out


class FakeTruthGrounder:
    """Answers with the box that best matches (IoU >= 0.5) the visible box of the shape registered for the
    expression: an oracle that tells look-alikes apart, as a grounder reading their details would, but, like a
    real one, names nothing for a shape less than `min_visible` in sight."""

    model_id = "fake/truth-grounder"

    def __init__(self, scene: SceneTruth, shape_by_expression: dict[str, str], min_visible: float = 0.3) -> None:
        self.scene, self.shape_by_expression, self.min_visible = scene, shape_by_expression, min_visible
        self.calls = 0

    def ground(self, image, boxes, expressions) -> list[GroundingAnswer]:
        self.calls += 1
        i = self.scene.frame_of(image)
        answers = []
        for expression in expressions:
            name = self.shape_by_expression.get(expression)
            seen = name is not None and self.scene.visible_share(name, i) >= self.min_visible
            truth = self.scene.box(name, i) if seen else None
            ious = [_box_iou(truth, b) for b in boxes] if truth is not None else []
            hits = [int(np.argmax(ious))] if ious and max(ious) >= 0.5 else []
            answers.append(GroundingAnswer(indexes=hits, text=" ".join(map(str, hits)) or "none"))
        return answers


class _SwitchingSession:
    def __init__(self, tracker: "FakeSwitchingTracker", frames: FrameSource, height: int, width: int) -> None:
        self.tracker, self.frames, self.height, self.width = tracker, frames, height, width
        self.prompted: dict[int, str] = {}  # object id -> the shape it was prompted on
        self.start_frame: int | None = None

    def _pick(self, position: int, score: Callable[[str, int], float]) -> str:
        i = self.tracker.scene.frame_of(self.frames[position])
        return max(self.tracker.scene.names, key=lambda name: score(name, i))

    def add_box(self, position: int, obj_id: int, box: Box) -> None:
        scene = self.tracker.scene
        self.prompted[obj_id] = self._pick(position, lambda n, i: _box_iou(scene.box(n, i) or (0, 0, 0, 0), box))

    def add_mask(self, position: int, obj_id: int, mask: np.ndarray) -> None:
        scene = self.tracker.scene
        self.prompted[obj_id] = self._pick(position, lambda n, i: float((scene.visible[n, i] & mask).sum()))

    def propagate(self, start: int, *, reverse: bool = False) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        if not self.prompted:
            raise ValueError("propagate before any prompt")
        tracker, scene = self.tracker, self.tracker.scene
        tracker.passes.append((start, reverse))
        following = dict(self.prompted)  # each pass starts from the prompts, as SAM 2's passes do
        absent = {obj: 0 for obj in following}
        lost: set[int] = set()
        positions = range(start, -1, -1) if reverse else range(start, len(self.frames))
        for p in positions:
            i = scene.frame_of(self.frames[p])
            out = {}
            for obj, name in following.items():
                if tracker.switch_share is not None and p != start and scene.visible_share(name, i) > 0:
                    shares = {o: scene.covered_share(name, o, i) for o in scene.names if o != name}
                    other = max(shares, key=shares.get, default=None)
                    if other is not None and shares[other] >= tracker.switch_share:
                        following[obj] = name = other
                        tracker.switches.append((p, obj, name))
                mask = scene.visible[name, i]
                if tracker.memory is not None and absent[obj] > tracker.memory:
                    lost.add(obj)
                absent[obj] = 0 if mask.any() else absent[obj] + 1
                out[obj] = np.zeros((self.height, self.width), bool) if obj in lost else self._sized(mask)
            yield p, out

    def _sized(self, mask: np.ndarray) -> np.ndarray:
        import cv2

        if mask.shape == (self.height, self.width):
            return mask.copy()
        return cv2.resize(mask.astype(np.uint8), (self.width, self.height), interpolation=cv2.INTER_NEAREST) > 0

    def close(self) -> None:
        self.tracker.closed += 1


class FakeSwitchingTracker:
    """An oracle 'tracker' over a scene's ground truth: each object follows the shape it was prompted on, with
    that shape's exact visible mask. Like SAM 2, it loses an object absent for more than `memory` frames for
    the rest of a pass. With `switch_share`, it makes SAM 2's identity switch: once another shape's visible
    pixels cover that share of the followed shape's box, it follows the other shape from then on (in that
    pass). Not a model."""

    model_id = "fake/switching-tracker"

    def __init__(
        self, scene: SceneTruth, *, image_size: int = 128, memory: int | None = None, switch_share: float | None = None
    ) -> None:
        self.scene, self.image_size, self.memory, self.switch_share = scene, image_size, memory, switch_share
        self.sessions = 0
        self.closed = 0
        self.passes: list[tuple[int, bool]] = []
        self.session_frames: list[int] = []
        self.switches: list[tuple[int, int, str]] = []  # (session position, object id, shape it switched to)

    def start(self, frames: FrameSource, *, height: int, width: int) -> _SwitchingSession:
        self.sessions += 1
        self.session_frames.append(len(frames))
        return _SwitchingSession(self, frames, height, width)


class FakeRegionEmbedder:
    """Embeds a whole frame as its scene's background (one-hot over `backgrounds`, as FakeEmbedder does) and an
    object's region by its color, seen under a 'view': a pseudo-random color shift drawn from the pixels
    (`view_jitter` per channel, as lighting and pose move a real embedding), so two views of one object differ
    about as much as two look-alikes of nearly one color do. Pixels of exactly `fill` (the gray outside a
    region's mask) are not looked at. Not a model."""

    model_id = "fake/region-embedder"
    ANCHORS = np.stack(np.meshgrid(*[np.linspace(0, 255, 5)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)

    def __init__(
        self, backgrounds: Sequence[tuple[int, int, int]], *, view_jitter: float = 8.0, bandwidth: float = 40.0,
        fill: tuple[int, int, int] = (128, 128, 128), input_size: int = 32,
    ) -> None:
        self.backgrounds = np.array(backgrounds, dtype=np.int16)
        self.view_jitter, self.bandwidth, self.input_size = view_jitter, bandwidth, input_size
        self.fill = np.array(fill)
        self.calls: list[int] = []

    def embed(self, images) -> np.ndarray:
        import zlib

        self.calls.append(len(images))
        k = len(self.backgrounds)
        out = np.zeros((len(images), k + len(self.ANCHORS)), dtype=np.float32)
        for row, image in enumerate(images):
            px = image.reshape(-1, 3).astype(np.int16)
            px = px[(px != self.fill).any(axis=1)]
            near = np.abs(px[:, None, :] - self.backgrounds[None]).max(axis=2) < TOLERANCE
            if len(px) == 0 or near.any(axis=1).mean() >= 0.5:
                out[row, int(np.argmax(near.sum(axis=0))) if len(px) else 0] = 1.0
                continue
            view = np.random.default_rng(zlib.crc32(image.tobytes())).normal(0.0, self.view_jitter, 3)
            color = px[~near.any(axis=1)].mean(axis=0) + view
            v = np.exp(-((self.ANCHORS - color) ** 2).sum(axis=1) / (2 * self.bandwidth**2))
            out[row, k:] = v / np.linalg.norm(v)
        return out
