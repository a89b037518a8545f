"""A2D-Sentences (actor and action referring segmentation), read as ReferFormer's and MTTR's loaders read it.

Layout: `<root>/Release/clips320H/<vid>.mp4`, `<root>/Release/videoset.csv` (no header: video id first, the
split last: 0 train, 1 test), `<root>/text_annotations/a2d_annotation.txt` (CSV: video_id, instance_id, query)
and `<root>/text_annotations/a2d_annotation_with_instances/<vid>/<frame:05d>.h5` (HDF5: `instance`, the ids,
and `reMask`, one mask per id (or one mask for a single id), stored transposed: width x height). Frame numbers
in the .h5 names count from 1.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

from engine import masks as rle_masks
from engine.errors import BadInputError
from engine.probe import one_line
from engine.sources._layout import Expression, Problems, choose_split, referred, video_shape
from schemas.records import Rle, SourceObject, WorkItem

SPLITS = {"train": "0", "test": "1"}
TEXT = Path("text_annotations") / "a2d_annotation.txt"
MASKS = Path("text_annotations") / "a2d_annotation_with_instances"
VIDEOSET = Path("Release") / "videoset.csv"


def is_a2d_sentences(path: Path) -> bool:
    return (path / VIDEOSET).is_file() and (path / TEXT).is_file()


def read_a2d_sentences(root: str | Path, *, split: str | None = None) -> Iterator[WorkItem]:
    """One WorkItem per video of a split with a query: its clip, one object per instance id of its .h5 masks
    (masks at frame number - 1) and one expression per query. The two CSVs are read now; a video's .h5 files
    when its item is reached, a bad mask or a query about an instance with no mask being a problem of it."""
    root = Path(root)
    if not is_a2d_sentences(root):
        raise BadInputError(f"{root} is not A2D-Sentences: it needs {VIDEOSET} and {TEXT}")
    chosen = choose_split(root, "A2D-Sentences", list(SPLITS), list(SPLITS), split, "masks")
    try:
        with open(root / VIDEOSET, newline="", encoding="utf-8") as file:
            videos = [row[0] for row in csv.reader(file) if row and row[-1].strip() == SPLITS[chosen]]
        with open(root / TEXT, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
    except (OSError, ValueError, csv.Error) as exc:
        raise BadInputError(f"{root}: the A2D-Sentences CSVs cannot be read: {one_line(exc)}") from exc
    if rows and not {"video_id", "instance_id", "query"} <= set(rows[0]):
        raise BadInputError(f"{root / TEXT} needs the columns video_id, instance_id, query")
    queries: dict[str, list[Expression]] = defaultdict(list)
    for n, row in enumerate(rows):
        if (row.get("query") or "").strip():
            ids = [str(row["instance_id"]).strip()]
            queries[row["video_id"]].append(Expression(str(n), " ".join(row["query"].split()), ids))
    return _items(root, [v for v in videos if v in queries], queries)


def _items(root: Path, videos: list[str], queries: dict[str, list[Expression]]) -> Iterator[WorkItem]:
    for video_id in videos:
        video = root / "Release" / "clips320H" / f"{video_id}.mp4"
        shape = video_shape(str(video))
        problems = Problems()
        found: dict[str, dict[int, Rle]] = {}
        for path in sorted((root / MASKS / video_id).glob("*.h5")):
            _read_h5(path, video_id, shape, found, problems)
        objects = [SourceObject(object_id=i, masks=m) for i, m in sorted(found.items())]
        kept = referred(queries[video_id], set(found), set(found), problems)
        yield WorkItem(source=str(video), dataset="a2d-sentences", objects=objects, expressions=kept,
                       problems=problems.records())


def _read_h5(
    path: Path, video_id: str, shape: tuple[int, int, int] | None, found: dict[str, dict[int, Rle]], problems: Problems
) -> None:
    import h5py

    at = f"video {video_id}, {path.name}"
    if not path.stem.isdigit() or int(path.stem) < 1:
        problems.add("bad_mask", f"{at}: not a 1-based frame number")
        return
    position = int(path.stem) - 1
    try:
        with h5py.File(path, "r") as file:
            ids = np.atleast_1d(np.asarray(file["instance"])).tolist()
            stack = np.asarray(file["reMask"])
    except (OSError, KeyError) as exc:
        problems.add("bad_mask", f"{at}: not an HDF5 file with instance and reMask: {one_line(exc)}")
        return
    stack = stack[None] if stack.ndim == 2 else stack
    if stack.ndim != 3 or len(stack) != len(ids):
        problems.add("bad_mask", f"{at}: {len(ids)} instance ids but reMask of shape {list(stack.shape)}")
        return
    for value, mask in zip(ids, stack):
        object_id = str(int(value))
        if shape is not None:
            count, height, width = shape
            if position >= count:
                problems.add("frame_out_of_range", f"{at}: frame {position + 1} is past the clip's {count} frames",
                             object_id=object_id)
                continue
            if mask.shape == (width, height):  # stored transposed, as the release does
                mask = mask.T
            elif mask.shape != (height, width):
                problems.add("mask_size_mismatch", f"{at}: mask of {list(mask.shape)} fits neither the clip's "
                             f"{height}x{width} nor its transpose", object_id=object_id)
                continue
        else:
            mask = mask.T
        if not mask.any():
            problems.add("empty_mask", f"{at}: instance {object_id} has an empty mask", object_id=object_id)
            continue
        found.setdefault(object_id, {})[position] = rle_masks.encode(mask > 0)
