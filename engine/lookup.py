"""Videos, and the masklets a reader needs, in a temporary SQLite file: looked up one sample at a time.

Readers that stream samples (the exporters, `engine view`) name the masklets they will need with `want`, then
`fill` reads the masklets table once, keeping only those, and the videos table once; neither table is ever held
in memory, so a reader's memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Iterable, Iterator

from engine.storage import Dataset

VIDEO_COLUMNS = ("video_id", "source", "start_s", "end_s", "duration_s", "fps", "width", "height", "codec")


def _masklet_rows(batch: Any) -> Iterator[tuple[str, float | None, str, str]]:
    """(id, track_fps, expression, frames as JSON [[index, size, counts], ...]) per masklet, read column-wise:
    the nested frames never become Python dicts, the costly part of reading many masklets."""
    import pyarrow.compute as pc

    frames = batch.column("frames").combine_chunks() if hasattr(batch.column("frames"), "combine_chunks") else batch.column("frames")
    first, offsets = frames.offsets[0].as_py(), frames.offsets.to_pylist()
    offsets = [o - first for o in offsets]
    flat = frames.flatten()  # the frames of every masklet, in order (slicing applied)
    index = pc.struct_field(flat, "frame_index").to_pylist()
    counts = pc.struct_field(flat, ["rle", "counts"]).to_pylist()
    sizes = pc.list_flatten(pc.struct_field(flat, ["rle", "size"])).to_pylist()  # [h, w] per frame, flattened
    columns = zip(*(batch.column(c).to_pylist() for c in ("masklet_id", "track_fps", "expression")))
    for k, (masklet_id, fps, expression) in enumerate(columns):
        rows = [[index[j], sizes[2 * j : 2 * j + 2], counts[j]] for j in range(offsets[k], offsets[k + 1])]
        yield masklet_id, fps, expression, json.dumps(rows)


class Lookup:
    """Videos by id and wanted masklets by id, from one streamed pass over each table."""

    def __init__(self, path: str, *, video_columns: Iterable[str] = VIDEO_COLUMNS) -> None:
        self.video_columns = list(video_columns)
        self.db = sqlite3.connect(path)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE wanted (id TEXT PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TABLE masklets (id TEXT PRIMARY KEY, track_fps REAL, expression TEXT, frames TEXT);"
            "CREATE TABLE videos (id TEXT PRIMARY KEY, row TEXT);"
        )

    def want(self, masklet_ids: Iterable[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((i,) for i in masklet_ids))

    def fill(self, dataset: Dataset, version: int | None) -> None:
        """Read the wanted masklets and every video of `version` (call `want` first)."""
        # Masklet rows carry every frame's RLE: small batches, and only the wanted rows become Python objects.
        columns = ["masklet_id", "track_fps", "expression", "frames"]
        for batch in dataset.scan("masklets", columns, version=version, batch_rows=1024):
            ids = batch.column("masklet_id").to_pylist()
            wanted = self._wanted(ids)
            keep = [k for k, i in enumerate(ids) if i in wanted]
            if keep:
                self.db.executemany("INSERT OR REPLACE INTO masklets VALUES (?, ?, ?, ?)", _masklet_rows(batch.take(keep)))
        # Not deduplicated by the scan (its set of seen ids would grow with the dataset): the table's key does it.
        for batch in dataset.scan("videos", self.video_columns, version=version, unique=False):
            rows = ((v["video_id"], json.dumps(v)) for v in batch.to_pylist())
            self.db.executemany("INSERT OR REPLACE INTO videos VALUES (?, ?)", rows)
        self.db.commit()

    def _wanted(self, ids: list[str]) -> set[str]:
        found: set[str] = set()  # at most one batch of ids
        for k in range(0, len(ids), 500):  # SQLite's bound on query parameters
            chunk = ids[k : k + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.db.execute(f"SELECT id FROM wanted WHERE id IN ({marks})", chunk))
        return found

    def video(self, video_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT row FROM videos WHERE id = ?", (video_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def masklet(self, masklet_id: str) -> tuple[float | None, dict[int, dict[str, Any]]] | None:
        """(track_fps, frame index -> RLE) of a masklet."""
        row = self.db.execute("SELECT track_fps, frames FROM masklets WHERE id = ?", (masklet_id,)).fetchone()
        if row is None:
            return None
        return row[0], {i: {"size": size, "counts": counts} for i, size, counts in json.loads(row[1])}

    def expression(self, masklet_id: str) -> str | None:
        row = self.db.execute("SELECT expression FROM masklets WHERE id = ?", (masklet_id,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.db.close()
