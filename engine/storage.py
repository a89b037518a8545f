"""A dataset folder (local path or fsspec URL): Parquet shards per table, completion records, a manifest.

Layout:
    <root>/<table>/part-<key>.parquet   one shard per video (or per rejected input) and table
    <root>/_complete/<video_id>.json    written last: the video's shards are all in place
    <root>/manifest.json                 tables, row counts, complete videos (rewritten after each run)
    <root>/stats.json                    counters and timers of the last run
    <root>/README.md                     the dataset card

Every file is written under a hidden temporary name (`_tmp-...`) and renamed when complete, so a killed run
leaves no visible half shard; readers ignore names starting with `_`. A rerun writes the same shard names
(ids are deterministic), so it overwrites and never duplicates.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from engine.errors import BadInputError
from schemas import TABLES, arrow_schema, to_table
from schemas.records import Record


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


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

    def _write_shard(self, table: str, key: str, rows: Sequence[Record]) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        model = TABLES[table]
        sink = pa.BufferOutputStream()
        pq.write_table(to_table(model, list(rows)), sink, compression="zstd")
        path = _join(self.root, table, f"part-{key}.parquet")
        self._atomic_write(path, sink.getvalue().to_pybytes())
        return path

    def write_video(self, video_id: str, tables: Mapping[str, Sequence[Record]], *, completion: dict[str, Any]) -> None:
        """Write every table's shard for one video (empty ones too, so a rerun replaces all of a video's
        rows), then its completion record."""
        unknown = set(tables) - set(TABLES)
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)}")
        for table in TABLES:
            self._write_shard(table, video_id, tables.get(table, []))
        record = {"video_id": video_id, "completed_at": datetime.now(timezone.utc).isoformat(), **completion}
        self._atomic_write(_join(self.root, "_complete", f"{video_id}.json"), json.dumps(record, indent=1).encode())

    def write_rejections(self, key: str, rows: Sequence[Record]) -> None:
        """Rejections of inputs that never became a video (missing file, not a video...)."""
        self._write_shard("rejections", f"input-{key}", rows)

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

    # -- reading -----------------------------------------------------------------------------------------
    def completion(self, video_id: str) -> dict[str, Any] | None:
        path = _join(self.root, "_complete", f"{video_id}.json")
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def is_complete(self, video_id: str, config_hash: str) -> bool:
        record = self.completion(video_id)
        return record is not None and record.get("config_hash") == config_hash

    def completions(self) -> list[dict[str, Any]]:
        folder = _join(self.root, "_complete")
        if not self.fs.exists(folder):
            return []
        out = []
        for path in sorted(self.fs.ls(folder, detail=False)):
            name = path.rpartition("/")[2]
            if name.endswith(".json") and not name.startswith("_"):
                with self.fs.open(path, "rb") as f:
                    out.append(json.loads(f.read()))
        return out

    def shards(self, table: str) -> list[str]:
        if table not in TABLES:
            raise BadInputError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
        folder = _join(self.root, table)
        if not self.fs.exists(folder):
            return []
        return sorted(
            p for p in self.fs.ls(folder, detail=False) if p.endswith(".parquet") and not p.rpartition("/")[2].startswith("_")
        )

    def read_table(self, table: str, columns: Iterable[str] | None = None):
        """All visible shards of a table as one pyarrow Table with the table's explicit schema."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = arrow_schema(TABLES[table])
        parts = []
        for path in self.shards(table):
            with self.fs.open(path, "rb") as f:
                parts.append(pq.read_table(f, columns=list(columns) if columns else None, schema=schema))
        if not parts:
            empty = schema.empty_table()
            return empty.select(list(columns)) if columns else empty
        return pa.concat_tables(parts)

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def write_manifest(self, *, engine_version: str) -> dict[str, Any]:
        """Summarise what is on disk now (after any number of runs) in manifest.json."""
        import pyarrow.parquet as pq

        tables = {}
        for table in TABLES:
            shards = self.shards(table)
            rows = 0
            for path in shards:
                with self.fs.open(path, "rb") as f:
                    rows += pq.ParquetFile(f).metadata.num_rows
            tables[table] = {"shards": len(shards), "rows": rows}
        manifest = {
            "engine_version": engine_version,
            "updated_at": datetime.now(timezone.utc).isoformat(),
            "tables": tables,
            "complete_videos": {c["video_id"]: {k: v for k, v in c.items() if k != "video_id"} for c in self.completions()},
        }
        self.write_json("manifest.json", manifest)
        return manifest
