"""`videorefer`: the JSON VideoRefer's training code reads (VideoRefer-700K), `<out>/<data_type>.json`:
    [{"id", "video", "conversations": [{"from": "human", "value": "<video>\\n...<region>..."},
                                       {"from": "gpt", "value": "..."}],
      "annotation": [{"<frame_idx>": {"segmentation": <COCO RLE>}, ...}, ... one per <region>, in order],
      "height", "width", "start", "end", "refers_to"}]
`video`, `start`/`end`, frame indexes and mask sizes as engine/export.py describes for every format. The
`<region>` tokens are those of the human turns, one masklet each.

Which frames each region is annotated on (`frames`):
- `sample`: the frames the sample names (its keyframes), as VideoRefer-700K does;
- `tracked`: every frame the masklet has a mask on (the tracker ran at the masklet's `track_fps`);
- `all`: every decoded frame: a frame the tracker skipped holds the mask of the nearest tracked frame, when
  one lies within half a tracking interval (so a frame is never filled across an absence). Set
  `masklets.track_fps: 0` to track every frame instead of holding masks.
"""

from __future__ import annotations

from typing import Any

from engine.export import ExportOptions, ExportRun, ExportSummary, JsonFiles, Skip, conversations, export_run
from engine.storage import Dataset

REGION = "<region>"


def export_videorefer(dataset: Dataset, out: str, options: ExportOptions = ExportOptions()) -> ExportSummary:
    with export_run(dataset, out, options) as run, JsonFiles(run.fs, run.root) as files:
        for sample, entry in run.entries(lambda s: _entry(run, s)):
            files.append(sample["data_type"], entry)
        run.summary.files = files.counts
    return run.summary


def _entry(run: ExportRun, sample: dict[str, Any]) -> dict[str, Any]:
    regions = sum(t["value"].count(REGION) for t in sample["conversation"] if t["role"] == "human")
    if regions != len(sample["masklet_ids"]):
        raise Skip("region_count_mismatch")
    place = run.place(sample)
    frames = sample["frames"] if run.options.frames == "sample" else None
    annotation = [
        {str(i): {"segmentation": rle} for i, rle in run.masks(m, frames, place, hold=run.options.frames == "all").items()}
        for m in sample["masklet_ids"]
    ]
    return {
        "id": sample["sample_id"],
        "video": place.video,
        "conversations": conversations(sample),
        "annotation": annotation,
        "height": place.target.height,
        "width": place.target.width,
        **place.times(),
        "refers_to": sample["refers_to"] or [],  # what it points at (mask, timestamp, ...): mix data by content
    }
