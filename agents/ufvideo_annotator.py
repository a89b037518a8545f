"""UFVideo's annotator (UFVideo §3.3 and Appendix B, Box 2): a VLM gets frames as ordered single images and
each object's box list per frame, and returns a short description (about 10 words) per object and one long
description of all objects and their relationships, in Box 2's text format:

    <Short Description>: object_1: ... object_2: ... <Long Description>: ...

The answer is parsed and validated (every object once, in order, no object that does not exist, a short
description of reasonable length, a long description that names no unknown object); an invalid one is asked
again with its error, and after `retries` it becomes a `Failure` keeping every raw answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from agents.common import Failure
from engine.chat import ask_checked, fit_pixels
from engine.models.interfaces import ChatImage, ChatMessage, ChatModel, ChatRequest
from engine.stats import Stats
from prompts import render

AGENT = "ufvideo_annotator"
_SECTIONS = re.compile(r"(?is)<\s*short\s+description\s*>\s*:?(.*?)<\s*long\s+description\s*>\s*:?(.*)")
_OBJECT = re.compile(r"`?\bobject_(\d+)`?\s*:")
_MENTION = re.compile(r"\bobject_(\d+)\b")
REPAIR = (
    "Your answer was not valid: {error}\n"
    "Answer again strictly in the format: <Short Description>: {shorts} <Long Description>: your long description "
    "of all objects and their relationships."
)


@dataclass(frozen=True)
class BoxedObject:
    name: str  # object_1, object_2, ... (1-based, as Box 2 writes them)
    boxes: tuple[tuple[int, int, int, int] | None, ...]  # per frame shown: [x1, y1, x2, y2] in 0-1000, or None


@dataclass(frozen=True)
class UFVideoJob:
    frames: tuple[np.ndarray, ...]  # RGB, in video order
    objects: tuple[BoxedObject, ...]

    def __post_init__(self) -> None:
        if not self.frames or not self.objects:
            raise ValueError("a UFVideoJob needs frames and objects")
        if [o.name for o in self.objects] != [f"object_{i + 1}" for i in range(len(self.objects))]:
            raise ValueError("a UFVideoJob's objects must be named object_1, object_2, ... in order")
        if any(len(o.boxes) != len(self.frames) for o in self.objects):
            raise ValueError("each object needs one box (or None) per frame")


@dataclass(frozen=True)
class UFVideoAnnotation:
    short: tuple[str, ...]  # per object, in order
    long: str


@dataclass(frozen=True)
class UFVideoAnnotatorConfig:
    max_pixels: int = 448 * 448  # per frame sent
    max_short_words: int = 24  # Box 2 asks for about 10
    min_long_words: int = 8
    max_long_chars: int = 3000
    max_tokens: int = 1024
    retries: int = 2

    def __post_init__(self) -> None:
        if self.max_short_words < 3 or self.min_long_words < 1 or self.max_long_chars < 64:
            raise ValueError("max_short_words must be >= 3, min_long_words >= 1, max_long_chars >= 64")
        if self.max_pixels < 28 * 28 or self.max_tokens < 64 or self.retries < 0:
            raise ValueError("max_pixels must be >= 784, max_tokens >= 64, retries >= 0")


def relative_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """An xyxy pixel box in thousandths of the frame (Qwen-VL's convention, independent of any resize)."""
    x0, y0, x1, y1 = box
    scale = (1000 / width, 1000 / height, 1000 / width, 1000 / height)
    return tuple(int(min(1000, max(0, round(v * s)))) for v, s in zip((x0, y0, x1, y1), scale))  # type: ignore[return-value]


def parse(text: str, n_objects: int, config: UFVideoAnnotatorConfig) -> tuple[UFVideoAnnotation | None, str | None]:
    """Box 2's answer format, checked: (annotation, None) or (None, the error)."""
    match = _SECTIONS.search(text.replace("`", ""))
    if not match:
        return None, "the answer must have a <Short Description>: section followed by a <Long Description>: section"
    shorts_text, long = match.group(1), " ".join(match.group(2).split())
    parts = _OBJECT.split(shorts_text)
    numbers = [int(n) for n in parts[1::2]]
    want = list(range(1, n_objects + 1))
    if numbers != want:
        got = ", ".join(f"object_{n}" for n in numbers) or "none"
        return None, f"<Short Description> must give object_1 to object_{n_objects} once each, in order; got {got}"
    shorts = tuple(" ".join(p.split()).rstrip(".;,") for p in parts[2::2])
    for n, short in enumerate(shorts, 1):
        words = len(short.split())
        if not words:
            return None, f"the short description of object_{n} is empty"
        if words > config.max_short_words:
            return None, f"the short description of object_{n} has {words} words: write about 10"
    unknown = sorted({int(n) for n in _MENTION.findall(long)} - set(want))
    if unknown:
        return None, f"the <Long Description> names {', '.join(f'object_{n}' for n in unknown)}, which does not exist"
    if len(long.split()) < config.min_long_words:
        return None, "the <Long Description> is too short: describe all objects and their relationships"
    if len(long) > config.max_long_chars:
        return None, f"the <Long Description> is {len(long)} characters: keep it under {config.max_long_chars}"
    return UFVideoAnnotation(shorts, long), None


class UFVideoAnnotator:
    prompts = ("ufvideo_annotator",)

    def __init__(self, model: ChatModel, config: UFVideoAnnotatorConfig = UFVideoAnnotatorConfig(),
                 stats: Stats | None = None) -> None:
        self.model, self.config, self.stats = model, config, stats

    def annotate(self, jobs: Sequence[UFVideoJob]) -> list[UFVideoAnnotation | Failure]:
        """One request per job, all in one batch per round."""
        if not jobs:
            return []
        cfg = self.config

        def ask_round(batch: list[ChatRequest]) -> list[tuple[str, str, None]]:
            answers = self.model.chat(batch)
            if self.stats is not None:
                self.stats.count(f"{AGENT}_requests", len(batch))
                self.stats.count(f"{AGENT}_backend_calls")
            return [(text, text, None) for text in answers]  # parsed by `check`, which knows each answer's job

        def repair_for(i: int) -> str:
            return " ".join(f"{o.name}: <short description>" for o in jobs[i].objects)

        results = ask_checked(
            [self._request(j) for j in jobs],
            ask_round,
            repair=lambda error: error,  # the error is written whole by `check`, with the format to answer in
            check=lambda i, text: _error_with_format(parse(text, len(jobs[i].objects), cfg)[1], repair_for(i)),
            retries=cfg.retries,
            stats=self.stats,
            agent=AGENT,
        )
        out: list[UFVideoAnnotation | Failure] = []
        for job, result in zip(jobs, results):
            if result.ok:
                annotation, _ = parse(result.value, len(job.objects), cfg)
                out.append(annotation)
            else:
                detail = (result.error or "no valid answer").split("\n", 1)[0].removeprefix("Your answer was not valid: ")
                out.append(Failure("invalid_answer", detail, tuple(result.raw)))
        return out

    def _request(self, job: UFVideoJob) -> ChatRequest:
        objects = [{"name": o.name, "boxes": _box_list(o.boxes)} for o in job.objects]
        prompt = render("ufvideo_annotator", objects=objects)
        images = [ChatImage(fit_pixels(frame, self.config.max_pixels)) for frame in job.frames]
        return ChatRequest(messages=(ChatMessage.user(*images, prompt),), max_tokens=self.config.max_tokens)


def _error_with_format(error: str | None, shorts: str) -> str | None:
    return None if error is None else REPAIR.format(error=error, shorts=shorts)


def _box_list(boxes: Sequence[tuple[int, int, int, int] | None]) -> str:
    return "[" + ", ".join("null" if b is None else f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]" for b in boxes) + "]"
