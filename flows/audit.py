"""`engine dataset audit`: is every input of the sources accounted for, for every pipeline and run options the
dataset recorded? An input is accounted for when its latest `items` row says done, rejected (with a reason) or
removed (or replaced by a --force run with other options). Streams the sources a chunk at a time against one read of `items`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from engine.errors import BadInputError
from engine.planning import chunked, item_id
from engine.storage import Dataset
from flows import registry
from flows.pipelines import iter_items, recorded_settings


@dataclass
class AuditReport:
    inputs: int = 0
    counts: Counter = field(default_factory=Counter)  # status (or "missing") -> inputs
    examples: list[tuple[str, str]] = field(default_factory=list)  # (pipeline, source) of a few missing ones

    @property
    def missing(self) -> int:
        return self.counts.get("missing", 0)


def audit(
    path: str, sources: Sequence[str], *, frame_rate: float | None = None, split: str | None = None, chunk: int = 8192, examples: int = 10
) -> AuditReport:
    import pyarrow as pa
    import pyarrow.compute as pc

    dataset = Dataset(path)
    dataset.require()
    settings = recorded_settings(dataset)
    if not settings:
        raise BadInputError(f"{path} has no published run: nothing to audit against")
    items = dataset.items(columns=["status", "reason"])
    report = AuditReport()
    for s in settings:
        rate = frame_rate if frame_rate is not None else s.frame_rate
        # a pipeline this engine does not know (a dataset written by another version) reads sources the default way
        spec = registry.known(s.pipeline)
        read = iter_items(sources, frame_rate=rate, split=split if split is not None else s.split,
                          videos=s.sources_are_videos, engine_samples=spec.engine_samples if spec else None)
        for batch in chunked(read, chunk):
            report.inputs += len(batch)
            ids = [item_id(s.pipeline, i, s.variant) for i in batch]
            found = items.filter(pc.is_in(items["item_id"], value_set=pa.array(ids, pa.string())))
            status = dict(zip(found["item_id"].to_pylist(), found["status"].to_pylist()))
            for item, iid in zip(batch, ids):
                state = status.get(iid, "missing")  # replaced: a --force run with other options took its place
                report.counts[state] += 1
                if state == "missing" and len(report.examples) < examples:
                    report.examples.append((s.pipeline, item.source))
    return report
