"""`sama`: SAMA-239K style JSON (SAMA §3.1, A.3), under `<out>/sama/`:
- `<data_type>.json` (`object_description`, `grounded_dialogue`):
    [{"id", "video", "frames": [frame index of `video`, ...],
      "conversations": [{"from": "human", "value": "<video>\\n... <region> ..."},
                        {"from": "gpt", "value": "... <p> phrase </p> [SEG] ..."}, ...],
      "masks": [mask key, ... one per <region> or [SEG] token over the whole conversation, in order],
      "height", "width", "start", "end"}]
- `mask_dict.json`: {mask key: [COCO RLE or null, one per entry of the record's `frames`]}.
`frames` are the sample's frames (the ones its VLM saw) that lie in its scope; a masklet with no mask on one of
them has null there (a frame the tracker skipped holds the nearest tracked mask). The records point into the
mask dictionary, where one masklet on one set of frames of one `video` is stored once, however many samples
and tokens name it. `video`, `start`/`end`, frame indexes and mask sizes as engine/export.py describes.
"""

from __future__ import annotations

from typing import Any

from engine.export import ExportOptions, ExportRun, ExportSummary, JsonFiles, Skip, conversations, export_run, tokens
from engine.ids import stable_id
from engine.storage import Dataset

DATA_TYPES = ("object_description", "grounded_dialogue")

MASK_DICT = "mask_dict"


def export_sama(dataset: Dataset, out: str, options: ExportOptions = ExportOptions()) -> ExportSummary:
    with export_run(dataset, out, options) as run, JsonFiles(run.fs, f"{run.root}/sama") as files:
        for sample, (entry, masks) in run.entries(lambda s: _entry(run, s), DATA_TYPES):
            for key, value in masks.items():
                if run.index.add_key(key):
                    files.put(MASK_DICT, key, value)
            files.append(sample["data_type"], entry)
        run.summary.files = files.counts
    return run.summary


def _entry(run: ExportRun, sample: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The record, and the mask dictionary's entries it needs that this export has not written yet."""
    tokens(sample)
    place = run.place(sample)
    frames = [i for i in sample["frames"] if place.inside(i)]
    if not frames:
        raise Skip("frames_outside_scope")
    keys, masks = [], {}
    for masklet_id in sample["masklet_ids"]:
        target = place.target
        key = stable_id(masklet_id, target.video, target.height, target.width, frames)
        if key not in masks and not run.index.known(key):
            by_frame = run.masks(masklet_id, frames, place, hold=True)
            masks[key] = [by_frame.get(i - target.first_index) for i in frames]
        keys.append(key)
    entry = {
        "id": sample["sample_id"],
        "video": place.video,
        "frames": [i - place.target.first_index for i in frames],
        "conversations": conversations(sample),
        "masks": keys,
        "height": place.target.height,
        "width": place.target.width,
        **place.times(),
    }
    return entry, masks
