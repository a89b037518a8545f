"""Types the agents share: a `Failure` is how any agent says an item produced nothing, so a flow turns the
failures of every agent (Analyzer, Annotator, Refiner, Entity Recognizer, Referring Parser, Instruction
Generator, ...) into `rejections` rows the same way."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """Why an item produced nothing, with every model answer kept as evidence (first to last).

    `reason` is short and machine-friendly (`invalid_answer`, `no_nouns`, `static_only`, ...); the caller
    writes it, `detail` and `raw_answer` into a `rejections` row.
    """

    reason: str
    detail: str = ""
    raw: tuple[str, ...] = ()

    @property
    def raw_answer(self) -> str | None:
        return self.raw[-1] if self.raw else None
