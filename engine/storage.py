"""A dataset folder (local path or fsspec URL): Parquet shards per table, commit records, a manifest.

Layout:
    <root>/<table>/part-<pipeline>-<stamp>.parquet  rows of a batch of items; a new shard past the size target
    <root>/_complete/<pipeline>/<item_key>.json    commit record of one item: where its rows are, written last
    <root>/manifest.json                            tables, row counts, items per pipeline (after each run)
    <root>/stats.json                               counters and timers of the last run
    <root>/README.md                                the dataset card

Shards hold many items (a worker buffers rows and writes a shard when the buffer passes `shard_mb`, and at
the end of its batch), so 700K videos make thousands of files, not millions. An item's rows become visible
only when its commit record, naming the shard and the row range, is written after the shard is complete.
The commit record is the truth: a killed run leaves at most shard rows no record points to, a rerun of the
item writes a new record that supersedes the old one (and with it an earlier rejection of the same input),
and `read_table` returns only committed rows. Several pipelines can write one dataset: records are keyed by
pipeline and item. Files are written under a hidden temporary name (`_tmp-...`) and renamed when complete.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from engine.errors import BadInputError
from schemas import TABLES, arrow_schema, to_table
from schemas.records import Record

COMPLETE = "_complete"


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Dataset:
    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)

    # -- writing -----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folder, or say why it cannot be, before any video is processed."""
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot write a dataset at {self.url}: {exc.strerror or exc}") from None

    def _temporary(self, path: str) -> str:
        """A hidden name beside `path` (readers skip names starting with `_`); its folder exists."""
        parent, _, name = path.rpartition("/")
        self.fs.makedirs(parent, exist_ok=True)
        return f"{parent}/_tmp-{uuid.uuid4().hex}-{name}"

    def _atomic_write(self, path: str, data: bytes) -> None:
        tmp = self._temporary(path)
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def writer(self, pipeline: str, *, shard_mb: float = 128) -> "ShardWriter":
        return ShardWriter(self, pipeline, shard_mb=shard_mb)

    def write_json(self, name: str, payload: Any) -> None:
        self._atomic_write(_join(self.root, name), json.dumps(payload, indent=1, default=str).encode())

    def write_text(self, name: str, text: str) -> None:
        self._atomic_write(_join(self.root, name), text.encode())

    def put_file(self, local_path: str, relative: str) -> str:
        """Copy a finished local file (a render) into the dataset under a temporary name, then rename."""
        path = _join(self.root, relative)
        tmp = self._temporary(path)
        self.fs.put_file(local_path, tmp)
        self.fs.mv(tmp, path)
        return path

    # -- commit records ----------------------------------------------------------------------------------
    def _record_path(self, pipeline: str, key: str) -> str:
        return _join(self.root, COMPLETE, pipeline, f"{key}.json")

    def completion(self, pipeline: str, key: str) -> dict[str, Any] | None:
        path = self._record_path(pipeline, key)
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def completions(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        """Every commit record (of one pipeline, or of all)."""
        base = _join(self.root, COMPLETE)
        if not self.fs.exists(base):
            return []
        folders = [_join(base, pipeline)] if pipeline else sorted(self.fs.ls(base, detail=False))
        out = []
        for folder in folders:
            if not self.fs.isdir(folder):
                continue
            for path in sorted(self.fs.ls(folder, detail=False)):
                name = path.rpartition("/")[2]
                if name.endswith(".json") and not name.startswith("_"):
                    with self.fs.open(path, "rb") as f:
                        out.append(json.loads(f.read()))
        return out

    def fingerprint(self, source: str) -> dict[str, Any] | None:
        """A cheap change check before a full content hash: size and mtime (or an object store's etag); for a
        folder of frames, its file count, total size and newest mtime. None where the source cannot be
        listed (the content hash decides then)."""
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(source)
            info = fs.info(path)
            if info.get("type") == "directory":
                entries = [e for e in fs.ls(path, detail=True) if e.get("type") == "file"]
                return {
                    "files": len(entries),
                    "size": sum(int(e.get("size") or 0) for e in entries),
                    "mtime": max((str(e.get("mtime") or e.get("LastModified") or "") for e in entries), default=""),
                }
            keys = ("size", "mtime", "ETag", "etag", "LastModified", "md5Hash")
            return {k: str(info[k]) for k in keys if info.get(k) is not None}
        except (OSError, ValueError):
            return None

    # -- reading -----------------------------------------------------------------------------------------
    def shards(self, table: str) -> list[str]:
        if table not in TABLES:
            raise BadInputError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
        folder = _join(self.root, table)
        if not self.fs.exists(folder):
            return []
        return sorted(
            p for p in self.fs.ls(folder, detail=False) if p.endswith(".parquet") and not p.rpartition("/")[2].startswith("_")
        )

    def committed_ranges(self, table: str) -> dict[str, list[tuple[int, int]]]:
        """Shard file name -> (first row, row count) of every committed item's rows in it."""
        ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for record in self.completions():
            for name, first, count in record.get("rows", {}).get(table, []):
                ranges[name].append((first, count))
        return ranges

    def read_table(self, table: str, columns: Iterable[str] | None = None):
        """The committed rows of a table as one pyarrow Table with the table's explicit schema."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if table not in TABLES:
            raise BadInputError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
        schema = arrow_schema(TABLES[table])
        cols = list(columns) if columns else None
        parts = []
        for name, ranges in sorted(self.committed_ranges(table).items()):
            # A path and the filesystem, not an open file or a buffer: with those, pyarrow 23 can abort the
            # interpreter at exit ("terminate called without an active exception").
            shard = pq.read_table(_join(self.root, table, name), filesystem=self.fs, columns=cols, schema=schema)
            parts += [shard.slice(first, count) for first, count in sorted(ranges)]
        if not parts:
            empty = schema.empty_table()
            return empty.select(cols) if cols else empty
        return pa.concat_tables(parts)

    def scan(self, table: str, columns: Iterable[str] | None = None, *, batch_rows: int = 4096):
        """The committed rows of a table as pyarrow RecordBatches of at most `batch_rows` rows, so a reader
        of a large dataset holds one batch at a time (exporters stream through this)."""
        yield from self.read_table(table, columns).to_batches(max_chunksize=batch_rows)

    def read_records(self, table: str) -> list[Record]:
        from schemas import from_table

        return from_table(TABLES[table], self.read_table(table))

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def write_manifest(self, *, engine_version: str) -> dict[str, Any]:
        """Summarise what is committed now (after any number of runs) in manifest.json."""
        records = self.completions()
        tables = {}
        for table in TABLES:
            ranges = self.committed_ranges(table)
            tables[table] = {"shards": len(ranges), "rows": sum(c for r in ranges.values() for _, c in r)}
        items: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for record in records:
            items[record["pipeline"]][record.get("status", "done")] += 1
        manifest = {
            "engine_version": engine_version,
            "updated_at": _now(),
            "tables": tables,
            "items": {p: dict(s) for p, s in sorted(items.items())},
            "videos": sorted({r["video_id"] for r in records if r.get("video_id") and r.get("status") == "done"}),
        }
        self.write_json("manifest.json", manifest)
        return manifest


@dataclass
class _Pending:
    key: str
    record: dict[str, Any]
    rows: dict[str, int]  # table -> rows this item added to the buffer


@dataclass
class ShardWriter:
    """Buffers the rows of finished items and writes them as shards, then their commit records.

    `add` never splits an item across shards; `flush` (called when the buffer passes `shard_mb`, and by
    `close`) writes one shard per table, then one commit record per buffered item. Several threads may add
    at once: an item's rows go into the buffer together, and a flush runs alone."""

    dataset: Dataset
    pipeline: str
    shard_mb: float = 128
    _tables: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    _pending: list[_Pending] = field(default_factory=list)
    _nbytes: int = 0
    _lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.shard_mb <= 0:
            raise ValueError(f"shard_mb must be positive, got {self.shard_mb}")

    def add(self, key: str, tables: Mapping[str, Sequence[Record]], record: dict[str, Any]) -> None:
        """Buffer one item's rows (every table; missing ones empty) and its commit record's content."""
        unknown = set(tables) - set(TABLES)
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)}")
        # Converted outside the lock (the costly part); buffered under it, all tables of the item at once.
        converted = {table: (len(rows), to_table(TABLES[table], list(rows))) for table, rows in tables.items() if rows}
        with self._lock:
            counts = {}
            for table, (n, arrow) in converted.items():
                self._tables[table].append(arrow)
                self._nbytes += arrow.nbytes
                counts[table] = n
            self._pending.append(_Pending(key, record, counts))
            if self._nbytes >= self.shard_mb * 2**20:
                self.flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        names = {}
        for table, parts in self._tables.items():
            name = f"part-{self.pipeline}-{stamp}.parquet"
            sink = pa.BufferOutputStream()
            combined = pa.concat_tables(parts).combine_chunks()
            pq.write_table(combined, sink, compression="zstd", row_group_size=4096)
            self.dataset._atomic_write(_join(self.dataset.root, table, name), sink.getvalue().to_pybytes())
            names[table] = name
        offsets: dict[str, int] = defaultdict(int)
        for item in self._pending:
            rows = {}
            for table, n in item.rows.items():
                rows[table] = [[names[table], offsets[table], n]]
                offsets[table] += n
            record = {
                "pipeline": self.pipeline,
                "key": item.key,
                "completed_at": _now(),
                **item.record,
                "rows": rows,
            }
            path = self.dataset._record_path(self.pipeline, item.key)
            self.dataset._atomic_write(path, json.dumps(record, indent=1, default=str).encode())
        self._tables.clear()
        self._pending.clear()
        self._nbytes = 0

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        # Items finished before an error are kept: their rows are complete.
        self.flush()
