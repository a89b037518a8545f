"""Asking a chat model for text or for JSON validated against a pydantic schema, over any `ChatModel` backend.

Every answer is validated; an invalid one is asked again with the validation error shown to the model, a
bounded number of times, and then returned as a failure carrying the raw answers (the caller turns it into a
`rejections` row). Requests are always sent as one batch per round.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generic, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest
from engine.stats import Stats

T = TypeVar("T", bound=BaseModel)

DEFAULT_MAX_PIXELS = 1024 * 28 * 28  # about 1000 visual tokens per image for Qwen2.5-VL (28 x 28 pixels each)


def fit_pixels(image: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """Downscale (aspect kept) so the image has at most max_pixels: bounds a VLM's visual tokens per image.
    Here, beside the chat interface, so an agent that sends images bounds them without a concrete backend."""
    height, width = image.shape[:2]
    if max_pixels is None or height * width <= max_pixels:
        return image
    import cv2

    scale = math.sqrt(max_pixels / (height * width))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)

REPAIR_PROMPT = (
    "Your answer was not valid: {error}\n"
    "Answer again with only a JSON value that matches this JSON Schema:\n{schema}"
)


@dataclass
class JsonAnswer(Generic[T]):
    value: T | None  # None when every attempt failed validation
    raw: list[str] = field(default_factory=list)  # every answer, first to last
    error: str | None = None  # the last validation error, when value is None

    @property
    def ok(self) -> bool:
        return self.value is not None


def schema_of(model: type[BaseModel]) -> dict:
    """The JSON Schema sent to backends for structured decoding."""
    return model.model_json_schema()


def map_schema(schema: Any, node: Callable[[dict], dict]) -> Any:
    """A copy of a JSON Schema with `node` applied to every object in it, innermost first (backends adapt
    schemas to what their decoder or server accepts)."""
    if isinstance(schema, list):
        return [map_schema(x, node) for x in schema]
    if not isinstance(schema, dict):
        return schema
    return node({k: map_schema(v, node) for k, v in schema.items()})


def _short_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err["loc"]) or "value"
            parts.append(f"{where}: {err['msg']}")
        return "; ".join(parts)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _parse(model: type[T], text: str) -> T:
    """Validate `text` as JSON of `model`; tolerate a Markdown code fence around it."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`")
        body = body[body.find("\n") + 1 :] if "\n" in body else body
        body = body.rstrip("`").strip()
    return model.model_validate_json(body)


def ask_text(
    model: ChatModel, requests: Sequence[ChatRequest], *, stats: Stats | None = None, agent: str = "chat"
) -> list[str]:
    """One batch of free-text requests; answers stripped of surrounding whitespace."""
    if not requests:
        return []
    answers = model.chat(list(requests))
    _count(stats, agent, len(requests))
    return [a.strip() for a in answers]


def ask_json(
    model: ChatModel,
    requests: Sequence[ChatRequest],
    schema: type[T],
    *,
    retries: int = 2,
    stats: Stats | None = None,
    agent: str = "chat",
    check: Callable[[int, T], str | None] | None = None,
) -> list[JsonAnswer[T]]:
    """Ask every request for JSON matching `schema`, in one batch; invalid answers are retried together (each
    shown its own error) up to `retries` times. Pydantic validators on `schema` are part of validation, so a
    semantic rule (equal list lengths, distinct items) is retried like a syntax error; `check(i, value)` adds
    a rule that depends on request i (see `ask_checked`)."""
    json_schema = schema_of(schema)
    schema_text = json.dumps(json_schema, separators=(",", ":"))

    def ask_round(batch: list[ChatRequest]) -> list[tuple[T | None, str, str | None]]:
        answers = model.chat(batch)
        _count(stats, agent, len(batch))
        out: list[tuple[T | None, str, str | None]] = []
        for text in answers:
            try:
                out.append((_parse(schema, text), text, None))
            except (ValidationError, ValueError) as exc:
                out.append((None, text, _short_error(exc)))
        return out

    results = ask_checked(
        [replace(r, json_schema=json_schema) for r in requests],
        ask_round,
        repair=lambda error: REPAIR_PROMPT.format(error=error, schema=schema_text),
        check=check,
        retries=retries,
        stats=stats,
        agent=agent,
    )
    if stats is not None:
        stats.count(f"{agent}_invalid_json", sum(not r.ok for r in results))
    return results


def ask_checked(
    requests: Sequence[ChatRequest],
    ask_round: Callable[[list[ChatRequest]], list[tuple[Any, str, str | None]]],
    *,
    repair: Callable[[str], str],
    check: Callable[[int, Any], str | None] | None = None,
    retries: int,
    stats: Stats | None,
    agent: str,
) -> list[JsonAnswer]:
    """The retry loop under `ask_json`, for agents with their own parsing or checks that depend on the request
    (a placeholder that must name one of this video's regions). `ask_round(batch)` asks one batch and returns
    per request (value, raw answer, parse error or None); `check(i, value)` may refuse a parsed value of
    request i. A refused answer is asked again in the next round's batch, with its own answer and
    `repair(error)` appended, up to `retries` times."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    results: list[JsonAnswer] = [JsonAnswer(None) for _ in requests]
    pending = dict(enumerate(requests))
    for attempt in range(retries + 1):
        if not pending:
            break
        order = list(pending)
        if attempt:
            _count(stats, f"{agent}_retried", len(order))
        for i, (value, raw, error) in zip(order, ask_round([pending[i] for i in order])):
            results[i].raw.append(raw)
            if error is None and check is not None:
                error = check(i, value)
            if error is None:
                results[i].value, results[i].error = value, None
                del pending[i]
                continue
            results[i].error = error
            request = pending[i]
            pending[i] = replace(
                request, messages=(*request.messages, ChatMessage.assistant(raw), ChatMessage.user(repair(error)))
            )
    return results


def _count(stats: Stats | None, agent: str, n: int) -> None:
    if stats is not None:
        stats.count(f"{agent}_requests", n)
        stats.count(f"{agent}_backend_calls")
