"""Ref-YouTube-VOS: one referring expression per object, object masks as palette PNGs.

The release unpacks to `meta_expressions/<split>/meta_expressions.json` ({"videos": {vid: {"expressions":
{eid: {"exp", "obj_id"}}, "frames": [...]}}}) beside `<split>/JPEGImages/<vid>/<frame>.jpg` and, for `train`
only, `<split>/Annotations/<vid>/<frame>.png` (pixel value = object id, 0 = background) and `<split>/meta.json`.
A copy with meta_expressions.json beside Annotations/ and JPEGImages/ reads too. Frames are every 5th of a
30 fps original, hence 6 fps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engine import masks as rle_masks
from engine.errors import BadInputError
from engine.sources._layout import (
    FrameFolder,
    Problems,
    check_split_folder,
    choose_split,
    frame_folder,
    load_videos,
    referred,
    subfolders,
    video_meta,
)
from schemas.records import Rle, SourceObject, WorkItem

REF_YOUTUBE_VOS_FPS = 6.0


def ref_youtube_vos_split(path: Path, split: str | None = None) -> tuple[Path, Path] | None:
    """(meta_expressions.json, split folder) to read when `path` is Ref-YouTube-VOS: the release root, one split
    folder of it, or a copy with meta_expressions.json inside the split folder; None when it is none of them."""
    if (path / "meta_expressions.json").is_file() and (path / "Annotations").is_dir():
        check_split_folder(path, split)
        return path / "meta_expressions.json", path
    metas = path / "meta_expressions"
    if metas.is_dir():
        splits = [
            p.name
            for p in subfolders(metas)
            if (p / "meta_expressions.json").is_file() and (path / p.name / "JPEGImages").is_dir()
        ]
        if splits:
            usable = [name for name in splits if (path / name / "Annotations").is_dir()]
            chosen = choose_split(path, "Ref-YouTube-VOS", splits, usable, split, "Annotations/")
            return metas / chosen / "meta_expressions.json", path / chosen
    folder = path.absolute()
    beside = folder.parent / "meta_expressions" / folder.name / "meta_expressions.json"
    if (path / "JPEGImages").is_dir() and beside.is_file():
        check_split_folder(folder, split)
        if not (path / "Annotations").is_dir():
            raise BadInputError(f"{path} has no Annotations/: the release withholds the masks of this split")
        return beside, path
    return None


def read_ref_youtube_vos(
    root: str | Path, *, split: str | None = None, frame_rate: float = REF_YOUTUBE_VOS_FPS
) -> Iterator[WorkItem]:
    """One WorkItem per video of `root` (the release root and a `split`, or one split folder): its JPEG folder,
    one object per id found in its PNGs (masks keyed by the frame's position in the sorted JPEG list) and one
    expression per entry, referring to its obj_id.

    meta_expressions.json is read now; a video's PNGs are read when its item is reached, and errors name the
    file and video at fault.
    """
    given = Path(root)
    found = ref_youtube_vos_split(given, split)
    if found is None:
        raise BadInputError(
            f"{given} is not Ref-YouTube-VOS: give the release root (meta_expressions/, train/) or its train/ folder"
        )
    meta_path, folder = found
    return _items(folder, meta_path, load_videos(meta_path), frame_rate)


def _items(root: Path, meta_path: Path, videos: dict[str, Any], frame_rate: float) -> Iterator[WorkItem]:
    for video_id, video in videos.items():
        frames, expressions = video_meta(meta_path, video_id, video)
        folder = frame_folder(root, video_id)
        masks = _object_masks(root / "Annotations" / video_id, video_id, frames, folder)
        objects = [SourceObject(object_id=i, masks=masks[i]) for i in sorted(masks, key=int)]
        problems = Problems()
        kept = referred(expressions, set(masks), set(masks), problems)
        yield WorkItem(
            source=str(folder.path),
            frame_rate=frame_rate,
            dataset="ref-youtube-vos",
            objects=objects,
            expressions=kept,
            problems=problems.records(),
        )


def _object_masks(
    folder: Path, video_id: str, frames: list[str], images: FrameFolder
) -> dict[str, dict[int, Rle]]:
    """object id -> {frame position: RLE} from the video's annotation PNGs."""
    from PIL import Image

    out: dict[str, dict[int, Rle]] = {}
    for frame in frames:
        path = folder / f"{frame}.png"
        position = images.position(f"video {video_id}", frame)
        try:
            with Image.open(path) as image:
                mode = image.mode
                # A palette ("P") image gives its indexes, which are the object ids; "L" stores them as is.
                labels = np.array(image) if mode in ("P", "L") else None
        except OSError as exc:
            raise BadInputError(f"video {video_id}: mask {path} is missing or unreadable") from exc
        if labels is None:
            raise BadInputError(f"video {video_id}: mask {path} is a {mode} image, not a palette PNG of ids")
        if labels.shape != (images.height, images.width):
            raise BadInputError(
                f"video {video_id}: mask {path} is {labels.shape[1]}x{labels.shape[0]}, "
                f"the frames are {images.width}x{images.height}"
            )
        for value in np.unique(labels):
            if value:
                out.setdefault(str(int(value)), {})[position] = rle_masks.encode(labels == value)
    return out
