"""Named counters and per-stage timers, reported at the end of a run and written beside the dataset.

Safe to share between threads (the runner processes several items at once): every update holds a lock.
`Stats.recording()` gives one work item its own record of what it cost while other items run beside it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Mapping

Listener = Callable[[str, int], None]

# (the shared Stats, the item's own) while `recording` runs in this thread; see `Stats.recording`.
_RECORDING: ContextVar[tuple["Stats", "Stats"] | None] = ContextVar("engine_stats_recording", default=None)


class Stats:
    """`listener(name, n)` hears every count as it happens (the CLI turns some into progress bars); calls to
    it never overlap, whatever the number of threads counting."""

    def __init__(self, listener: Listener | None = None) -> None:
        self.counters: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self.listener = listener
        self._lock = threading.RLock()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n
            if self.listener is not None:
                self.listener(name, n)
        self._also_record({name: n}, None)

    @contextmanager
    def timer(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[stage] += elapsed
            self._also_record(None, {stage: elapsed})

    def merge(self, other: "Stats") -> None:
        counters, seconds = other._snapshot()
        with self._lock:
            self.counters.update(counters)
            self.seconds.update(seconds)
        self._also_record(counters, seconds)

    @contextmanager
    def recording(self) -> Iterator["Stats"]:
        """A fresh Stats that also gets every count, time and merge made on this one by the current thread
        until the block ends: one item's own costs, while other threads count other items on the same Stats
        (agents hold the run's Stats, not the item's). This Stats is updated as before, live."""
        own = Stats()
        token = _RECORDING.set((self, own))
        try:
            yield own
        finally:
            _RECORDING.reset(token)

    def _also_record(self, counters: Mapping[str, int] | None, seconds: Mapping[str, float] | None) -> None:
        active = _RECORDING.get()
        if active is None or active[0] is not self:
            return
        own = active[1]
        with own._lock:
            if counters:
                own.counters.update(counters)
            if seconds:
                own.seconds.update(seconds)

    def _snapshot(self) -> tuple[dict[str, int], dict[str, float]]:
        with self._lock:
            return dict(self.counters), dict(self.seconds)

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, float]]) -> "Stats":
        """The inverse of `as_dict` (a Prefect task returns its stats this way for the flow to merge)."""
        stats = cls()
        stats.counters.update({k: int(v) for k, v in data.get("counters", {}).items()})
        stats.seconds.update(data.get("seconds", {}))
        return stats

    def as_dict(self) -> dict[str, dict[str, float]]:
        counters, seconds = self._snapshot()
        return {
            "counters": dict(sorted(counters.items())),
            "seconds": {k: round(v, 4) for k, v in sorted(seconds.items())},
        }
