"""A batching queue in front of a chat model: the chat requests of the videos in flight, each sent from its
own runner thread, are coalesced into one backend call, so the agents of several videos share vLLM's
continuous batching and the transformers backend's batched `generate`.

`ChatQueue` is itself a `ChatModel`. A caller's `chat(requests)` joins the queue and blocks until its answers
are back. A backend call is sent once the queue holds `max_batch` requests, or once its oldest request has
waited `max_wait_ms` for others, whichever comes first, and only while fewer than `calls_at_once` calls run
(in-process engines run one call at a time: what arrives meanwhile is sent together when it frees). The
threads that wait send the calls themselves (no dispatcher thread), sleeping on a condition until a call can
go or theirs is answered: no polling. A caller's requests are never split across calls.

Each caller gets its own answers. A bad answer is only text here: `engine.chat.ask_json` validates it and
asks again for that request alone, through the queue again, while the other callers go on. Failures:
- `ChatBackendError` (the model or its server is down): every request of that call fails with it;
- any other exception (an input one request's conversion refuses, a CUDA out-of-memory on a large batch):
  each caller's requests are sent again alone, so the fault lands only on the caller that causes it;
- a backend with `chat_settled` (the HTTP client) reports each request's own failure: only its caller fails.

`max_batch: 1` or `max_wait_ms: 0` turns coalescing off: every call goes straight to the backend.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence, TypeVar, runtime_checkable

from engine.errors import ChatBackendError, ConfigError
from engine.models.interfaces import ChatModel, ChatRequest


@dataclass(frozen=True)
class ChatQueueConfig:
    """Settings section `chat_queue`: how chat requests of the videos in flight are coalesced. They change
    no output, so they are not part of the config hash."""

    max_batch: int = 64  # requests per backend call at most (a single caller's larger call goes whole)
    max_wait_ms: float = 20.0  # how long a request may wait for others before its call is sent

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a whole number >= 1 (1: no coalescing), got {self.max_batch!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) or not (
            0 <= self.max_wait_ms <= 60_000
        ):
            raise ValueError(f"max_wait_ms must be a number in [0, 60000] (0: no coalescing), got {self.max_wait_ms!r}")

    @property
    def coalesces(self) -> bool:
        return self.max_batch > 1 and self.max_wait_ms > 0

    @classmethod
    def parse(cls, section: dict[str, Any]) -> "ChatQueueConfig":
        """The settings as the config loader validates them (`"32"` is 32), or a one-line ConfigError."""
        from dataclasses import fields

        from pydantic import TypeAdapter, ValidationError

        allowed = sorted(f.name for f in fields(cls))
        unknown = sorted(set(section) - set(allowed))
        if unknown:
            takes = ", ".join(allowed)
            raise ConfigError(f"unknown setting pipeline.chat_queue.{unknown[0]}; chat_queue takes: {takes}")
        try:
            return TypeAdapter(cls).validate_python(section)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"pipeline.chat_queue{'.' + where if where else ''}: {err['msg']}") from None


@runtime_checkable
class SettledChat(Protocol):
    """A backend that can tell one request's failure from the others' answers (the HTTP client: a 400 for
    one prompt is that prompt's own)."""

    def chat_settled(self, requests: Sequence[ChatRequest]) -> list[str | Exception]:
        """Each request's answer, or the exception that request failed with; never raises for one request."""
        ...


@dataclass
class QueueCounts:
    """What a queue did since it was built: callers' calls and requests in, backend calls out."""

    chat_calls: int = 0  # calls of `ChatQueue.chat` (one per caller per round of ask_json)
    requests: int = 0
    backend_calls: int = 0  # including the re-sends that isolate a failing caller
    isolated: int = 0  # backend calls sent again caller by caller after a call-wide exception
    # The longest a call stayed queued: waiting for partners (max_wait_ms at most), or for a busy backend.
    longest_queued_s: float = 0.0

    @property
    def calls_per_request(self) -> float:
        return self.backend_calls / self.requests if self.requests else 0.0


class _Waiting:
    """One caller's `chat` call in the queue."""

    __slots__ = ("requests", "queued_at", "answers", "error", "done")

    def __init__(self, requests: list[ChatRequest], queued_at: float) -> None:
        self.requests = requests
        self.queued_at = queued_at
        self.answers: list[str] | None = None
        self.error: BaseException | None = None
        self.done = False


Outcome = list[str] | BaseException
T = TypeVar("T")


class ChatQueue:
    """A `ChatModel` that coalesces concurrent callers' requests into backend calls; see the module docstring."""

    def __init__(
        self, backend: ChatModel, config: ChatQueueConfig | None = None, *, calls_at_once: int | None = 1
    ) -> None:
        if calls_at_once is not None and calls_at_once < 1:
            raise ValueError(f"calls_at_once must be >= 1 or None (no limit), got {calls_at_once}")
        self.backend = backend
        self.config = config or ChatQueueConfig()
        self.calls_at_once = calls_at_once
        self._settled = isinstance(backend, SettledChat)
        self._cond = threading.Condition()
        self._queue: deque[_Waiting] = deque()
        self._queued = 0  # requests in the queue
        self._running = 0  # backend calls under way
        self._counts = QueueCounts()

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    def __repr__(self) -> str:
        c = self.config
        return f"ChatQueue({self.backend!r}, max_batch={c.max_batch}, max_wait_ms={c.max_wait_ms})"

    def configure(self, config: ChatQueueConfig) -> None:
        """New settings, for calls queued from now on (a model stays loaded across runs of one process)."""
        with self._cond:
            self.config = config
            self._cond.notify_all()

    def counts(self) -> QueueCounts:
        """A copy of the counts so far."""
        with self._cond:
            return replace(self._counts)

    # -- ChatModel

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        if not requests:
            return []
        with self._cond:
            counts = self._counts
            counts.chat_calls += 1
            counts.requests += len(requests)
            if not self.config.coalesces:
                counts.backend_calls += 1
                mine = None
            else:
                mine = _Waiting(list(requests), time.monotonic())
                self._queue.append(mine)
                self._queued += len(mine.requests)
                self._cond.notify_all()  # a waiter may now have a full batch to send
                while not mine.done:
                    batch = self._take_ready()
                    if batch is None:
                        self._cond.wait(self._wait_s())
                    else:
                        self._send(batch, mine)
        if mine is None:
            return self.backend.chat(list(requests))
        if mine.error is not None:
            raise mine.error
        assert mine.answers is not None
        return mine.answers

    # -- internals (the `_cond` lock held unless said otherwise)

    def _can_send(self) -> bool:
        return self.calls_at_once is None or self._running < self.calls_at_once

    def _wait_s(self) -> float | None:
        """How long to sleep: until the oldest request's wait is up, or (backend busy) until a call ends."""
        if not self._queue or not self._can_send():
            return None
        deadline = self._queue[0].queued_at + self.config.max_wait_ms / 1000
        return max(deadline - time.monotonic(), 0.0)

    def _take_ready(self) -> list[_Waiting] | None:
        """The callers of the next backend call, oldest first, if one may be sent now."""
        if not self._queue or not self._can_send():
            return None
        now = time.monotonic()
        oldest = self._queue[0].queued_at
        if self._queued < self.config.max_batch and now < oldest + self.config.max_wait_ms / 1000:
            return None
        batch = [self._queue.popleft()]
        size = len(batch[0].requests)
        while self._queue and size + len(self._queue[0].requests) <= self.config.max_batch:
            batch.append(self._queue.popleft())
            size += len(batch[-1].requests)
        self._queued -= size
        self._counts.backend_calls += 1
        self._counts.longest_queued_s = max(self._counts.longest_queued_s, now - oldest)
        return batch

    def _send(self, batch: list[_Waiting], mine: _Waiting) -> None:
        """Send `batch` from this thread (the lock released meanwhile) and hand each caller its outcome."""
        self._running += 1
        self._cond.release()
        interrupted: BaseException | None = None
        try:
            outcomes = self._outcomes(batch)
        except BaseException as exc:  # an interrupt: the batch's callers must not wait for ever
            outcomes, interrupted = [exc] * len(batch), exc
        self._cond.acquire()
        self._running -= 1
        for waiting, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                waiting.error = outcome
            else:
                waiting.answers = outcome
            waiting.done = True
        self._cond.notify_all()
        if interrupted is not None:
            if mine in self._queue:  # this thread leaves: nobody would wait for its own call
                self._queue.remove(mine)
                self._queued -= len(mine.requests)
            raise interrupted

    def _outcomes(self, batch: list[_Waiting]) -> list[Outcome]:
        """Each caller's answers or error (the lock not held)."""
        requests = [r for waiting in batch for r in waiting.requests]
        try:
            if self._settled:
                settled = self.backend.chat_settled(requests)  # type: ignore[attr-defined]
                return _per_caller(batch, _checked(self.backend, requests, settled))
            return _split(batch, _checked(self.backend, requests, self.backend.chat(requests)))
        except ChatBackendError as exc:
            return [exc] * len(batch)
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
        # A fault that may be one caller's own: each caller alone, so it lands only where it belongs.
        with self._cond:
            self._counts.backend_calls += len(batch)
            self._counts.isolated += 1
        out: list[Outcome] = []
        for waiting in batch:
            try:
                out.append(_checked(self.backend, waiting.requests, self.backend.chat(waiting.requests)))
            except Exception as exc:
                out.append(exc)
        return out


def _checked(backend: ChatModel, requests: list[ChatRequest], answers: list[Any]) -> list[Any]:
    if len(answers) != len(requests):
        raise ChatBackendError(f"chat model {backend.model_id} gave {len(answers)} answers to {len(requests)} requests")
    return answers


def _slices(batch: list[_Waiting], items: list[T]) -> list[list[T]]:
    """`items` (one per request of the batch, in order) cut into each caller's part."""
    out, start = [], 0
    for waiting in batch:
        out.append(items[start : start + len(waiting.requests)])
        start += len(waiting.requests)
    return out


def _split(batch: list[_Waiting], answers: list[str]) -> list[Outcome]:
    return list(_slices(batch, answers))


def _per_caller(batch: list[_Waiting], settled: list[str | Exception]) -> list[Outcome]:
    """A caller fails with the first failure among its own requests (its call is one list in, one out)."""
    out: list[Outcome] = []
    for part in _slices(batch, settled):
        failed = next((x for x in part if isinstance(x, Exception)), None)
        out.append(failed if failed is not None else [x for x in part if isinstance(x, str)])
    return out
