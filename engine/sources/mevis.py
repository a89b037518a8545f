"""MeViS (motion expressions video segmentation): expressions that may refer to several objects, with the
objects' masks as COCO RLE.

Layout of a split: `<split>/meta_expressions.json` ({"videos": {vid: {"expressions": {eid: {"exp", "obj_id",
"anno_id"}}, "frames": [...]}}}), `<split>/mask_dict.json` ({anno_id: [RLE or null per listed frame]}) and
`<split>/JPEGImages/<vid>/<frame>.jpg`. The release unpacks to one such folder per split (`train`, `valid_u`,
`valid`; `valid` has no mask_dict.json: its masks are withheld for the benchmark server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from engine.errors import BadInputError
from engine.sources._layout import (
    check_split_folder,
    choose_split,
    frame_folder,
    load_json,
    load_videos,
    referred,
    subfolders,
    video_meta,
)
from schemas.records import Rle, SourceExpression, SourceObject, WorkItem

MEVIS_FPS = 6.0  # MeViS frames are sampled at 6 fps


def mevis_split(path: Path, split: str | None = None) -> Path | None:
    """The split folder to read when `path` is MeViS: a split folder itself (it holds mask_dict.json) or the
    release root (folders of meta_expressions.json and JPEGImages/); None when `path` is neither."""
    if (path / "mask_dict.json").is_file():
        check_split_folder(path, split)
        return path
    splits = {
        p.name: p for p in subfolders(path) if (p / "meta_expressions.json").is_file() and (p / "JPEGImages").is_dir()
    }
    if not splits:
        return None
    usable = [name for name, p in splits.items() if (p / "mask_dict.json").is_file()]
    return splits[choose_split(path, "MeViS", list(splits), usable, split, "mask_dict.json")]


def read_mevis(root: str | Path, *, split: str | None = None, frame_rate: float = MEVIS_FPS) -> Iterator[WorkItem]:
    """One WorkItem per video of `root` (a split folder, or the release root and a `split`): its JPEG folder,
    one object per anno_id (object_id = the anno_id; masks keyed by the frame's position in the sorted JPEG
    list, null frames left out, objects with no mask dropped) and one expression per entry, referring to its
    anno_ids.

    Both JSON files are read (and their shape checked) now; videos are built one at a time as the iterator is
    consumed, each raising a BadInputError naming the file, video and anno_id at fault.
    """
    given = Path(root)
    root = mevis_split(given, split)
    if root is None:
        if (given / "meta_expressions.json").is_file():  # a split whose masks the release withholds
            raise BadInputError(f"{given / 'mask_dict.json'} not found: a MeViS split without masks cannot be read")
        raise BadInputError(f"{given} is not MeViS: it has no mask_dict.json, nor split folders that hold one")
    videos = load_videos(root / "meta_expressions.json")
    mask_path = root / "mask_dict.json"
    masks = load_json(mask_path)
    if not isinstance(masks, dict):
        raise BadInputError(f"{mask_path} must be an object of anno_id -> list of per-frame RLE")
    return _items(root, videos, masks, mask_path, frame_rate)


def _items(
    root: Path, videos: dict[str, Any], masks: dict[str, Any], mask_path: Path, frame_rate: float
) -> Iterator[WorkItem]:
    meta_path = root / "meta_expressions.json"
    for video_id, video in videos.items():
        frames, expressions = video_meta(meta_path, video_id, video)
        folder = frame_folder(root, video_id)
        positions = [folder.position(f"{meta_path}: video {video_id}", frame) for frame in frames]
        at = f"{mask_path}: video {video_id}"
        objects = []
        for anno_id in dict.fromkeys(i for e in expressions for i in e.object_ids):
            per_frame = masks.get(anno_id)
            if not isinstance(per_frame, list) or len(per_frame) != len(frames):
                got = f"{len(per_frame)} entries" if isinstance(per_frame, list) else "none"
                raise BadInputError(
                    f"{at}, anno_id {anno_id}: expected a list of {len(frames)} per-frame masks, got {got}"
                )
            rles = {
                position: _rle(f"{at}, anno_id {anno_id}, frame {frame}", entry, folder.height, folder.width)
                for position, frame, entry in zip(positions, frames, per_frame)
                if entry is not None
            }
            if rles:
                objects.append(SourceObject(object_id=anno_id, masks=rles))
        kept = referred(at, expressions, {o.object_id for o in objects})
        yield WorkItem(
            source=str(folder.path),
            frame_rate=frame_rate,
            dataset="mevis",
            objects=objects,
            expressions=[SourceExpression(expression=e.text, object_ids=ids) for e, ids in kept],
        )


def _rle(at: str, entry: Any, height: int, width: int) -> Rle:
    """A COCO RLE of the frames' size; uncompressed (list of ints) counts are compressed."""
    size = entry.get("size") if isinstance(entry, dict) else None
    counts = entry.get("counts") if isinstance(entry, dict) else None
    if size != [height, width]:
        raise BadInputError(f"{at}: mask size {size} does not match the frames' [{height}, {width}]")
    if isinstance(counts, list) and all(isinstance(c, int) for c in counts):
        from pycocotools import mask as mask_utils

        if sum(counts) != height * width:
            raise BadInputError(f"{at}: uncompressed RLE counts sum to {sum(counts)}, not {height * width}")
        compressed = mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
        counts = compressed["counts"].decode("ascii")
    if not isinstance(counts, str) or not counts:
        raise BadInputError(f"{at}: RLE counts must be a COCO string or a list of run lengths")
    return Rle(size=[height, width], counts=counts)
