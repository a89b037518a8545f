"""MeViS (motion expressions video segmentation): expressions that may refer to several objects, with the
objects' masks as COCO RLE.

Layout of a split: `<split>/meta_expressions.json` ({"videos": {vid: {"expressions": {eid: {"exp", "obj_id",
"anno_id"}}, "frames": [...]}}}), `<split>/mask_dict.json` ({anno_id: [RLE or null per listed frame]}) and
`<split>/JPEGImages/<vid>/<frame>.jpg`. The release unpacks to one such folder per split (`train`, `valid_u`,
`valid`; `valid` has no mask_dict.json: its masks are withheld for the benchmark server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from engine.errors import BadInputError
from engine.sources._layout import (
    check_split_folder,
    choose_split,
    load_mask_dict,
    load_videos,
    mask_dict_items,
    subfolders,
)
from schemas.records import WorkItem

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
    list, null or empty frames left out, objects with no mask dropped) and one expression per entry, referring to its
    anno_ids.

    Both JSON files are read (and their shape checked) now; videos are built one at a time as the iterator is
    consumed. A bad annotation (a mask of the wrong size, a listed frame with no image, an anno_id without
    masks) is a problem of its item, which goes on without it.
    """
    given = Path(root)
    root = mevis_split(given, split)
    if root is None:
        if (given / "meta_expressions.json").is_file():  # a split whose masks the release withholds
            raise BadInputError(f"{given / 'mask_dict.json'} not found: a MeViS split without masks cannot be read")
        raise BadInputError(f"{given} is not MeViS: it has no mask_dict.json, nor split folders that hold one")
    meta_path, mask_path = root / "meta_expressions.json", root / "mask_dict.json"
    videos = load_videos(meta_path)
    masks = load_mask_dict(mask_path)
    return mask_dict_items(root, meta_path, videos, masks, mask_path, frame_rate=frame_rate, dataset="mevis")
