"""VidSTG (spatio-temporal video grounding on VidOR): sentences about one object of a temporal segment, with
the object's boxes (no masks: the pipeline makes pseudo masks with a box-prompted segmenter).

Layout: `<root>/{train,val,test}_annotations.json` (github Guaranteer/VidSTG-Dataset: a list of entries: vid,
fps, frame_count, width, height, `used_segment` {begin_fid, end_fid} (or begin_fid, end_fid at the top),
`temporal_gt`, `subject/objects` [{tid, category}], `captions` and `questions` [{type, target_id, description}])
beside VidOR's `<root>/video/<folder>/<vid>.mp4` and `<root>/annotation/{training,validation}/<folder>/<vid>.json`.
The VidSTG entries carry no boxes: they are VidOR's, `trajectories` [[{tid, bbox {xmin, ymin, xmax, ymax}, ...}]
per video frame] of `<vid>.json` (val and test videos come from VidOR's training and validation folders, so both
are searched). An entry with its own `trajectories` (a preprocessed copy) uses those.

An item is a segment of a video: a window from half a frame before begin_fid to half a frame before end_fid (so
its first decoded frame is begin_fid whatever the rounding of fid / fps), positions counted from begin_fid. The
entries of one vid and segment (several sentences about it) are one item, with all their objects and sentences.
Boxes are read on every 4th frame of the segment, as SAMA samples it. Expressions are the declarative captions;
the questions ask about their target rather than describe it, so they are left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from engine.errors import BadInputError
from engine.sources._layout import ANNOTATED_STEP, Expression, Problems, choose_split, load_json, referred, source_box
from schemas.records import SourceObject, WorkItem

SPLITS = ("train", "val", "test")


def vidstg_splits(path: Path) -> list[str]:
    """The splits of a VidSTG root (<split>_annotations.json beside video/); empty when it is not one."""
    if not (path / "video").is_dir():
        return []
    return [s for s in SPLITS if (path / f"{s}_annotations.json").is_file()]


def read_vidstg(root: str | Path, *, split: str | None = None) -> Iterator[WorkItem]:
    """One WorkItem per annotation entry of a split: its segment of the VidOR video, one object per tid with
    boxes (`category` = the VidOR category), one expression per caption. The JSON is read and its entries'
    shape checked now; a bad box, an unknown target or a missing VidOR annotation file is a problem of its item."""
    root = Path(root)
    splits = vidstg_splits(root)
    if not splits:
        raise BadInputError(f"{root} is not VidSTG: it needs <split>_annotations.json beside VidOR's video/ folder")
    path = root / f"{choose_split(root, 'VidSTG', splits, splits, split, 'annotations')}_annotations.json"
    entries = load_json(path)
    if not isinstance(entries, list):
        raise BadInputError(f"{path} must be a list of annotation entries")
    for n, entry in enumerate(entries):
        _check(path, n, entry)
    return _items(root, path, entries)


def _segment(entry: dict) -> tuple[Any, Any]:
    used = entry.get("used_segment")
    source = used if isinstance(used, dict) else entry
    return source.get("begin_fid"), source.get("end_fid")


def _check(path: Path, n: int, entry: Any) -> None:
    at = f"{path}: entry {n}"
    if not isinstance(entry, dict) or not isinstance(entry.get("vid"), str):
        raise BadInputError(f'{at} has no "vid"')
    at = f"{at} (vid {entry['vid']})"
    fps = entry.get("fps")
    if not isinstance(fps, (int, float)) or not fps > 0:
        raise BadInputError(f"{at}: fps must be a positive number, got {fps!r}")
    ints = [entry.get(k) for k in ("frame_count", "width", "height")] + list(_segment(entry))
    if not all(isinstance(v, int) and v >= 0 for v in ints):
        raise BadInputError(f"{at} needs integer frame_count, width, height and a begin_fid, end_fid segment")
    begin, end = _segment(entry)
    if end <= begin:
        raise BadInputError(f"{at}: the segment's end_fid {end} is not after its begin_fid {begin}")
    if not isinstance(entry.get("subject/objects"), list):
        raise BadInputError(f'{at} has no "subject/objects" list')


def _items(root: Path, path: Path, entries: list[dict]) -> Iterator[WorkItem]:
    """One item per video segment: entries of one vid and one segment (several sentences about it) are one item
    with all their objects and expressions, so the item's key (its file and window) is never used twice."""
    videos = root / "video"
    segments: dict[tuple[str, int, int], list[tuple[int, dict]]] = {}
    for n, entry in enumerate(entries):
        segments.setdefault((entry["vid"], *_segment(entry)), []).append((n, entry))
    files: dict[str, str] | None = None
    tracks: dict[str, Path] = {}
    loaded: tuple[str, list | tuple[str, str]] | None = None  # the last vid's: its segments come one after another
    for (vid, begin, end), group in segments.items():
        if files is None:  # VidOR nests videos and boxes in folders the entries do not name: list them once
            files = {f.stem: str(f) for f in sorted(videos.glob("*/*.mp4"))}
            tracks = {f.stem: f for f in sorted(root.glob("annotation/*/*/*.json"))}
        fps = float(group[0][1]["fps"])
        problems = Problems()
        categories: dict[str, str] = {}
        boxes: dict[str, dict[int, list[float]]] = {}
        expressions: list[Expression] = []
        for n, entry in group:
            categories.update(
                {str(o.get("tid")): o.get("category") for o in entry["subject/objects"] if isinstance(o, dict)}
            )
            trajectories = entry.get("trajectories")
            if not isinstance(trajectories, list):
                if loaded is None or loaded[0] != vid:
                    loaded = vid, _vidor_trajectories(tracks.get(vid), vid)
                trajectories = loaded[1]
            if isinstance(trajectories, tuple):
                problems.add(*trajectories)
            else:
                _read_entry(entry, trajectories, begin, end, categories, boxes, problems)
            expressions += [
                Expression(f"{n}.{k}", " ".join(c["description"].split()), [str(c.get("target_id"))])
                for k, c in enumerate(entry.get("captions") or [])
                if isinstance(c, dict) and isinstance(c.get("description"), str) and c["description"].strip()
            ]
        objects = [SourceObject(object_id=t, boxes=b, category=categories[t]) for t, b in sorted(boxes.items())]
        kept = referred(expressions, set(boxes), set(categories), problems)
        yield WorkItem(
            source=files.get(vid, os.path.join(videos, f"{vid}.mp4")),  # a missing file: the runner rejects it
            start_s=round(max(begin - 0.5, 0.0) / fps, 6),
            end_s=round((end - 0.5) / fps, 6),
            dataset="vidstg", objects=objects, expressions=kept, problems=problems.records(),
        )


def _vidor_trajectories(path: Path | None, vid: str) -> list | tuple[str, str]:
    """The per-frame boxes of VidOR's `<vid>.json`, or (reason, detail) when the file is missing or unusable."""
    if path is None:
        return "missing_annotation", f"vid {vid}: no VidOR annotation/<split>/<folder>/{vid}.json under the root"
    try:
        data = load_json(path)
    except BadInputError as exc:
        return "bad_annotation", str(exc)
    trajectories = data.get("trajectories") if isinstance(data, dict) else None
    if not isinstance(trajectories, list):
        return "bad_annotation", f'{path} has no "trajectories" list'
    return trajectories


def _read_entry(entry: dict, trajectories: list, begin: int, end: int, categories: dict[str, str],
                boxes: dict[str, dict[int, list[float]]], problems: Problems) -> None:
    """An entry's boxes on every 4th frame of the segment, added to the item's (objects in `categories`)."""
    vid = entry["vid"]
    height, width, count = entry["height"], entry["width"], entry["frame_count"]
    for fid in range(begin, end, ANNOTATED_STEP):
        if fid >= count or fid >= len(trajectories):
            problems.add("frame_out_of_range", f"vid {vid}: frame {fid} of the segment is past the video's "
                         f"{min(count, len(trajectories))} annotated frames")
            break
        for box in trajectories[fid] or []:
            tid = str(box.get("tid")) if isinstance(box, dict) else None
            bbox = box.get("bbox") if isinstance(box, dict) else None
            xyxy = [bbox.get(k) for k in ("xmin", "ymin", "xmax", "ymax")] if isinstance(bbox, dict) else bbox
            checked = source_box(xyxy, height, width)
            if isinstance(checked, str):
                problems.add("bad_box", f"vid {vid}, tid {tid}, frame {fid}: {checked}", object_id=tid)
            elif tid in categories:
                boxes.setdefault(tid, {})[fid - begin] = checked
            else:
                problems.add("unknown_object", f"vid {vid}, frame {fid}: tid {tid} is not among subject/objects",
                             object_id=tid)
