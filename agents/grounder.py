"""Grounder over any chat VLM: RexSeek's question about candidate boxes drawn and numbered on the image
(Set-of-Mark prompting), one request per referring expression, all in one `chat` batch.

The prompt lives in prompts/grounder.j2; `prompt_hash` is its content hash, for provenance.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from engine.chat import DEFAULT_MAX_PIXELS, ask_text, fit_pixels
from engine.images import check_rgb_uint8
from engine.models.interfaces import Box, ChatImage, ChatMessage, ChatModel, ChatRequest, GroundingAnswer

PROMPT_TEMPLATE = "grounder"

# RexSeek answers "<obj3>"; a general VLM answers "3", "boxes 1 and 3", "[1, 3]". Both hold the integers.
_INTEGER = re.compile(r"\d+")


def parse_indexes(text: str, n_boxes: int) -> list[int]:
    """The valid box indexes (0 <= i < n_boxes) named in `text`, in order of appearance, without repeats."""
    indexes: list[int] = []
    for match in _INTEGER.finditer(text):
        i = int(match.group())
        if i < n_boxes and i not in indexes:
            indexes.append(i)
    return indexes


def _check_boxes(boxes: Sequence[Box]) -> list[Box]:
    checked = []
    for i, box in enumerate(boxes):
        values = tuple(float(v) for v in box)
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"box {i} must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
        checked.append(values)
    return checked


class ChatGrounder:
    """`Grounder` on top of a `ChatModel` (transformers, vLLM or a served model)."""

    def __init__(self, chat: ChatModel, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_tokens: int = 16) -> None:
        from prompts import template_hash

        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_pixels is not None and max_pixels < 28 * 28:
            raise ValueError(f"max_pixels must be at least {28 * 28} (one visual token) or None, got {max_pixels}")
        self.chat = chat
        self.model_id = chat.model_id
        self.max_pixels = max_pixels  # the marked image is downscaled to this before it is sent
        self.max_tokens = max_tokens  # an answer is a few indexes
        self.prompt_hash = template_hash(PROMPT_TEMPLATE)

    def prompts(self, n_boxes: int, expressions: Sequence[str]) -> list[str]:
        """The question asked for each expression (RexSeek's, from prompts/grounder.j2)."""
        from prompts import render

        return [render(PROMPT_TEMPLATE, referring=e, n=n_boxes) for e in expressions]

    def ground(self, image: np.ndarray, boxes: Sequence[Box], expressions: Sequence[str]) -> list[GroundingAnswer]:
        from engine.draw import draw_numbered_boxes

        check_rgb_uint8(image)
        if isinstance(expressions, str):
            raise ValueError("expressions must be a sequence of strings, not one string")
        expressions = [" ".join(str(e).split()) for e in expressions]
        for i, expression in enumerate(expressions):
            if not expression:
                raise ValueError(f"expression {i} is empty")
        checked_boxes = _check_boxes(boxes)
        if not expressions:
            return []
        if not checked_boxes:
            # Nothing to choose from: every expression refers to no box, without asking the model.
            return [GroundingAnswer(indexes=[], text="") for _ in expressions]

        marked = ChatImage(fit_pixels(draw_numbered_boxes(image, checked_boxes), self.max_pixels))
        requests = [
            ChatRequest((ChatMessage.user(marked, prompt),), max_tokens=self.max_tokens)
            for prompt in self.prompts(len(checked_boxes), expressions)
        ]
        answers = ask_text(self.chat, requests)
        return [GroundingAnswer(indexes=parse_indexes(a, len(checked_boxes)), text=a) for a in answers]
