"""Fake model backends for tests of the code around the models. Each reads flat colors off the frames, so
its output is exact ground truth on the synthetic scenes the tests draw; none of them is a real model."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from engine.masks import mask_box
from engine.models.interfaces import Box, ChatRequest, Detection, FrameSource, GroundingAnswer

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
