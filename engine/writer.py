"""The dataset writer: rows of many finished items, committed together by size or by age.

A flush is one Delta append per data table (the rows of every buffered item, each row tagged with its
`item_id` and the flush's `write_id`), then one append to `items` with a row per buffered item. Until that
last append the items are not part of the dataset; a process killed before it loses the buffered items (at
most `flush_minutes` of work) and leaves rows nothing names, which readers skip and `compact` deletes.
Several threads may add at once (an item's rows enter the buffer together, a flush runs alone), and several
processes may write one dataset (Delta's optimistic commits).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from engine import __version__
from engine.storage import ITEMS, TABLES, Dataset, now_iso, table_schema
from schemas import ItemRecord, to_table
from schemas.records import Record


@dataclass
class TableWriter:
    """Buffers items (their `items` row and their data rows) and flushes them when the buffer passes
    `flush_mb` or its oldest item is `flush_minutes` old (checked as items arrive), and on `flush()`.

    Rows wait as plain dicts until `combine_every` items have arrived, then become one contiguous Arrow table
    per data table: the buffer's memory is its Arrow size, not thousands of tiny tables' overhead."""

    dataset: Dataset
    run_id: str
    flush_mb: float = 256
    flush_minutes: float = 10
    combine_every: int = 256
    commits: int = 0  # flushes done
    items_committed: int = 0
    _records: list[ItemRecord] = field(default_factory=list)
    _ids: set[str] = field(default_factory=set)
    _rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))  # not yet combined
    _combined: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))  # Arrow tables
    _uncombined: int = 0
    _nbytes: int = 0
    _oldest: float | None = None
    _prepared: bool = False
    _lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.flush_mb <= 0 or self.flush_minutes <= 0:
            raise ValueError(f"flush_mb and flush_minutes must be positive, got {self.flush_mb}, {self.flush_minutes}")
        self.dataset.check_writable()  # a folder of the old layout is refused before any work; tables come at the flush

    def add(self, record: ItemRecord, tables: Mapping[str, Sequence[Record]] | None = None) -> None:
        """Buffer one item: its `items` row (write_id, rows, run, time and engine version are filled at the
        flush; a row given a write_id keeps it) and its rows per data table."""
        tables = {name: rows for name, rows in (tables or {}).items() if rows}
        unknown = set(tables) - set(TABLES)
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)}")
        dumped = {}  # outside the lock: the costly part
        for name, rows in tables.items():
            extra = {"item_id": record.item_id}
            if "pipeline" not in TABLES[name].model_fields:
                extra["pipeline"] = record.pipeline
            dumped[name] = [{**row.model_dump(), **extra} for row in rows]
        if record.write_id == "":
            record = record.model_copy(update={"rows": {name: len(rows) for name, rows in dumped.items()}})
        with self._lock:
            if record.item_id in self._ids:  # a retried item: its earlier rows go out under their own write id
                self._flush()
            self._ids.add(record.item_id)
            self._records.append(record)
            for name, rows in dumped.items():
                self._rows[name] += rows
            self._uncombined += 1
            if self._uncombined >= self.combine_every:
                self._combine()
            if self._oldest is None:
                self._oldest = time.monotonic()
            if self._nbytes >= self.flush_mb * 2**20 or time.monotonic() - self._oldest >= self.flush_minutes * 60:
                self._flush()

    def keep(self, record: ItemRecord) -> None:
        """Write an `items` row as it is (its write_id kept): a refreshed fingerprint of an unchanged input,
        or a status change (removed, replaced) that adds no rows."""
        self.add(record.model_copy(update={"write_id": record.write_id or "-"}))

    def pending(self, item_id: str) -> bool:
        with self._lock:
            return item_id in self._ids

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _combine(self) -> None:
        """The dict rows of the last items as one Arrow table per data table (explicit schemas)."""
        import pyarrow as pa

        for name, rows in self._rows.items():
            if rows:
                schema = table_schema(name)
                arrow = pa.Table.from_pylist(rows, schema=schema.remove(schema.get_field_index("write_id")))
                self._combined[name].append(arrow)
                self._nbytes += arrow.nbytes
        self._rows.clear()
        self._uncombined = 0

    def _flush(self) -> None:
        import pyarrow as pa
        from deltalake import write_deltalake

        if not self._records:
            return
        if not self._prepared:
            self.dataset.prepare()
            self._prepared = True
        self._combine()
        write_id = uuid.uuid4().hex[:16]
        for name, parts in self._combined.items():  # the data first...
            combined = pa.concat_tables(parts)
            combined = combined.append_column("write_id", pa.array([write_id] * combined.num_rows, pa.string()))
            write_deltalake(  # merge: a column a later engine version added joins a table written before it
                self.dataset.uri(name), combined, mode="append", storage_options=self.dataset.storage_options,
                writer_properties=writer_properties(), schema_mode="merge",
            )
        stamp = now_iso()
        update: dict[str, Any] = {"committed_at": stamp, "engine_version": __version__}
        rows = [
            r.model_copy(update={**update, "run_id": self.run_id, "write_id": write_id} if r.write_id == "" else update)
            for r in self._records
        ]
        # ...then the items: from this commit on, they are part of the dataset.
        write_deltalake(self.dataset.uri(ITEMS), to_table(ItemRecord, rows), mode="append", storage_options=self.dataset.storage_options)
        self.commits += 1
        self.items_committed += len(rows)
        self._records.clear()
        self._ids.clear()
        self._combined.clear()
        self._nbytes = 0
        self._oldest = None

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        # Items finished before an error are kept: their rows are complete.
        self.flush()


def writer_properties() -> Any:
    """zstd, and row groups of at most 8192 rows: a reader streams a table one row group at a time, so a row group
    (a masklet carries every frame's mask) bounds its memory."""
    from deltalake import WriterProperties

    return WriterProperties(compression="ZSTD", max_row_group_size=8192)


_WRITERS: dict[tuple[str, str], TableWriter] = {}
_WRITERS_LOCK = threading.Lock()


def shared_writer(dataset: Dataset, run_id: str, **settings: Any) -> TableWriter:
    """The process's writer for one run into one dataset: batches of a run that land in this process
    (threads of the local task runner, a shard run's batches) fill the same buffer, so a commit holds many
    batches. `flush_writers` commits what is left."""
    with _WRITERS_LOCK:
        key = (dataset.url, run_id)
        if key not in _WRITERS:
            _WRITERS[key] = TableWriter(dataset, run_id, **settings)
        return _WRITERS[key]


def flush_writers(url: str, run_id: str) -> TableWriter | None:
    """Commit and forget the process's writer of a run (None if this process wrote nothing for it)."""
    with _WRITERS_LOCK:
        writer = _WRITERS.pop((Dataset(url).url, run_id), None)
    if writer is not None:
        writer.flush()
    return writer
