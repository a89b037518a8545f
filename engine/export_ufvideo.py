"""`ufvideo`: UFVideo's JSON (UFVideo §3.3, Appendix B Box 1), `<out>/ufvideo/<data_type>.json` (`pixrqa`,
`pixhqa`, `pixtrqa`):
    [{"id", "video",
      "conversations": [{"from": "human", "value": "<video>\\n... <region> ... <Temp-x> ..."},
                        {"from": "gpt", "value": "... The segmentation mask: object1[SEG], object2[SEG]."}],
      "prompt_masks": [{"<frame>": RLE}, ... one per <region> token, in order: its visual prompt],
      "label_masks": [{"<frame>": RLE, ...}, ... one per [SEG] token, in order: its labels],
      "temporal_tokens": ["<Temp-x>", ...], "time_s": [t, ...],
      "height", "width", "fps", "start", "end"}]
From the sample's labels: a `<region>`'s mask is on frame `prompt_frame` (one frame for every region, or one per
region, comma-separated); a `[SEG]`'s masks are on `label_frames` (comma-separated), where its masklet has one (a
frame the tracker skipped holds the nearest tracked mask); `temporal` ("x" or "x1,x2") and `time_s` ("t" or
"t1,t2", seconds from the start of the video or window) are the temporal tokens' values. `video`, `start`/`end`,
frame indexes and mask sizes as engine/export.py describes.
"""

from __future__ import annotations

from typing import Any

from engine.export import ExportOptions, ExportRun, ExportSummary, JsonFiles, Skip, conversations, export_run, tokens
from engine.storage import Dataset

DATA_TYPES = ("pixrqa", "pixhqa", "pixtrqa")


def export_ufvideo(dataset: Dataset, out: str, options: ExportOptions = ExportOptions()) -> ExportSummary:
    with export_run(dataset, out, options) as run, JsonFiles(run.fs, f"{run.root}/ufvideo") as files:
        for sample, entry in run.entries(lambda s: _entry(run, s), DATA_TYPES):
            files.append(sample["data_type"], entry)
        run.summary.files = files.counts
    return run.summary


def _entry(run: ExportRun, sample: dict[str, Any]) -> dict[str, Any]:
    found = tokens(sample)
    labels = sample["labels"]
    regions = found.count("<region>")
    prompt_frames = _numbers(labels, "prompt_frame", int) if regions else []
    if len(prompt_frames) == 1:
        prompt_frames *= regions  # one frame prompts every region
    if len(prompt_frames) != regions:
        raise Skip("labels_missing")
    label_frames = _numbers(labels, "label_frames", int) if regions < len(found) else []
    place = run.place(sample)
    prompt_masks, label_masks = [], []
    prompts = iter(prompt_frames)
    for token, masklet_id in zip(found, sample["masklet_ids"]):
        if token == "<region>":
            masks = run.masks(masklet_id, [next(prompts)], place, hold=True, missing="prompt_without_mask")
            prompt_masks.append({str(i): rle for i, rle in masks.items()})
        else:
            label_masks.append({str(i): rle for i, rle in run.masks(masklet_id, label_frames, place, hold=True).items()})
    temporal = _numbers(labels, "temporal", int, required=False)
    time_s = _numbers(labels, "time_s", float, required=False)
    if len(temporal) != len(time_s) or not all(0 <= x <= 99 for x in temporal):
        raise Skip("labels_malformed")
    return {
        "id": sample["sample_id"],
        "video": place.video,
        "conversations": conversations(sample),
        "prompt_masks": prompt_masks,
        "label_masks": label_masks,
        "temporal_tokens": [f"<Temp-{x}>" for x in temporal],
        "time_s": time_s,
        "height": place.target.height,
        "width": place.target.width,
        "fps": place.row["fps"],
        **place.times(),
    }


def _numbers(labels: dict[str, str], name: str, kind: type, *, required: bool = True) -> list[Any]:
    """A label of comma-separated numbers; a missing (where required) or malformed one leaves the sample out."""
    text = labels.get(name, "").strip()
    if not text:
        if required:
            raise Skip("labels_missing")
        return []
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise Skip("labels_malformed") from None
