"""A folder of videos with per-object annotations in one JSONL file, for data no public layout fits.

Each line is one object: {"video": path relative to the JSONL's folder, "object_id", "expression"?,
"category"?, "masks": {"<frame index>": COCO RLE} or "boxes": {"<frame index>": [x1, y1, x2, y2]}}. The lines of
one video need not be adjacent; items come in the order videos first appear.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from engine.errors import BadInputError
from engine.probe import one_line
from engine.sources._layout import Problems, source_box, source_rle, video_shape
from schemas.records import SourceExpression, SourceObject, WorkItem

OBJECTS_FILE = "objects.jsonl"


def is_objects_jsonl(path: Path) -> bool:
    """A .jsonl whose first line is an object (has "object_id"), not a caption manifest's row."""
    try:
        with open(path, encoding="utf-8") as file:
            first = next((line for line in file if line.strip()), "")
        row = json.loads(first) if first else None
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and "object_id" in row


def read_objects(path: str | Path, *, frame_rate: float | None = None) -> Iterator[WorkItem]:
    """One WorkItem per video named in the JSONL (`path`, or `objects.jsonl` in the folder `path`): its objects'
    masks or boxes at their frame indexes, an expression per object that has one. A video may be a folder of
    frames, read at `frame_rate`. The file is read and each line's shape checked now; a mask or box that does not
    fit its video is a problem of its item."""
    path = Path(path)
    path = path / OBJECTS_FILE if path.is_dir() else path
    if not path.is_file():
        raise BadInputError(f"{path} not found: give a JSONL of objects, or a folder holding {OBJECTS_FILE}")
    by_video: dict[str, list[dict[str, Any]]] = {}
    try:
        with open(path, encoding="utf-8") as file:
            for n, line in enumerate(file, start=1):
                if line.strip():
                    row = _row(path, n, line)
                    by_video.setdefault(row["video"], []).append(row)
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} cannot be read: {one_line(exc)}") from exc
    return _items(path.parent, by_video, frame_rate)


def _row(path: Path, n: int, line: str) -> dict[str, Any]:
    at = f"{path}, line {n}"
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise BadInputError(f"{at} is not JSON: {one_line(exc)}") from exc
    if not isinstance(row, dict) or not isinstance(row.get("video"), str) or not row["video"]:
        raise BadInputError(f'{at} has no "video" path')
    if isinstance(row.get("object_id"), bool) or not isinstance(row.get("object_id"), (str, int)):
        raise BadInputError(f'{at} has no "object_id"')
    if os.path.isabs(row["video"]) or ".." in Path(row["video"]).parts:
        raise BadInputError(f"{at}: video {row['video']} must be a path inside {path.parent}")
    annotated = [k for k in ("masks", "boxes") if isinstance(row.get(k), dict)]
    if len(annotated) != 1:
        raise BadInputError(f'{at} needs exactly one of "masks" or "boxes", an object of frame index -> annotation')
    for key in ("expression", "category"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise BadInputError(f'{at}: "{key}" must be text')
    return row


def _items(folder: Path, by_video: dict[str, list[dict[str, Any]]], frame_rate: float | None) -> Iterator[WorkItem]:
    for video, rows in by_video.items():
        source = str(folder / video)
        shape = video_shape(source)  # None: unreadable; the runner rejects the item
        problems = Problems()
        objects, expressions = [], []
        for row in rows:
            object_id = str(row["object_id"])
            if any(o.object_id == object_id for o in objects):
                problems.add("duplicate_object", f"video {video}: object {object_id} is given twice", object_id=object_id)
                continue
            masks, boxes = {}, {}
            for key, value in (row.get("masks") or row.get("boxes")).items():
                at = f"video {video}, object {object_id}, frame {key}"
                if not key.isdigit():
                    problems.add("bad_frame", f"{at}: not a frame index", object_id=object_id)
                    continue
                if shape is not None and int(key) >= shape[0]:
                    problems.add("frame_out_of_range", f"{at}: past the video's {shape[0]} frames", object_id=object_id)
                    continue
                height, width = shape[1:] if shape is not None else (None, None)
                if "masks" in row:
                    size = value.get("size") if isinstance(value, dict) else None
                    if height is None and isinstance(size, list) and len(size) == 2:
                        height, width = size
                    rle = source_rle(value, height, width)
                    if rle is None:
                        problems.add("empty_mask", f"{at}: the mask is empty", object_id=object_id)
                    elif isinstance(rle, tuple):
                        problems.add(rle[0], f"{at}: {rle[1]}", object_id=object_id)
                    else:
                        masks[int(key)] = rle
                else:
                    box = source_box(value, height or 1 << 30, width or 1 << 30)
                    if isinstance(box, str):
                        problems.add("bad_box", f"{at}: {box}", object_id=object_id)
                    else:
                        boxes[int(key)] = box
            if not masks and not boxes:
                problems.add("no_annotation", f"video {video}: object {object_id} has no usable annotation",
                             object_id=object_id, expression=row.get("expression"))
                continue
            objects.append(SourceObject(object_id=object_id, masks=masks, boxes=boxes, category=row.get("category")))
            if (row.get("expression") or "").strip():
                expressions.append(SourceExpression(expression=" ".join(row["expression"].split()), object_ids=[object_id]))
        yield WorkItem(source=source, frame_rate=frame_rate if os.path.isdir(source) else None, dataset="objects",
                       objects=objects, expressions=expressions, problems=problems.records())
