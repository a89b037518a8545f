"""Exporters: training formats people already use, written from a dataset's committed rows.

`videorefer`: the JSON VideoRefer's training code reads (VideoRefer-700K), one file per data type:
    [{"id", "video", "conversations": [{"from": "human", "value": "<video>\\n...<region>..."},
                                       {"from": "gpt", "value": "..."}],
      "annotation": [{"<frame_idx>": {"segmentation": <COCO RLE>}, ...}, ... one per <region>, in order],
      "height", "width"}]
Masks are copied from the masklets as stored (a source's ground truth comes out bit for bit); frame indexes
are those of the source video (of the whole file when the item was a window of it).

Which frames each region is annotated on (`frames`):
- `sample`: the frames the sample names (its keyframes), as VideoRefer-700K does;
- `tracked`: every frame the masklet has a mask on (the tracker ran at the masklet's `track_fps`);
- `all`: every decoded frame: a frame the tracker skipped holds the mask of the nearest tracked frame, when
  one lies within half a tracking interval (so a frame is never filled across an absence). Set
  `masklets.track_fps: 0` to track every frame instead of holding masks.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from engine.errors import BadInputError
from engine.storage import Dataset

FORMATS = ("videorefer",)
FRAME_CHOICES = ("sample", "tracked", "all")
REGION = "<region>"


@dataclass
class ExportSummary:
    files: dict[str, int] = field(default_factory=dict)  # path -> entries
    skipped: Counter = field(default_factory=Counter)  # reason -> samples left out


def export(
    dataset_url: str, out: str, *, fmt: str = "videorefer", include_dropped: bool = False, frames: str = "sample"
) -> ExportSummary:
    if fmt not in FORMATS:
        raise BadInputError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    if frames not in FRAME_CHOICES:
        raise BadInputError(f"unknown frames choice {frames!r}; choose from {', '.join(FRAME_CHOICES)}")
    dataset = Dataset(dataset_url)
    if not dataset.exists():
        raise BadInputError(f"{dataset_url} does not exist")
    return export_videorefer(dataset, out, include_dropped=include_dropped, frames=frames)


def held_masks(masked: dict[int, Any], *, fps: float, track_fps: float | None) -> dict[int, Any]:
    """`masked` (frame index -> mask) with each frame between tracked ones holding its nearest tracked
    frame's mask, when that one lies within half a tracking interval (ties go to the earlier frame)."""
    if not masked or not track_fps or track_fps >= fps:
        return dict(masked)
    reach = int(fps / track_fps) // 2
    out = {}
    for i in range(min(masked) - reach, max(masked) + reach + 1):
        near = next((j for d in range(reach + 1) for j in (i - d, i + d) if j in masked), None)
        if near is not None and i >= 0:
            out[i] = masked[near]
    return out


def export_videorefer(dataset: Dataset, out: str, *, include_dropped: bool = False, frames: str = "sample") -> ExportSummary:
    import fsspec
    import pyarrow.compute as pc

    samples = dataset.read_table("samples").to_pylist()
    summary = ExportSummary()
    wanted = {m for s in samples for m in s["masklet_ids"]}
    masklets_table = dataset.read_table("masklets")
    if wanted and masklets_table.num_rows:
        masklets_table = masklets_table.filter(pc.is_in(masklets_table["masklet_id"], value_set=_array(wanted)))
    masklets = {m["masklet_id"]: m for m in masklets_table.to_pylist()}
    videos = {v["video_id"]: v for v in dataset.read_table("videos").to_pylist()}

    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sample in samples:
        if not sample["kept"] and not include_dropped:
            summary.skipped["dropped_by_reviewer"] += 1
            continue
        entry = _entry(sample, videos, masklets, summary, frames)
        if entry is not None:
            by_type[sample["data_type"]].append(entry)

    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    for data_type, entries in sorted(by_type.items()):
        path = f"{root.rstrip('/')}/{data_type}.json"
        with fs.open(path, "w") as f:
            json.dump(entries, f)
        summary.files[path] = len(entries)
    return summary


def _array(values: set[str]):
    import pyarrow as pa

    return pa.array(sorted(values), type=pa.string())


def _entry(sample: dict, videos: dict, masklets: dict, summary: ExportSummary, choice: str) -> dict[str, Any] | None:
    video = videos.get(sample["video_id"])
    if video is None:
        summary.skipped["video_missing"] += 1
        return None
    regions = sum(t["value"].count(REGION) for t in sample["conversation"] if t["role"] == "human")
    if regions != len(sample["masklet_ids"]):
        summary.skipped["region_count_mismatch"] += 1
        return None
    annotation = []
    for masklet_id in sample["masklet_ids"]:
        masklet = masklets.get(masklet_id)
        if masklet is None:
            summary.skipped["masklet_missing"] += 1
            return None
        by_frame = {f["frame_index"]: f["rle"] for f in masklet["frames"]}
        if choice == "all":
            by_frame = held_masks(by_frame, fps=video["fps"], track_fps=masklet.get("track_fps"))
        if choice == "sample":
            frames = [i for i in sample["frames"] if i in by_frame] or sorted(by_frame)[:1]
        else:
            frames = sorted(by_frame)
        if not frames:
            summary.skipped["region_without_mask"] += 1
            return None
        annotation.append({str(i): {"segmentation": {"size": list(by_frame[i]["size"]), "counts": by_frame[i]["counts"]}} for i in frames})
    return {
        "id": sample["sample_id"],
        "video": video["source"],
        "conversations": [{"from": t["role"], "value": t["value"]} for t in sample["conversation"]],
        "annotation": annotation,
        "height": video["decode_height"],
        "width": video["decode_width"],
    }
