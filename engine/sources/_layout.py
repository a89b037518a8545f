"""What the dataset layouts share: meta_expressions.json, JPEGImages/<video>/ folders, releases that unpack to
several splits, mask_dict.json (MeViS, ReVOS), and the checks that turn a bad annotation into a SourceProblem."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from engine.errors import BadInputError
from engine.probe import list_frame_images, one_line
from schemas.records import Rle, SourceExpression, SourceObject, SourceProblem, WorkItem

ANNOTATED_STEP = 4  # SA-V annotates, and SAMA samples VidSTG at, every 4th frame


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


def referred(expressions: list[Expression], kept: set[str], known: set[str], problems: "Problems") -> list[SourceExpression]:
    """Each expression with the ids of its objects that have annotations. An id no object has (not in `known`)
    is an `unknown_object` problem, one known but left with no annotation a `no_annotation` problem; an
    expression left with no object is left out."""
    out = []
    for expression in expressions:
        for i in expression.object_ids:
            if i not in kept:
                reason = "no_annotation" if i in known else "unknown_object"
                why = "has no usable annotation" if i in known else "is not among the annotated objects"
                problems.add(reason, f"expression {expression.expression_id}: object {i} {why}",
                             object_id=i, expression=expression.text)
        ids = [i for i in expression.object_ids if i in kept]
        if ids:
            out.append(SourceExpression(expression=expression.text, object_ids=ids))
    return out


class Problems:
    """The SourceProblems of one item, one per (reason, object, expression): a systematic fault (every frame of
    an object at the wrong size) is one row that counts its frames, not one row per frame."""

    def __init__(self) -> None:
        self._details: dict[tuple[str, str | None, str | None], list[str]] = {}

    def add(self, reason: str, detail: str, *, object_id: str | None = None, expression: str | None = None) -> None:
        self._details.setdefault((reason, object_id, expression), []).append(detail)

    def records(self) -> list[SourceProblem]:
        out = []
        for (reason, object_id, expression), details in self._details.items():
            detail = "; ".join(details[:3]) + (f" (and {len(details) - 3} more)" if len(details) > 3 else "")
            out.append(SourceProblem(reason=reason, detail=detail, object_id=object_id, expression=expression))
        return out


def source_rle(entry: Any, height: int, width: int) -> Rle | tuple[str, str] | None:
    """A COCO RLE of the frames' size (uncompressed run lengths are compressed), None for an empty mask, or
    (reason, detail) when it cannot be used: `mask_size_mismatch` or `bad_mask`."""
    from pycocotools import mask as mask_utils

    size = entry.get("size") if isinstance(entry, dict) else None
    counts = entry.get("counts") if isinstance(entry, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        return "bad_mask", f"not a COCO RLE with a [height, width] size: {str(entry)[:60]}"
    if size != [height, width]:
        return "mask_size_mismatch", f"mask size {size} does not match the frames' [{height}, {width}]"
    if isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts):
        if sum(counts) != height * width:
            return "bad_mask", f"uncompressed RLE counts sum to {sum(counts)}, not {height * width}"
        counts = mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)["counts"].decode("ascii")
    if not isinstance(counts, str) or not counts:
        return "bad_mask", "RLE counts must be a COCO string or a list of run lengths"
    if not mask_utils.area({"size": size, "counts": counts.encode("ascii")}):
        return None
    return Rle(size=[height, width], counts=counts)


def source_box(box: Any, height: int, width: int) -> list[float] | str:
    """An xyxy box clipped to the frame, or why it cannot be used (reason `bad_box`): not four finite numbers,
    empty (x2 <= x1 or y2 <= y1), or wholly outside the frame."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        return f"box {str(box)[:60]} is not four finite numbers x1, y1, x2, y2"
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        return f"box {[x1, y1, x2, y2]} is empty (x2 <= x1 or y2 <= y1)"
    clipped = [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return f"box {[x1, y1, x2, y2]} lies outside the {width}x{height} frame"
    return clipped


def video_shape(path: str) -> tuple[int, int, int] | None:
    """(frames, height, width) of a video file from its header, or of a folder of frames; None when it cannot be
    opened (the runner rejects such an item with its reason when it reaches it)."""
    from engine.decode import DecodeLimits
    from engine.errors import VideoError
    from engine.probe import probe_video

    try:  # a folder's frame rate does not change its frames or their size
        info = probe_video(path, limits=DecodeLimits(), frame_rate=1.0 if os.path.isdir(path) else None)
    except (BadInputError, VideoError, OSError):
        return None
    return info.num_frames, info.height, info.width


def mask_dict_items(
    root: Path, meta_path: Path, videos: dict[str, Any], masks: dict[str, Any], mask_path: Path, *,
    frame_rate: float, dataset: str,
) -> Iterator[WorkItem]:
    """The items of a mask_dict.json layout (MeViS, ReVOS): per video of `videos` (meta_expressions), its
    JPEGImages/<video> folder, one object per anno_id its expressions name (masks keyed by the frame's
    position in the folder, null or empty frames left out) and its expressions. A bad annotation is a
    problem of the item: a listed frame missing from the folder, an anno_id missing from mask_dict.json or
    with a list of the wrong length, a mask of the wrong size, an expression whose objects have no mask."""
    for video_id, video in videos.items():
        frames, expressions = video_meta(meta_path, video_id, video)
        folder = frame_folder(root, video_id)
        problems = Problems()
        positions = []
        for frame in frames:
            positions.append(folder.positions.get(frame))
            if positions[-1] is None:
                problems.add("missing_frame", f"video {video_id}: frame {frame} is not among the images of {folder.path}")
        objects = []
        known = set()
        for anno_id in dict.fromkeys(i for e in expressions for i in e.object_ids):
            per_frame = masks.get(anno_id)
            if per_frame is None:
                continue  # unknown_object, said by `referred`
            known.add(anno_id)
            rles = per_frame_rles(f"{mask_path}: video {video_id}, anno_id {anno_id}", anno_id, per_frame, frames,
                                  positions, folder, problems)
            if rles:
                objects.append(SourceObject(object_id=anno_id, masks=rles))
        kept = referred(expressions, {o.object_id for o in objects}, known, problems)
        yield WorkItem(
            source=str(folder.path), frame_rate=frame_rate, dataset=dataset, objects=objects, expressions=kept,
            problems=problems.records(),
        )


def load_mask_dict(path: Path) -> dict[str, Any]:
    masks = load_json(path)
    if not isinstance(masks, dict):
        raise BadInputError(f"{path} must be an object of anno_id -> list of per-frame RLE")
    return masks


def per_frame_rles(at: str, object_id: str, per_frame: Any, frames: list[str], positions: list[int | None],
                   folder: FrameFolder, problems: Problems) -> dict[int, Rle]:
    """An object's masks from a list of one RLE (or null) per listed frame (MeViS' and ReVOS' mask_dict.json,
    LV-VIS' segmentations), keyed by the frame's position in `folder`. A list of the wrong length, or a bad mask,
    is a problem; null entries, and frames missing from the folder (a problem said by the caller), are left out."""
    if not isinstance(per_frame, list) or len(per_frame) != len(frames):
        got = f"{len(per_frame)} entries" if isinstance(per_frame, list) else type(per_frame).__name__
        problems.add("frame_count_mismatch", f"{at}: expected a list of {len(frames)} per-frame masks, got {got}",
                     object_id=object_id)
        return {}
    rles = {}
    for position, frame, entry in zip(positions, frames, per_frame):
        rle = None if entry is None or position is None else source_rle(entry, folder.height, folder.width)
        if isinstance(rle, tuple):
            problems.add(rle[0], f"{at}, frame {frame}: {rle[1]}", object_id=object_id)
        elif rle is not None:
            rles[position] = rle
    return rles
