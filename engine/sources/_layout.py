"""What the MeViS and Ref-YouTube-VOS layouts share: meta_expressions.json, JPEGImages/<video>/ folders, and
releases that unpack to several splits."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import BadInputError
from engine.probe import list_frame_images, one_line

log = logging.getLogger(__name__)


def choose_split(root: Path, dataset: str, splits: list[str], usable: list[str], split: str | None, masks: str) -> str:
    """The split to read from a release root holding `splits`, of which `usable` carry their masks (`masks`
    names what the others lack). Without `split`, the only usable one; errors name the splits to choose from."""
    if split is None:
        if len(usable) == 1:
            return usable[0]
        if not usable:
            raise BadInputError(
                f"{root} is a {dataset} release whose splits ({', '.join(splits)}) have no {masks}: the release "
                "withholds the masks of its validation and test splits"
            )
        raise BadInputError(f"{root} is a {dataset} release with splits {', '.join(usable)}: give the split to read")
    if split not in splits:
        raise BadInputError(f"{root} has no {dataset} split {split!r}; its splits: {', '.join(splits)}")
    if split not in usable:
        raise BadInputError(
            f"split {split} of {root} has no {masks} (the release withholds its masks); splits with masks: "
            f"{', '.join(usable) or 'none'}"
        )
    return split


def check_split_folder(path: Path, split: str | None) -> None:
    """`path` is one split of a release: a split given must be that one."""
    if split is not None and split != path.name:
        raise BadInputError(
            f"{path} is one split folder ({path.name}), not a release root: give the root to read split "
            f"{split!r}, or give no split"
        )


def subfolders(path: Path) -> list[Path]:
    """The folders directly in `path`, by name (os.scandir: no stat per entry, even beside many frames)."""
    return sorted((Path(e.path) for e in os.scandir(path) if e.is_dir()), key=lambda p: p.name)


def load_json(path: Path) -> Any:
    if not path.is_file():
        raise BadInputError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadInputError(f"{path} is not readable JSON: {one_line(exc)}") from exc


def load_videos(path: Path) -> dict[str, Any]:
    """The `videos` mapping of a meta_expressions.json."""
    meta = load_json(path)
    videos = meta.get("videos") if isinstance(meta, dict) else None
    if not isinstance(videos, dict):
        raise BadInputError(f'{path} has no "videos" object (expected {{"videos": {{"<video>": ...}}}})')
    return videos


@dataclass(frozen=True)
class Expression:
    expression_id: str
    text: str
    object_ids: list[str]


def video_meta(path: Path, video_id: str, video: Any) -> tuple[list[str], list[Expression]]:
    """A video's entry of meta_expressions.json: its annotated frame names and its expressions. The ids an
    expression refers to are read from `anno_id` (MeViS) or else `obj_id` (a list or a single id)."""
    at = f"{path}: video {video_id}"
    frames = video.get("frames") if isinstance(video, dict) else None
    if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
        raise BadInputError(f'{at} has no "frames" list of frame names')
    expressions = video.get("expressions")
    if not isinstance(expressions, dict):
        raise BadInputError(f'{at} has no "expressions" object')
    out = []
    for eid, entry in expressions.items():
        text = entry.get("exp") if isinstance(entry, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise BadInputError(f'{at}, expression {eid} has no "exp" text')
        ids = entry.get("anno_id", entry.get("obj_id"))
        ids = ids if isinstance(ids, list) else [ids]
        if not ids or not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids):
            raise BadInputError(f"{at}, expression {eid} refers to no object id: {ids!r}")
        out.append(Expression(str(eid), " ".join(text.split()), [str(i) for i in ids]))
    return frames, out


@dataclass(frozen=True)
class FrameFolder:
    path: Path
    positions: dict[str, int]  # frame name without extension -> position in the sorted image list
    height: int
    width: int

    def position(self, at: str, frame: str) -> int:
        if frame not in self.positions:
            raise BadInputError(f"{at}: frame {frame} is not among the images of {self.path}")
        return self.positions[frame]


def frame_folder(root: Path, video_id: str) -> FrameFolder:
    """JPEGImages/<video_id>: where each frame sits in the folder's frame order (the order a decode of the
    folder yields) and the frames' size, read from the first image's header."""
    from PIL import Image

    path = root / "JPEGImages" / video_id
    names = list_frame_images(str(path)) if path.is_dir() else []
    if not names:
        raise BadInputError(f"video {video_id}: {path} is missing or holds no .jpg, .jpeg or .png frames")
    positions: dict[str, int] = {}
    for position, name in enumerate(names):
        positions.setdefault(os.path.splitext(name)[0], position)
    try:
        with Image.open(path / names[0]) as image:
            width, height = image.size
    except OSError as exc:
        raise BadInputError(f"video {video_id}: {path / names[0]} is not a readable image") from exc
    return FrameFolder(path, positions, height, width)


def referred(at: str, expressions: list[Expression], kept: set[str]) -> list[tuple[Expression, list[str]]]:
    """Each expression with the ids of its objects that have masks. One left with none is dropped, with a
    warning: an expression about an object that is never annotated gives nothing to ground."""
    out = []
    for expression in expressions:
        ids = [i for i in expression.object_ids if i in kept]
        if ids:
            out.append((expression, ids))
        else:
            log.warning("%s: expression %s dropped: its objects %s have no mask on any frame",
                        at, expression.expression_id, ", ".join(expression.object_ids))
    return out
