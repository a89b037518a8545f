"""Named counters and per-stage timers, reported at the end of a run and written beside the dataset."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

Listener = Callable[[str, int], None]


class Stats:
    """`listener(name, n)` hears every count as it happens (the CLI turns some into progress bars)."""

    def __init__(self, listener: Listener | None = None) -> None:
        self.counters: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self.listener = listener

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n
        if self.listener is not None:
            self.listener(name, n)

    @contextmanager
    def timer(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def merge(self, other: "Stats") -> None:
        self.counters.update(other.counters)
        self.seconds.update(other.seconds)

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, float]]) -> "Stats":
        """The inverse of `as_dict` (a Prefect task returns its stats this way for the flow to merge)."""
        stats = cls()
        stats.counters.update({k: int(v) for k, v in data.get("counters", {}).items()})
        stats.seconds.update(data.get("seconds", {}))
        return stats

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            "counters": dict(sorted(self.counters.items())),
            "seconds": {k: round(v, 4) for k, v in sorted(self.seconds.items())},
        }
