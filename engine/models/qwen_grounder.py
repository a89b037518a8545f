"""Grounder backend: a transformers image-text-to-text VLM (Qwen2.5-VL class) asked RexSeek's question about
the candidate boxes drawn and numbered on the image (Set-of-Mark prompting).

The prompt lives in prompts/grounder.j2; `prompt_hash` is its content hash, for provenance.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

from engine.images import check_rgb_uint8
from engine.models.interfaces import Box, GroundingAnswer

PROMPT_TEMPLATE = "grounder"
DEFAULT_MAX_PIXELS = 1024 * 28 * 28  # about 1000 visual tokens for Qwen2.5-VL (28 x 28 pixels per token)

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


def _fit_pixels(image: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """Downscale (aspect kept) so the VLM sees at most max_pixels: bounds its visual tokens per prompt."""
    height, width = image.shape[:2]
    if max_pixels is None or height * width <= max_pixels:
        return image
    import cv2

    scale = math.sqrt(max_pixels / (height * width))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class VlmGrounder:
    """`Grounder` backend: one left-padded, greedy, batched `generate` per image, one prompt per expression."""

    def __init__(
        self,
        *,
        model: Any,
        processor: Any,
        model_id: str,
        device: str = "cpu",
        max_new_tokens: int = 16,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        from prompts import template_hash

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_pixels is not None and max_pixels < 28 * 28:
            raise ValueError(f"max_pixels must be at least {28 * 28} (one visual token) or None, got {max_pixels}")
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.max_pixels = max_pixels
        self.prompt_hash = template_hash(PROMPT_TEMPLATE)
        tokenizer = processor.tokenizer
        # Batched generation with a decoder-only model needs the padding on the left.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 16,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> "VlmGrounder":
        """Weights from a Hugging Face id (e.g. Qwen/Qwen2.5-VL-7B-Instruct) or a local folder; `dtype` is
        "auto" (the checkpoint's), or a torch dtype name such as "bfloat16"."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from engine.device import pick_device
        from engine.models.hf_loading import missing_weights_as_error

        device = pick_device(device)
        with missing_weights_as_error(model_id_or_path, role="grounder"):
            processor = AutoProcessor.from_pretrained(model_id_or_path)
            model = AutoModelForImageTextToText.from_pretrained(model_id_or_path, dtype=dtype)
        return cls(
            model=model.to(device), processor=processor, model_id=model_id_or_path, device=device,
            max_new_tokens=max_new_tokens, max_pixels=max_pixels,
        )

    @classmethod
    def tiny(cls, *, seed: int = 0, device: str = "cpu", max_new_tokens: int = 16) -> "VlmGrounder":
        """A randomly initialised miniature Qwen2.5-VL for tests and wiring checks: its answers are
        meaningless."""
        from engine.device import pick_device
        from engine.models.tiny_vlm import TINY_MODEL_ID, build_tiny_qwen2_5_vl

        device = pick_device(device)
        model, processor = build_tiny_qwen2_5_vl(seed=seed)
        return cls(
            model=model.to(device), processor=processor, model_id=TINY_MODEL_ID, device=device,
            max_new_tokens=max_new_tokens,
        )

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

        marked = _fit_pixels(draw_numbered_boxes(image, checked_boxes), self.max_pixels)
        texts = [self._chat_text(prompt) for prompt in self.prompts(len(checked_boxes), expressions)]
        answers = self._generate(texts, marked)
        return [GroundingAnswer(indexes=parse_indexes(a, len(checked_boxes)), text=a) for a in answers]

    def _chat_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generate(self, texts: list[str], image: np.ndarray) -> list[str]:
        import torch

        # One row per expression, each with its own copy of the marked image, all in one generate call.
        inputs = self.processor(
            text=texts, images=[image] * len(texts), padding=True, return_tensors="pt"
        ).to(self.device)
        tokenizer = self.processor.tokenizer
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
