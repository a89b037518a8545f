"""Ref-YouTube-VOS: one referring expression per object, object masks as palette PNGs.

Layout: `<root>/meta_expressions.json` ({"videos": {vid: {"expressions": {eid: {"exp", "obj_id"}},
"frames": [...]}}}), `<root>/Annotations/<vid>/<frame>.png` (pixel value = object id, 0 = background) and
`<root>/JPEGImages/<vid>/<frame>.jpg`. Frames are every 5th of a 30 fps original, hence 6 fps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engine import masks as rle_masks
from engine.errors import BadInputError
from engine.sources._layout import FrameFolder, frame_folder, load_videos, referred, video_meta
from schemas.records import Rle, SourceExpression, SourceObject, WorkItem

REF_YOUTUBE_VOS_FPS = 6.0


def read_ref_youtube_vos(root: str | Path, *, frame_rate: float = REF_YOUTUBE_VOS_FPS) -> Iterator[WorkItem]:
    """One WorkItem per video: its JPEG folder, one object per id found in its PNGs (masks keyed by the frame's
    position in the sorted JPEG list) and one expression per entry, referring to its obj_id.

    meta_expressions.json is read now; a video's PNGs are read when its item is reached, and errors name the
    file and video at fault.
    """
    root = Path(root)
    meta_path = root / "meta_expressions.json"
    videos = load_videos(meta_path)
    if not (root / "Annotations").is_dir():
        raise BadInputError(f"{root} has no Annotations/ folder of palette PNG masks")
    return _items(root, meta_path, videos, frame_rate)


def _items(root: Path, meta_path: Path, videos: dict[str, Any], frame_rate: float) -> Iterator[WorkItem]:
    for video_id, video in videos.items():
        frames, expressions = video_meta(meta_path, video_id, video)
        folder = frame_folder(root, video_id)
        masks = _object_masks(root / "Annotations" / video_id, video_id, frames, folder)
        objects = [SourceObject(object_id=i, masks=masks[i]) for i in sorted(masks, key=int)]
        kept = referred(f"{meta_path}: video {video_id}", expressions, set(masks))
        yield WorkItem(
            source=str(folder.path),
            frame_rate=frame_rate,
            dataset="ref-youtube-vos",
            objects=objects,
            expressions=[SourceExpression(expression=e.text, object_ids=ids) for e, ids in kept],
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
