"""The engine's own output as a source: the masklets that kept samples name, back as objects of their video. Every
pipeline's kept samples count, unless the reading pipeline declares which (`EngineSamples`: UFVideo reads the object
QA, as it built from VideoRefer-700K's).

A dataset folder written by the engine (its `items` table marks it). Rows are streamed: a first pass over
`samples` collects the masklet ids to read, a second over `masklets` puts those masklets into a temporary SQLite
file by video, and a pass over `videos` yields one item per video from it, so memory stays flat.
"""

from __future__ import annotations

import json
import math
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from engine.probe import FRAME_FOLDER_CODEC
from engine.sources._layout import Problems
from engine.storage import Dataset
from schemas.records import Rle, SourceExpression, SourceObject, WorkItem

_VIDEO_COLUMNS = ["video_id", "source", "start_s", "end_s", "fps", "num_frames", "width", "height", "codec"]


@dataclass(frozen=True)
class EngineSamples:
    """Which kept samples of a dataset the engine wrote name the masklets read back: those of `pipeline` and of
    `data_types` (None: any). A pipeline's spec declares it; the default reads every pipeline's."""

    pipeline: str | None = None
    data_types: tuple[str, ...] | None = None


def is_engine_dataset(path: Path) -> bool:
    return (path / "items" / "_delta_log").is_dir()


def read_engine_dataset(
    path: str | Path, *, samples: EngineSamples | None = None, version: int | None = None
) -> Iterator[WorkItem]:
    """One WorkItem per video (its source and window, from its `videos` row) whose kept samples (of the pipeline
    and data types `samples` names; default: every pipeline's) name masklets: one object per masklet (object_id =
    masklet_id, masks at frame_index less the window's first frame, at the video's size) and one expression per
    masklet. A mask outside the window is a problem of its item."""
    samples = samples or EngineSamples()
    dataset = Dataset(str(path))
    # default: the latest published version
    return _items(dataset, samples.pipeline, samples.data_types, dataset.reading(version))


def _items(
    dataset: Dataset, pipeline: str | None, data_types: tuple[str, ...] | None, version: int | None
) -> Iterator[WorkItem]:
    import pyarrow.compute as pc

    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(str(Path(tmp) / "index.sqlite"))
        db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE wanted (id TEXT PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TABLE masklets (video_id TEXT, id TEXT, expression TEXT, frames TEXT, PRIMARY KEY (video_id, id));"
        )
        columns = ["masklet_ids", "kept", "pipeline", "data_type"]
        for batch in dataset.scan("samples", columns, version=version):
            keep = batch.column("kept")
            if pipeline is not None:
                keep = pc.and_(keep, pc.equal(batch.column("pipeline"), pipeline))
            if data_types is not None:
                keep = pc.and_(keep, pc.is_in(batch.column("data_type"), value_set=_strings(data_types)))
            ids = pc.list_flatten(batch.column("masklet_ids").filter(keep)).to_pylist()
            db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((i,) for i in ids))
        for batch in dataset.scan("masklets", ["masklet_id", "video_id", "expression", "frames"], version=version,
                                  batch_rows=1024):
            wanted = _wanted(db, batch.column("masklet_id").to_pylist())
            if not wanted:
                continue
            # Only the wanted rows become Python objects: masklet rows carry every frame's RLE.
            rows = batch.filter(pc.is_in(batch.column("masklet_id"), value_set=_strings(tuple(wanted)))).to_pylist()
            db.executemany("INSERT OR REPLACE INTO masklets VALUES (?, ?, ?, ?)", (
                (r["video_id"], r["masklet_id"], r["expression"],
                 json.dumps([[f["frame_index"], f["rle"]["size"], f["rle"]["counts"]] for f in r["frames"]]))
                for r in rows))
        db.commit()
        for batch in dataset.scan("videos", _VIDEO_COLUMNS, version=version):
            for video in batch.to_pylist():
                rows = db.execute("SELECT id, expression, frames FROM masklets WHERE video_id = ? ORDER BY id",
                                  (video["video_id"],)).fetchall()
                if rows:
                    yield _item(video, rows)
        db.close()


def _item(video: dict[str, Any], rows: list[tuple[str, str, str]]) -> WorkItem:
    from engine.export_media import resize_rle

    fps, start = video["fps"], video["start_s"]
    first = math.ceil(start * fps - 1e-6) if start else 0  # the decoder's first frame at or after start_s
    problems = Problems()
    objects, expressions = [], []
    for masklet_id, expression, frames in rows:
        masks = {}
        for index, size, counts in json.loads(frames):
            position = index - first
            if not 0 <= position < video["num_frames"]:
                problems.add("frame_out_of_range", f"video {video['video_id']}, masklet {masklet_id}: frame {index} "
                             f"lies outside the item's {video['num_frames']} frames from {first}", object_id=masklet_id)
                continue
            rle = resize_rle({"size": size, "counts": counts}, video["height"], video["width"])
            masks[position] = Rle(**rle)
        if masks:
            objects.append(SourceObject(object_id=masklet_id, masks=masks))
            if expression.strip():
                expressions.append(SourceExpression(expression=expression, object_ids=[masklet_id]))
    # A folder of frames is read at the rate the build read it (a video file knows its own).
    frame_rate = fps if video["codec"] == FRAME_FOLDER_CODEC else None
    return WorkItem(source=video["source"], start_s=start, end_s=video["end_s"], frame_rate=frame_rate, dataset="engine",
                    objects=objects, expressions=expressions, problems=problems.records())


def _wanted(db: sqlite3.Connection, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for k in range(0, len(ids), 500):  # SQLite's bound on query parameters
        chunk = ids[k : k + 500]
        found.update(r[0] for r in db.execute(f"SELECT id FROM wanted WHERE id IN ({','.join('?' * len(chunk))})", chunk))
    return found


def _strings(values: tuple[str, ...]) -> Any:
    import pyarrow as pa

    return pa.array(list(values), pa.string())
