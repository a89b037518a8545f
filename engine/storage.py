"""A dataset: a folder (local path or object-store URL) of Delta Lake tables (delta-rs, no JVM).

Layout:
    <root>/videos, clips, masklets, samples, rejections   the data tables: the records of `schemas/` plus the
                                                          columns `pipeline`, `item_id` and `write_id`
    <root>/items       one row per committed item (schemas.ItemRecord), appended after the item's rows
    <root>/versions    one row per published dataset version (schemas.VersionRecord)
    <root>/manifest.json, README.md    summary and dataset card of the latest published version

Commits follow delta-rs's shape: a writer (engine.writer) buffers the rows of many finished items and
flushes them as one append per data table, then one append to `items` naming those items and the flush's
`write_id`. The committed view of a table is its rows whose (item_id, write_id) is the latest `items` row of
a live item (status done or rejected). A flush killed half-way leaves rows no `items` row names; a rerun's
rows supersede the older ones; neither is ever read. `compact` rewrites every table to exactly its committed
view, so a plain Delta snapshot equals it. Each finished run publishes a version, the Delta version of every
table at that point; reading a version pins every table there, so its readers never see a later run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator

from engine.errors import BadInputError
from schemas import TABLES, ItemRecord, VersionRecord, arrow_schema
from schemas.records import Record

ITEMS = "items"
VERSIONS = "versions"
ALL_TABLES = (*TABLES, ITEMS, VERSIONS)
STORAGE_COLUMNS = ("pipeline", "item_id", "write_id")  # added to every data table's record columns
LIVE = ("done", "rejected")  # item statuses whose rows are part of the dataset
LEGACY_MARKER = "_complete"  # the commit-record folder of the engine's earlier layout


def now_iso() -> str:
    """UTC time with microseconds; fixed width, so it sorts as text."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def table_schema(table: str):
    """The explicit Arrow schema of a table on disk: its record's columns, then the storage columns."""
    import pyarrow as pa

    if table == ITEMS:
        return arrow_schema(ItemRecord)
    if table == VERSIONS:
        return arrow_schema(VersionRecord)
    if table not in TABLES:
        raise BadInputError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
    schema = arrow_schema(TABLES[table])
    for name in STORAGE_COLUMNS:
        if name not in schema.names:
            schema = schema.append(pa.field(name, pa.string(), nullable=False))
    return schema


def latest_rows(table: Any, key: str, order: tuple[str, ...] = ("committed_at", "write_id")) -> Any:
    """The last row of each `key` value, rows ordered by `order` within a key (pyarrow, no Python loop)."""
    import numpy as np
    import pyarrow.compute as pc

    if table.num_rows <= 1:
        return table
    # Sort indices, not the table: only the key column is copied in order (the reader's peak at 700K items).
    order = pc.sort_indices(table, [(key, "ascending"), *((c, "ascending") for c in order if c in table.column_names)])
    keys = table[key].take(order)
    differs = pc.not_equal(keys.slice(0, len(keys) - 1), keys.slice(1)).to_numpy(zero_copy_only=False)
    del keys
    return table.take(order.filter(np.append(differs, True)))


def live_rows(items: Any) -> Any:
    """The rows of `items` (latest rows, Arrow) whose item is part of the dataset: done or rejected."""
    import pyarrow.compute as pc

    return items.filter(pc.is_in(items["status"], value_set=_strings(LIVE)))


def live_keys(items: Any) -> Any:
    """`item_id:write_id` of every live item, as an Arrow array (compact at any size: no Python set)."""
    import pyarrow.compute as pc

    live = live_rows(items)
    return pc.binary_join_element_wise(live["item_id"], live["write_id"], ":")


def live_videos(items: Any) -> Any:
    """The video ids live items point at, as an Arrow array. A `videos` row is live when its video is, whichever
    item wrote it: compaction keeps one row per video, and the item that wrote it may be removed later while
    another item of the same video stays."""
    import pyarrow.compute as pc

    live = live_rows(items)
    return pc.unique(live["video_id"].drop_null())


@dataclass(frozen=True)
class LiveView:
    """What a reader of one version joins on: live `item_id:write_id` keys, and live video ids for `videos`."""

    keys: Any
    videos: Any

    @classmethod
    def of(cls, items: Any) -> "LiveView":
        return cls(live_keys(items), live_videos(items))

    def mask(self, table: str, batch: Any) -> Any:
        import pyarrow.compute as pc

        if table == "videos":
            return pc.is_in(batch["video_id"], value_set=self.videos)
        joined = pc.binary_join_element_wise(batch["item_id"], batch["write_id"], ":")
        return pc.is_in(joined, value_set=self.keys)


def item_row(row: dict[str, Any]) -> dict[str, Any]:
    """An `items` row read back with pyarrow (maps come as lists of pairs) as ItemRecord fields."""
    fields = {k: v for k, v in row.items() if k in ItemRecord.model_fields}
    for name in ("rows", "counters"):
        if isinstance(fields.get(name), list):
            fields[name] = dict(fields[name])
    return fields


def _strings(values: Iterable[str]) -> Any:
    import pyarrow as pa

    return pa.array(list(values), type=pa.string())


@dataclass
class Version:
    number: int
    record: VersionRecord


@dataclass
class Diff:
    added: dict[str, int] = field(default_factory=dict)  # pipeline -> items live in the second version only
    changed: dict[str, int] = field(default_factory=dict)  # live in both, rewritten in between
    removed: dict[str, int] = field(default_factory=dict)  # live in the first only
    examples: dict[str, list[str]] = field(default_factory=dict)  # added/changed/removed -> a few sources
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # table -> (rows in first, rows in second)


class Dataset:
    """A dataset folder. Reading methods take `version` (a published version number; None: every item
    committed so far, a run in progress included)."""

    def __init__(self, url: str, *, storage_options: dict[str, str] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/") if "://" in url else os.path.abspath(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.storage_options = storage_options
        self._pinned: dict[int, dict[str, int | None]] = {}  # published version -> Delta version of each table
        self._keys: dict[int, LiveView] = {}  # published version -> what its readers join on

    # -- layout ------------------------------------------------------------------------------------------
    def uri(self, table: str) -> str:
        return f"{self.url}/{table}"

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def _is_table(self, table: str) -> bool:
        return self.fs.exists(f"{self.root}/{table}/_delta_log")

    def check_layout(self) -> None:
        """Refuse, in one line, a folder written by the engine's earlier layout (commit JSONs per item)."""
        if self.fs.exists(f"{self.root}/{LEGACY_MARKER}") and not self._is_table(ITEMS):
            # Its rows cannot be carried over: their ids lack the pipeline and run options that now tell the
            # outputs of two pipelines or two option sets apart, and a converted item would be redone anyway.
            pipelines = sorted(p.rstrip("/").rpartition("/")[2] for p in self.fs.ls(f"{self.root}/{LEGACY_MARKER}"))
            raise BadInputError(
                f"{self.url} is in the engine's earlier layout (Parquet shards with a _complete/ commit file per "
                f"item) and cannot be read or appended to; convert it by running what made it into a new folder: "
                f"engine run {'|'.join(pipelines) or '<pipeline>'} --source <its sources> --out <new folder>"
            )

    def require(self) -> None:
        """For readers: the folder must be a dataset of this layout."""
        if not self.exists():
            raise BadInputError(f"{self.url} does not exist")
        self.check_layout()
        if not self._is_table(ITEMS):
            raise BadInputError(f"{self.url} is not a dataset (no items table); write one with engine run")

    def check_writable(self) -> None:
        """Create the folder, or say in one line why it cannot be, and refuse the old layout: before any work."""
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot write a dataset at {self.url}: {exc.strerror or exc}") from None
        self.check_layout()

    def prepare(self) -> None:
        """`check_writable`, then create every table (empty, with its explicit schema). Safe when several
        processes prepare one dataset at once."""
        from deltalake import DeltaTable

        self.check_writable()
        for table in ALL_TABLES:
            if self._is_table(table):
                continue
            try:
                DeltaTable.create(self.uri(table), table_schema(table), mode="ignore", storage_options=self.storage_options)
            except Exception:  # another process created it first (its commit 0 won): fine if it is there now
                if not self._is_table(table):
                    raise

    def delta(self, table: str, version: int | None = None):
        """The Delta table at a Delta version (None: the latest)."""
        from deltalake import DeltaTable

        return DeltaTable(self.uri(table), version=version, storage_options=self.storage_options)

    def arrow_dataset(self, table: str, version: int | None = None):
        """A pyarrow dataset of the table's files at a Delta version, read through pyarrow's own filesystem
        where it has one for the URL: deltalake's default Python filesystem handler can make the interpreter
        abort at exit ("terminate called without an active exception")."""
        import pyarrow.fs as pafs

        delta = self.delta(table, version)
        try:
            raw, root = pafs.FileSystem.from_uri(self.uri(table))
        except (ValueError, OSError):  # pyarrow has no filesystem for this scheme (ArrowInvalid is a ValueError)
            return delta.to_pyarrow_dataset()
        return delta.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(root, raw))

    def batches(self, table: str, version: int | None, columns: list[str], batch_rows: int) -> Iterator[Any]:
        """Every row of the table's files at a Delta version (committed or not), one file and one row group at a
        time: a reader of any size holds about a row group (pyarrow's dataset scanner held several hundred MB
        more on masklet tables). The file list is read now: delta-rs cannot open a table inside its own write."""
        import pyarrow as pa
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        uris = self.delta(table, version).file_uris()
        try:
            located = [pafs.FileSystem.from_uri(uri) for uri in uris]
        except (ValueError, OSError):  # no pyarrow filesystem for this scheme: its dataset scanner then
            return self.arrow_dataset(table, version).to_batches(columns=columns, batch_size=batch_rows)

        schema = table_schema(table)
        wanted = pa.schema([schema.field(c) for c in columns])

        def read() -> Iterator[Any]:
            for fs, path in located:
                with fs.open_input_file(path) as handle:
                    parquet = pq.ParquetFile(handle)
                    present = [c for c in columns if c in parquet.schema_arrow.names]
                    for batch in parquet.iter_batches(batch_size=batch_rows, columns=present, use_threads=False):
                        # a file written before a column was added, or by another writer: the table's schema
                        yield batch if batch.schema.equals(wanted) else _conformed(batch, wanted)

        return read()

    # -- small files beside the tables -------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        """Write `name` under the root atomically (a hidden temporary name, then a rename)."""
        import uuid

        path = f"{self.root}/{name}"
        tmp = f"{self.root}/_tmp-{uuid.uuid4().hex}-{name.replace('/', '_')}"
        self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(text.encode())
            self.fs.mv(tmp, path)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def write_json(self, name: str, payload: Any) -> None:
        self.write_text(name, json.dumps(payload, indent=1, default=str))

    def put_file(self, local_path: str, relative: str) -> str:
        """Copy a finished local file (a render) into the dataset under a temporary name, then rename."""
        import uuid

        path = f"{self.root}/{relative}"
        parent, _, name = path.rpartition("/")
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/_tmp-{uuid.uuid4().hex}-{name}"
        self.fs.put_file(local_path, tmp)
        self.fs.mv(tmp, path)
        return path

    # -- reading -----------------------------------------------------------------------------------------
    def table_versions(self, version: int | None) -> dict[str, int | None]:
        """Delta version of every table for a published version (None: each table's latest)."""
        if version is None:
            return {t: None for t in ALL_TABLES}
        if version in self._pinned:  # a published version never changes: read the versions table once for it
            return self._pinned[version]
        for v in self.versions():
            if v.number == version:
                self._pinned[version] = {t: v.record.tables.get(t) for t in ALL_TABLES}
                return self._pinned[version]
        known = ", ".join(str(v.number) for v in self.versions()) or "none yet"
        raise BadInputError(f"{self.url} has no version {version}; published versions: {known}")

    def _arrow(self, table: str, delta_version: int | None, columns: list[str] | None = None):
        try:
            return self.arrow_dataset(table, delta_version).to_table(columns=columns)
        except FileNotFoundError:
            raise BadInputError(
                f"{self.url}: the files of that version of {table} were vacuumed by `engine dataset compact` "
                "(it keeps older versions readable for --retention-hours)"
            ) from None

    def items(self, *, version: int | None = None, columns: Iterable[str] | None = None, pipeline: str | None = None):
        """The latest `items` row of every item (all statuses), as a pyarrow Table."""
        import pyarrow.compute as pc

        cols = None
        if columns is not None:
            cols = list(dict.fromkeys([*columns, "item_id", "committed_at", "write_id", "pipeline"]))
        if not self._is_table(ITEMS):  # nothing written yet
            empty = table_schema(ITEMS).empty_table()
            return empty.select(cols) if cols else empty
        table = self._arrow(ITEMS, self.table_versions(version)[ITEMS], cols)
        if pipeline is not None:
            table = table.filter(pc.equal(table["pipeline"], pipeline))
        return latest_rows(table, "item_id")

    def _live(self, version: int | None) -> LiveView:
        """The live view of a version, built once per published version (a reader scans several tables of one
        version: the export, `show`); every committed item now is read afresh each time."""
        if version is None:
            return LiveView.of(self.items(columns=["status", "video_id"]))
        if version not in self._keys:
            self._keys[version] = LiveView.of(self.items(version=version, columns=["status", "video_id"]))
        return self._keys[version]

    def completion(self, pipeline: str, item_key: str, *, version: int | None = None) -> dict[str, Any] | None:
        """The newest live `items` row of an input of a pipeline (of any run options), or None."""
        import pyarrow.compute as pc

        items = live_rows(self.items(version=version, pipeline=pipeline))
        rows = items.filter(pc.equal(items["item_key"], item_key))
        if not rows.num_rows:
            return None
        return item_row(max(rows.to_pylist(), key=lambda r: r["committed_at"]))

    def scan(
        self,
        table: str,
        columns: Iterable[str] | None = None,
        *,
        version: int | None = None,
        batch_rows: int = 65536,
        unique: bool = True,
    ) -> Iterator[Any]:
        """The committed rows of a table as pyarrow RecordBatches, one at a time (a reader of a large dataset
        holds one batch, plus the live keys: about 40 bytes per item). Columns: the record's and `pipeline`
        unless given. `videos` rows are unique per video_id unless `unique` is False (then a video read by
        several items repeats, and memory stays flat: a set of seen ids grows with the videos)."""
        schema = table_schema(table)  # also rejects an unknown table
        live = self._live(version)
        wanted = list(columns) if columns is not None else [n for n in schema.names if n not in ("item_id", "write_id")]
        unknown = [c for c in wanted if c not in schema.names]
        if unknown:
            raise BadInputError(f"table {table} has no column {unknown[0]!r}; columns: {', '.join(schema.names)}")
        read = list(dict.fromkeys([*wanted, "item_id", "write_id", *(["video_id"] if table == "videos" else [])]))
        seen: set[str] = set()
        for batch in self.batches(table, self.table_versions(version)[table], read, batch_rows):
            if not batch.num_rows:
                continue
            batch = batch.filter(live.mask(table, batch))
            if table == "videos" and unique and batch.num_rows:
                ids = batch["video_id"].to_pylist()
                fresh = [i not in seen and not seen.add(i) for i in ids]  # first of each id
                batch = batch.filter(_bools(fresh))
            if batch.num_rows:
                yield batch.select(wanted)

    def read_table(self, table: str, columns: Iterable[str] | None = None, *, version: int | None = None):
        """The committed rows of a table as one pyarrow Table (see `scan`)."""
        import pyarrow as pa

        cols = list(columns) if columns is not None else None
        batches = list(self.scan(table, cols, version=version))
        if batches:
            return pa.Table.from_batches(batches)
        schema = table_schema(table)
        names = cols or [n for n in schema.names if n not in ("item_id", "write_id")]
        return schema.empty_table().select(names)

    def read_records(self, table: str, *, version: int | None = None) -> list[Record]:
        from schemas import from_table

        model = TABLES[table]
        return from_table(model, self.read_table(table, list(model.model_fields), version=version))

    # -- versions ----------------------------------------------------------------------------------------
    def versions(self) -> list[Version]:
        """Every published version, oldest first; a version's number is the Delta version of the commit
        that added its row to `versions` (1, 2, ...: commit 0 created the table; unique and in order, whoever
        published it)."""
        from schemas import from_table

        if not self._is_table(VERSIONS):
            return []
        numbers = {c.get("run_id"): c["version"] for c in self.delta(VERSIONS).history() if c.get("run_id")}
        records = from_table(VersionRecord, self.arrow_dataset(VERSIONS).to_table())
        out = [Version(numbers[r.run_id], r) for r in records if r.run_id in numbers]
        return sorted(out, key=lambda v: v.number)

    def reading(self, version: int | None) -> int | None:
        """For readers that stream a version (exporters, the review pages): the version they read, `version` or
        else the latest published (None: every committed item, where none is published yet), checked now so an
        unknown one is one line before anything is written."""
        self.require()
        if version is None:
            version = self.latest_version()
        self.table_versions(version)
        return version

    def latest_version(self) -> int | None:
        versions = self.versions()
        return versions[-1].number if versions else None

    def publish(self, record: VersionRecord) -> int:
        """Record every table's Delta version now as a new dataset version; returns its number."""
        from deltalake import CommitProperties, write_deltalake

        from schemas import to_table

        # `items` first: a writer flushing meanwhile commits its data tables before its `items` rows, so every
        # item live at the pinned `items` version has its rows in the data tables read after it.
        tables = {t: self.delta(t).version() for t in (ITEMS, *TABLES)}
        record = record.model_copy(update={"tables": tables, "published_at": now_iso()})
        write_deltalake(
            self.uri(VERSIONS),
            to_table(VersionRecord, [record]),
            mode="append",
            commit_properties=CommitProperties(custom_metadata={"run_id": record.run_id}),
            storage_options=self.storage_options,
        )
        number = next(v.number for v in self.versions() if v.record.run_id == record.run_id)
        self.write_json("manifest.json", self.summary(number))
        return number

    def summary(self, version: int | None = None) -> dict[str, Any]:
        """Rows per table and items per pipeline and status (from the `items` rows alone: no data read)."""
        from collections import Counter, defaultdict

        items = self.items(version=version, columns=["status", "rows", "video_id"])
        per_pipeline: dict[str, Counter] = defaultdict(Counter)
        rows: Counter = Counter()
        videos: set[str] = set()
        for pipeline, status, counts, video_id in zip(
            items["pipeline"].to_pylist(), items["status"].to_pylist(), items["rows"].to_pylist(), items["video_id"].to_pylist()
        ):
            per_pipeline[pipeline][status] += 1
            if status in LIVE:
                rows.update({k: v for k, v in (counts or []) if k != "videos"})
                if status == "done" and video_id:
                    videos.add(video_id)
        rows["videos"] = len(videos)
        return {
            "version": version,
            "tables": {t: {"rows": rows.get(t, 0)} for t in TABLES},
            "items": {p: dict(c) for p, c in sorted(per_pipeline.items())},
        }

    def diff(self, first: int, second: int, *, examples: int = 5) -> Diff:
        """Items added, changed (rewritten) and removed between two published versions, per pipeline, and the
        committed rows per table in each."""
        import pyarrow.compute as pc

        a, b = (live_rows(self.items(version=v, columns=["status", "source"])) for v in (first, second))
        a_ids, b_ids = a["item_id"], b["item_id"]
        added = b.filter(pc.invert(pc.is_in(b_ids, value_set=a_ids)))
        removed = a.filter(pc.invert(pc.is_in(a_ids, value_set=b_ids)))
        both = b.filter(pc.is_in(b_ids, value_set=a_ids))
        changed = both.filter(pc.invert(pc.is_in(live_keys(both), value_set=live_keys(a))))
        out = Diff()
        for name, part in (("added", added), ("changed", changed), ("removed", removed)):
            counts = part.group_by("pipeline").aggregate([("item_id", "count")]).to_pylist()
            setattr(out, name, {r["pipeline"]: r["item_id_count"] for r in counts})
            out.examples[name] = part["source"].slice(0, examples).to_pylist()
        one, two = self.summary(first)["tables"], self.summary(second)["tables"]
        out.rows = {t: (one[t]["rows"], two[t]["rows"]) for t in TABLES}
        return out

    # -- maintenance -------------------------------------------------------------------------------------
    def compact(self, *, retention_hours: int = 168) -> dict[str, tuple[int, int]]:
        """Delete superseded and orphaned rows (each table rewritten to its committed view, `items` to the
        latest row per item), merge small files, and vacuum files no version newer than `retention_hours`
        needs. Returns physical rows per table before and after. Run it while no run writes the dataset: a
        flush committed during the rewrite would be dropped by it."""
        from deltalake import write_deltalake

        from engine.writer import writer_properties

        self.require()
        counts: dict[str, tuple[int, int]] = {}
        items = self.items()  # read once: the rewrite of every table uses the same committed view
        live = LiveView.of(items)
        for table in TABLES:
            before = self.arrow_dataset(table).count_rows()
            schema = table_schema(table)
            rows = _committed_batches(table, self.batches(table, None, schema.names, 8192), live)
            reader = _reader(schema, rows)
            write_deltalake(
                self.uri(table), reader, mode="overwrite", storage_options=self.storage_options,
                writer_properties=writer_properties(),
            )
            counts[table] = (before, self.arrow_dataset(table).count_rows())
        before = self.arrow_dataset(ITEMS).count_rows()
        write_deltalake(self.uri(ITEMS), items.select(table_schema(ITEMS).names), mode="overwrite", storage_options=self.storage_options)
        counts[ITEMS] = (before, items.num_rows)
        for table in (*TABLES, ITEMS):
            delta = self.delta(table)
            delta.optimize.compact()
            delta.vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False)
        return counts


def _committed_batches(table: str, source: Iterator[Any], live: LiveView) -> Iterator[Any]:
    """The committed rows of `table`'s batches (all columns, storage ones too); videos unique."""
    seen: set[str] = set()
    for batch in source:
        batch = batch.filter(live.mask(table, batch))
        if table == "videos" and batch.num_rows:
            batch = batch.filter(_bools([i not in seen and not seen.add(i) for i in batch["video_id"].to_pylist()]))
        if batch.num_rows:
            yield batch


def _conformed(batch: Any, schema: Any) -> Any:
    """`batch` in `schema`: columns a file lacks (written before they were added) filled in, empty lists or
    nulls; the others cast (a file written with other nullability flags)."""
    import pyarrow as pa

    arrays = []
    for field in schema:
        if field.name in batch.schema.names:
            arrays.append(batch.column(field.name).cast(field.type))
        elif pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            arrays.append(pa.array([[]] * batch.num_rows, field.type))
        else:
            arrays.append(pa.nulls(batch.num_rows, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _bools(values: list[bool]) -> Any:
    import pyarrow as pa

    return pa.array(values, type=pa.bool_())


def _reader(schema: Any, batches: Iterator[Any]) -> Any:
    import pyarrow as pa

    return pa.RecordBatchReader.from_batches(schema, batches)
