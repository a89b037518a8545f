"""SA-V (Segment Anything Video): MP4s at 24 fps with masklets annotated on every 4th frame (6 fps).

Layout: folders (`sav_000/`, `sav_001/`, ... of `sav_train/`, or one of them) of `sav_XXXXXX.mp4` beside
`sav_XXXXXX_manual.json` ({"video_id", "video_frame_count", "video_height", "video_width" (whole numbers written
as floats, 848.0), "masklet_id": [...], "masklet": [[RLE per object] per annotated frame], ...}); the
`_auto.json` masklets are left out (unreviewed).
Referring expressions (Sa2VA's Ref-SAV) come from a meta_expressions-style JSON ({"videos": {video_id:
{"expressions": {eid: {"exp", "obj_id"}}}}}, obj_id naming a masklet_id), given or found beside as
`meta_expressions.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from engine.errors import BadInputError
from engine.probe import natural_key
from engine.sources._layout import (
    ANNOTATED_STEP,
    Expression,
    Problems,
    load_json,
    load_videos,
    referred,
    source_rle,
    subfolders,
)
from schemas.records import SourceObject, WorkItem

MANUAL = "_manual.json"


def sav_annotations(path: Path) -> list[Path]:
    """The manual annotation files in `path` or its subfolders, in name order; empty when it is not SA-V."""
    if not path.is_dir():
        return []
    found = sorted(path.glob(f"sav_*{MANUAL}"), key=lambda p: natural_key(p.name))
    if found:
        return found
    return [f for folder in subfolders(path) for f in sorted(folder.glob(f"sav_*{MANUAL}"), key=lambda p: natural_key(p.name))]


def read_sav(root: str | Path, *, expressions: str | Path | None = None) -> Iterator[WorkItem]:
    """One WorkItem per annotated video (the MP4 beside its manual JSON): one object per masklet (object_id = its
    masklet_id, masks at the video frame index: annotated frame k is frame 4k), an empty mask meaning the object
    is not visible there; expressions from `expressions` (or `<root>/meta_expressions.json`). The expressions
    file is read now, each video's JSON when its item is reached: a bad mask is a problem of its item."""
    root = Path(root)
    files = sav_annotations(root)
    if not files:
        raise BadInputError(f"{root} is not SA-V: it holds no sav_*_manual.json, nor folders that do")
    beside = root / "meta_expressions.json"
    path = Path(expressions) if expressions is not None else beside if beside.is_file() else None
    referring = load_videos(path) if path is not None else {}
    return _items(files, referring, path)


def _items(files: list[Path], referring: dict[str, Any], expressions_path: Path | None) -> Iterator[WorkItem]:
    for path in files:
        video_id = path.name[: -len(MANUAL)]
        data = load_json(path)
        fields = ("video_frame_count", "video_height", "video_width")
        sizes = [n for k in fields if (n := _whole(data.get(k))) is not None] if isinstance(data, dict) else []
        if len(sizes) != len(fields) or not isinstance(data.get("masklet"), list):
            raise BadInputError(f"{path} needs whole-number {', '.join(fields)} and a masklet list")
        count, height, width = sizes
        problems = Problems()
        rles: dict[str, dict[int, Any]] = {}
        ids = data.get("masklet_id")
        for k, per_object in enumerate(data["masklet"]):
            position = k * ANNOTATED_STEP
            if not isinstance(per_object, list):
                raise BadInputError(f"{path}: masklet entry {k} is not a list of per-object masks")
            names = [str(i) for i in ids] if isinstance(ids, list) and len(ids) == len(per_object) else \
                [str(i) for i in range(len(per_object))]
            for object_id, entry in zip(names, per_object):
                rle = source_rle(entry, height, width)
                if rle is None:
                    continue
                if isinstance(rle, tuple):
                    problems.add(rle[0], f"video {video_id}, masklet {object_id}, frame {position}: {rle[1]}",
                                 object_id=object_id)
                elif position >= count:
                    problems.add("frame_out_of_range", f"video {video_id}, masklet {object_id}: frame {position} "
                                 f"is past the video's {count} frames", object_id=object_id)
                else:
                    rles.setdefault(object_id, {})[position] = rle
        objects = [SourceObject(object_id=i, masks=m) for i, m in rles.items()]
        kept = []
        if video_id in referring:
            kept = referred(_expressions(expressions_path, video_id, referring[video_id]), set(rles),
                            {str(i) for i in ids or []} | set(rles), problems)
        yield WorkItem(source=str(path.with_name(f"{video_id}.mp4")), dataset="sa-v", objects=objects,
                       expressions=kept, problems=problems.records())


def _whole(value: Any) -> int | None:
    """A whole number as an int: the release writes the sizes as floats (483.0, 848.0; float64 in SAM 2's
    sav_dataset README and its sav_000001_manual.json), so 848.0 is 848; None for anything else (848.5, "848")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if isinstance(value, int) or value.is_integer() else None


def _expressions(path: Path | None, video_id: str, video: Any) -> list[Expression]:
    entries = video.get("expressions") if isinstance(video, dict) else None
    if not isinstance(entries, dict):
        raise BadInputError(f'{path}: video {video_id} has no "expressions" object')
    out = []
    for eid, entry in entries.items():
        text = entry.get("exp") if isinstance(entry, dict) else None
        ids = entry.get("obj_id") if isinstance(entry, dict) else None
        if not isinstance(text, str) or not text.strip() or ids is None:
            raise BadInputError(f'{path}: video {video_id}, expression {eid} needs "exp" text and an "obj_id"')
        out.append(Expression(str(eid), " ".join(text.split()), [str(i) for i in (ids if isinstance(ids, list) else [ids])]))
    return out
