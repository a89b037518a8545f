"""LV-VIS (large-vocabulary video instance segmentation): YouTube-VIS style instances JSON, one per split.

Layout: `<root>/<split>/JPEGImages/<video>/<frame>.jpg` with the split's instances JSON beside the split folder,
`<root>/<split>_instances.json`, or in it, `<root>/<split>/<split>_instances.json` (where OV2Seg's loader keeps
`LVVIS/val/val_instances.json`) ({"videos": [{id, file_names: ["<video>/<frame>.jpg", ...], height, width,
length}], "annotations": [{id, video_id, category_id, segmentations: [RLE or null per file name]}], "categories":
[{id, name}]}), for `train` and `val` (the test split has no instances file). The release has no referring
expressions: SAMA names objects by their category, so objects carry `category` and items no expressions.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from engine.errors import BadInputError
from engine.sources._layout import Problems, choose_split, frame_folder, load_json, per_frame_rles, subfolders
from schemas.records import SourceObject, WorkItem

LVVIS_FPS = 5.0  # the rate LV-VIS frames were extracted at, as its loaders assume; a frame_rate given overrides it
INSTANCES = "_instances.json"


def lvvis_splits(path: Path) -> list[str]:
    """The splits of an LV-VIS root (<split>/JPEGImages/ with <split>_instances.json beside it or in it); empty
    when it is none."""
    if not path.is_dir():
        return []
    return [f.name for f in subfolders(path) if (f / "JPEGImages").is_dir() and _instances(path, f.name)]


def _instances(root: Path, split: str) -> Path | None:
    """The split's instances JSON: beside its folder, else in it (the layout OV2Seg's loader reads)."""
    for path in (root / f"{split}{INSTANCES}", root / split / f"{split}{INSTANCES}"):
        if path.is_file():
            return path
    return None


def read_lvvis(root: str | Path, *, split: str | None = None, frame_rate: float = LVVIS_FPS) -> Iterator[WorkItem]:
    """One WorkItem per video of a split: its JPEG folder, one object per annotation (object_id = the annotation
    id, `category` = its category's name, masks keyed by the frame's position in the folder). The JSON is read
    and its shape checked now; a bad annotation is a problem of its item."""
    root = Path(root)
    splits = lvvis_splits(root)
    if not splits:
        raise BadInputError(
            f"{root} is not LV-VIS: it needs <split>/JPEGImages/ with <split>_instances.json beside it or in <split>/"
        )
    chosen = choose_split(root, "LV-VIS", splits, splits, split, "instances")
    path = _instances(root, chosen) or root / f"{chosen}{INSTANCES}"
    data = load_json(path)
    fields = ("videos", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in fields):
        raise BadInputError(f'{path} must be an object with "videos", "annotations" and "categories" lists')
    categories = {c.get("id"): c.get("name") for c in data["categories"] if isinstance(c, dict)}
    by_video: dict[Any, list[dict]] = defaultdict(list)
    for n, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or "id" not in annotation or "video_id" not in annotation:
            raise BadInputError(f"{path}: annotation {n} has no id or video_id")
        by_video[annotation["video_id"]].append(annotation)
    for n, video in enumerate(data["videos"]):
        names = video.get("file_names") if isinstance(video, dict) else None
        if not isinstance(names, list) or not names or not all(isinstance(f, str) for f in names):
            raise BadInputError(f"{path}: video {n} has no file_names list")
    return _items(root / chosen, path, data["videos"], by_video, categories, frame_rate)


def _items(
    root: Path, path: Path, videos: list[dict], by_video: dict[Any, list[dict]], categories: dict[Any, Any],
    frame_rate: float,
) -> Iterator[WorkItem]:
    for video in videos:
        names = video["file_names"]
        video_id = Path(names[0]).parent.as_posix()
        folder = frame_folder(root, video_id)
        problems = Problems()
        positions = [folder.positions.get(Path(name).stem) for name in names]
        for name, position in zip(names, positions):
            if position is None:
                problems.add("missing_frame", f"video {video_id}: frame {name} is not among the images of {folder.path}")
        objects = []
        for annotation in by_video.get(video.get("id"), []):
            object_id = str(annotation["id"])
            at = f"{path}: video {video_id}, annotation {object_id}"
            per_frame = annotation.get("segmentations")
            masks = per_frame_rles(at, object_id, per_frame, names, positions, folder, problems)
            if not isinstance(per_frame, list) or len(per_frame) != len(names):
                continue  # frame_count_mismatch, said
            category = categories.get(annotation.get("category_id"))
            if not masks:
                problems.add("no_annotation", f"{at}: no usable mask on any frame", object_id=object_id)
            else:
                objects.append(SourceObject(object_id=object_id, masks=masks, category=category))
        yield WorkItem(
            source=str(folder.path), frame_rate=frame_rate, dataset="lv-vis", objects=objects, problems=problems.records()
        )
