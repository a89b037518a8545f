"""Caption manifests in the Panda-70M style: one row per video or clip, as JSONL, CSV or Parquet.

Keys: `video` (or `video_path`, `path`): a path, relative to the manifest's folder, or a URL; `caption`
(required, non-empty); optional `start`/`end` in seconds or `HH:MM:SS.xxx`, or a `timestamp` pair
`[start, end]` (Panda-70M's form, also as a string in a CSV cell). Other keys are ignored.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from typing import Any, Iterator

from engine.errors import BadInputError
from engine.probe import one_line
from schemas.records import WorkItem

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
VIDEO_KEYS = ("video", "video_path", "path")
_READ_COLUMNS = (*VIDEO_KEYS, "caption", "start", "end", "timestamp")
_NUMBER = re.compile(r"\d+(\.\d*)?")

Row = tuple[str, dict[str, Any]]  # ("row 3" / "line 3", the row's values)


def read_manifest(path: str, *, frame_rate: float | None = None) -> Iterator[WorkItem]:
    """The manifest's rows as WorkItems, read lazily (a Parquet file batch by batch). The file is checked now
    (it exists; a CSV's header and a Parquet file's schema name a video and a caption column); a bad row
    raises a BadInputError naming the file and its row (CSV, Parquet: data row from 1) or line (JSONL) when it
    is reached. `frame_rate` is given to every item (used where a video is a frame folder)."""
    import fsspec

    suffix = os.path.splitext(path)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise BadInputError(f"{path}: a manifest must end in {', '.join(MANIFEST_SUFFIXES)}")
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.isfile(fs_path):
        raise BadInputError(f"manifest not found: {path}")
    rows = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}[suffix](path)
    # Relative videos are resolved against the manifest's folder, not the working directory.
    base = path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(os.path.abspath(path))
    return (_item(f"{path} {where}", row, base, frame_rate) for where, row in rows)


def _jsonl_rows(path: str) -> Iterator[Row]:
    import fsspec

    with fsspec.open(path, "rt", encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise BadInputError(f"{path} line {number} is not valid JSON: {one_line(exc)}") from exc
            if not isinstance(row, dict):
                raise BadInputError(f"{path} line {number} is not a JSON object")
            yield f"line {number}", row


def _csv_rows(path: str) -> Iterator[Row]:
    import csv

    import fsspec

    # utf-8-sig: Excel's byte-order mark. The header is checked now; the rows are read when iterated.
    with fsspec.open(path, "rt", encoding="utf-8-sig", newline="") as file:
        try:
            header = next(csv.reader(file), None)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise BadInputError(f"{path} is not a readable CSV file: {one_line(exc)}") from exc
    _check_columns(path, header or [])

    def rows() -> Iterator[Row]:
        with fsspec.open(path, "rt", encoding="utf-8-sig", newline="") as file:
            for number, row in enumerate(csv.DictReader(file), 1):
                yield f"row {number}", row

    return rows()


def _parquet_rows(path: str) -> Iterator[Row]:
    import fsspec
    import pyarrow.parquet as pq

    # A path and the filesystem, not an open Python file: pyarrow 23 can abort at interpreter exit otherwise.
    fs, local = fsspec.core.url_to_fs(path)
    try:
        parquet = pq.ParquetFile(local, filesystem=fs)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends, not one base class
        raise BadInputError(f"{path} is not a readable Parquet file: {one_line(exc)}") from exc
    _check_columns(path, parquet.schema_arrow.names)
    # Only the columns used are read: manifests often carry wide extra columns (embeddings, scores).
    columns = [name for name in parquet.schema_arrow.names if name in _READ_COLUMNS]

    def rows() -> Iterator[Row]:
        number = 0
        for batch in parquet.iter_batches(batch_size=4096, columns=columns):
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row

    return rows()


def _check_columns(path: str, names: list[str]) -> None:
    """A table manifest names a video column and a caption column (a JSONL row is checked on its own)."""
    if not any(k in names for k in VIDEO_KEYS) or "caption" not in names:
        columns = ", ".join(names) or "none"
        raise BadInputError(f"{path} needs a video (or video_path, path) and a caption column; its columns: {columns}")


def _item(at: str, row: dict[str, Any], base: str, frame_rate: float | None) -> WorkItem:
    video = next((row[k] for k in VIDEO_KEYS if _present(row.get(k))), None)
    if not isinstance(video, str):
        keys = ", ".join(str(k) for k in row) or "none"
        raise BadInputError(f"{at} has no video path (give video, video_path or path; its keys: {keys})")
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise BadInputError(f"{at} has no caption (a non-empty caption is required)")
    start, end = _window(at, row)
    video = video.strip()
    if "://" not in video and not os.path.isabs(video):
        video = f"{base}/{video}" if "://" in base else os.path.normpath(os.path.join(base, video))
    return WorkItem(
        source=video,
        start_s=start,
        end_s=end,
        caption=caption.strip(),
        frame_rate=frame_rate,
        dataset="manifest",
    )


def _window(at: str, row: dict[str, Any]) -> tuple[float | None, float | None]:
    start, end = _seconds(at, "start", row.get("start")), _seconds(at, "end", row.get("end"))
    stamp = row.get("timestamp")
    if _present(stamp):
        if start is not None or end is not None:
            raise BadInputError(f"{at} gives both start/end and timestamp: keep one")
        pair = _pair(at, stamp)
        start, end = _seconds(at, "timestamp start", pair[0]), _seconds(at, "timestamp end", pair[1])
    if end is not None and end <= (start or 0.0):
        raise BadInputError(f"{at}: end ({end:g} s) must be after start ({start or 0.0:g} s)")
    return start, end


def _pair(at: str, stamp: Any) -> list[Any]:
    """[start, end] from a list, or from its text ("['0:00:01.000', '0:00:05.000']" in a CSV cell); one nested
    pair ([[start, end]], a Panda-70M row with one clip) is accepted too."""
    value = stamp
    if isinstance(stamp, str):
        try:
            value = ast.literal_eval(stamp.strip())  # literals only: never evaluates code
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise BadInputError(f"{at}: timestamp {stamp!r} is not a [start, end] pair")
    return list(value)


def _seconds(at: str, name: str, value: Any) -> float | None:
    """Seconds from a number, a numeric string or `[[HH:]MM:]SS[.xxx]`; None when absent."""
    if not _present(value):
        return None
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        parts = value.strip().split(":")
        # Only the last field may have a fraction; minutes and seconds under a larger field stay below 60.
        if (
            len(parts) <= 3
            and all(re.fullmatch(r"\d+", p) for p in parts[:-1])
            and _NUMBER.fullmatch(parts[-1])
            and all(float(p) < 60 for p in parts[1:])
        ):
            seconds = sum(float(p) * 60**k for k, p in enumerate(reversed(parts)))
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise BadInputError(f"{at}: {name} {value!r} is not a time (seconds, or HH:MM:SS.xxx)")
    return seconds


def _present(value: Any) -> bool:
    """False for what manifests use as an empty cell: None, blank text, NaN (pandas' missing float)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())
