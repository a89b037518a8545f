"""`ChatModel` backend: a transformers model in this process (image-text-to-text VLM such as Qwen2.5-VL, or a
text-only causal LM), with JSON-Schema-constrained decoding through xgrammar where a request has a schema.

Each `chat` call runs left-padded batched `generate` calls: requests are grouped by (constrained or not,
temperature) and each group is split into chunks of `batch_size`.

Options (a profile's `options:`): `dtype`, `max_new_tokens` (cap on every answer; a request's `max_tokens` may
lower it), `max_pixels` (images and video frames are downscaled to it), `batch_size`, and `max_string_length`,
which exists for miniature random models only (see `tighten_schema`).
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any, Sequence

import numpy as np

from engine.chat import DEFAULT_MAX_PIXELS, fit_pixels
from engine.images import check_rgb_uint8
from engine.models.interfaces import ChatImage, ChatMessage, ChatRequest, ChatVideo

TIGHT_MAX_ITEMS = 4  # arrays of a tightened schema (see `tighten_schema`) hold at most this many items
TIGHT_BOUND = 999_999  # integers of a tightened schema lie in [-TIGHT_BOUND, TIGHT_BOUND] unless bounded already


def tighten_schema(schema: dict, *, max_string_length: int, max_items: int = TIGHT_MAX_ITEMS) -> dict:
    """A copy of `schema` whose every value has a bounded length, for grammar-constrained decoding:
    - a string without pattern/enum/const/format gets maxLength at most `max_string_length`;
    - an array gets maxItems at most `max_items`;
    - an integer without bounds gets [-TIGHT_BOUND, TIGHT_BOUND], and a number becomes such an integer (an
      integer is a valid JSON number, so answers still validate against the original schema).

    For miniature random models only: they rarely pick a closing quote or bracket, or a digit's end, so an
    unbounded value runs until max_new_tokens and the JSON never closes. A real model needs none of this."""

    from engine.chat import map_schema

    def tighten(out: dict) -> dict:
        if out.get("type") == "number" and "multipleOf" not in out:
            out["type"] = "integer"
        kind = out.get("type")
        # Bounds a schema already has are tightened too: an agent's maxLength of 2000 is a run of 2000 tokens
        # for a random model.
        if kind == "string" and not {"pattern", "enum", "const", "format"} & out.keys():
            out["maxLength"] = max(min(max_string_length, out.get("maxLength", max_string_length)), int(out.get("minLength", 0)))
        elif kind == "array":
            out["maxItems"] = max(min(max_items, out.get("maxItems", max_items)), int(out.get("minItems", 0)))
        elif kind == "integer" and not {"enum", "const"} & out.keys():
            low = out.get("minimum", out.get("exclusiveMinimum"))
            high = out.get("maximum", out.get("exclusiveMaximum"))
            if low is None:
                out["minimum"] = low = -TIGHT_BOUND if high is None else min(-TIGHT_BOUND, math.floor(high) - 1)
            if high is None:
                out["maximum"] = max(TIGHT_BOUND, math.ceil(low) + 1)
        return out

    return map_schema(schema, tighten)


def _is_vlm(processor: Any) -> bool:
    return hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")


class TransformersChat:
    """A transformers chat model in this process; see the module docstring."""

    def __init__(
        self,
        *,
        model: Any,
        processor: Any,
        model_id: str,
        device: str = "cpu",
        max_new_tokens: int = 512,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        batch_size: int = 8,
        max_string_length: int | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_pixels is not None and max_pixels < 28 * 28:
            raise ValueError(f"max_pixels must be at least {28 * 28} (one visual token) or None, got {max_pixels}")
        if max_string_length is not None and max_string_length < 1:
            raise ValueError(f"max_string_length must be >= 1 or None, got {max_string_length}")
        self.model = model.eval()
        self.processor = processor  # a multi-modal processor, or a tokenizer for a text-only model
        self.model_id = model_id
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.max_string_length = max_string_length
        self.is_vlm = _is_vlm(processor)
        self.tokenizer = processor.tokenizer if self.is_vlm else processor
        # Batched generation with a decoder-only model needs the padding on the left.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.stop_token_ids: list[int] = list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
        self._grammars: dict[str, Any] = {}  # schema text -> compiled grammar
        self._compiler: Any = None
        self._lock = threading.Lock()  # one generate at a time: callers may share the model across threads

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 512,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        batch_size: int = 8,
        max_string_length: int | None = None,
        trust_remote_code: bool = False,
    ) -> "TransformersChat":
        """Weights from a Hugging Face id (e.g. Qwen/Qwen2.5-VL-7B-Instruct) or a local folder; `dtype` is
        "auto" (the checkpoint's) or a torch dtype name such as "bfloat16". A model that is not an
        image-text-to-text architecture loads as a text-only causal LM. `trust_remote_code` runs the
        checkpoint's own code (only for checkpoints you trust)."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        from engine.device import pick_device
        from engine.models.hf_loading import missing_weights_as_error

        device = pick_device(device)
        with missing_weights_as_error(model_id_or_path, role="chat"):
            remote = {"trust_remote_code": trust_remote_code}
            try:
                model = AutoModelForImageTextToText.from_pretrained(model_id_or_path, dtype=dtype, **remote)
                processor = AutoProcessor.from_pretrained(model_id_or_path, **remote)
            except ValueError:  # "Unrecognized configuration class": not a VLM, so a text-only LM
                model = AutoModelForCausalLM.from_pretrained(model_id_or_path, dtype=dtype, **remote)
                processor = AutoTokenizer.from_pretrained(model_id_or_path, **remote)
        return cls(
            model=model.to(device), processor=processor, model_id=model_id_or_path, device=device,
            max_new_tokens=max_new_tokens, max_pixels=max_pixels, batch_size=batch_size,
            max_string_length=max_string_length,
        )

    @classmethod
    def tiny(
        cls,
        *,
        device: str = "cpu",
        seed: int = 0,
        max_new_tokens: int = 512,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        batch_size: int = 8,
        max_string_length: int | None = None,
    ) -> "TransformersChat":
        """A randomly initialised miniature Qwen2.5-VL for tests and wiring checks: its answers are
        meaningless. Give it `max_string_length` (e.g. 24) where JSON must come back: see `tighten_schema`."""
        from engine.device import pick_device
        from engine.models.tiny_vlm import TINY_MODEL_ID, build_tiny_qwen2_5_vl

        device = pick_device(device)
        model, processor = build_tiny_qwen2_5_vl(seed=seed)
        return cls(
            model=model.to(device), processor=processor, model_id=TINY_MODEL_ID, device=device,
            max_new_tokens=max_new_tokens, max_pixels=max_pixels, batch_size=batch_size,
            max_string_length=max_string_length,
        )

    # -- ChatModel

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        answers = [""] * len(requests)
        groups: dict[tuple[bool, float], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.json_schema is not None, float(request.temperature)), []).append(i)
        with self._lock:
            for rows in groups.values():
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start : start + self.batch_size]
                    for i, text in zip(chunk, self._generate([requests[i] for i in chunk])):
                        answers[i] = text
        return answers

    # -- internals

    def _template(self, messages: Sequence[ChatMessage]) -> tuple[str, list[np.ndarray], list[ChatVideo]]:
        """The chat-template text of one conversation, and its images and videos in order of appearance."""
        images: list[np.ndarray] = []
        videos: list[ChatVideo] = []
        converted = []
        for message in messages:
            parts: list[dict] = []
            for part in message.content:
                if isinstance(part, str):
                    parts.append({"type": "text", "text": part})
                elif not self.is_vlm:
                    raise ValueError(f"{self.model_id} is a text-only model: it cannot take {type(part).__name__}")
                elif isinstance(part, ChatImage):
                    images.append(fit_pixels(check_rgb_uint8(part.pixels), self.max_pixels))
                    parts.append({"type": "image"})
                elif isinstance(part, ChatVideo):
                    if not part.frames:
                        raise ValueError("a ChatVideo needs at least one frame")
                    frames = tuple(fit_pixels(check_rgb_uint8(f, "video frame"), self.max_pixels) for f in part.frames)
                    videos.append(ChatVideo(frames=frames, fps=part.fps))
                    parts.append({"type": "video"})
                else:
                    raise ValueError(f"unknown message part {type(part).__name__}")
            if self.is_vlm:
                converted.append({"role": message.role, "content": parts})
            else:  # text-only chat templates expect a string
                converted.append({"role": message.role, "content": "".join(p["text"] for p in parts)})
        text = self.processor.apply_chat_template(converted, tokenize=False, add_generation_prompt=True)
        return text, images, videos

    def _inputs(self, requests: Sequence[ChatRequest]) -> Any:
        texts, images, videos = [], [], []
        for request in requests:
            text, request_images, request_videos = self._template(request.messages)
            texts.append(text)
            images.extend(request_images)
            videos.extend(request_videos)
        # The template already holds the special tokens: the tokenizer must add none (no second BOS).
        if not self.is_vlm:
            return self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        kwargs: dict[str, Any] = {}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = [np.stack(v.frames) for v in videos]
            # The frames are already sampled: keep them all, and tell the model their real rate.
            kwargs["video_metadata"] = [{"total_num_frames": len(v.frames), "fps": float(v.fps)} for v in videos]
            kwargs["do_sample_frames"] = False
        return self.processor(text=texts, padding=True, return_tensors="pt", add_special_tokens=False, **kwargs)

    def _generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        import torch

        inputs = self._inputs(requests).to(self.device)
        limits = [max(1, min(r.max_tokens, self.max_new_tokens)) for r in requests]
        kwargs: dict[str, Any] = {"max_new_tokens": max(limits), "pad_token_id": self.tokenizer.pad_token_id}
        temperature = requests[0].temperature  # one per group
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False)
        if requests[0].json_schema is not None:  # one per group too
            from xgrammar.contrib.hf import LogitsProcessor

            # One grammar per row: the HF processor keeps a matcher per row, so rows may differ.
            kwargs["logits_processor"] = [LogitsProcessor([self._grammar(r.json_schema) for r in requests])]
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [
            self.tokenizer.decode(row[:limit], skip_special_tokens=True) for row, limit in zip(new_tokens, limits)
        ]

    def _grammar(self, schema: dict) -> Any:
        if self.max_string_length is not None:
            schema = tighten_schema(schema, max_string_length=self.max_string_length)
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            self._grammars[key] = self._grammar_compiler().compile_json_schema(
                key, any_whitespace=False, separators=(",", ":")  # compact: fewest tokens
            )
        return self._grammars[key]

    def _grammar_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr

            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids
            )
            # xgrammar takes a special token (<|im_start|>, <|image_pad|>, [UNK]) for its literal text and would
            # let it into a JSON string; an empty entry marks it special, so it is never allowed (stop tokens
            # are known by id and still end the answer).
            special = set(self.tokenizer.all_special_ids)
            vocab = [""] * vocab_size
            for token, i in self.tokenizer.get_vocab().items():
                if i < vocab_size and i not in special:
                    vocab[i] = token
            info = xgr.TokenizerInfo(
                vocab, vocab_type=info.vocab_type, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids,
                add_prefix_space=info.add_prefix_space,
            )
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler
