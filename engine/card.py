"""The dataset card: a README.md beside the tables that says what the folder holds, how it was made and how
to read it without the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.config import EngineConfig

if TYPE_CHECKING:
    from engine.storage import Dataset

_TABLES = {
    "videos": "one row per video: content hash id, source, duration, fps, frames decoded, sizes",
    "clips": "contiguous clips covering each video; `method` says which cut it (content / siglip-hac / single)",
    "masklets": "one row per referring expression or noun: per-frame COCO RLE masks and boxes, start frame, "
    "detector score, assignment evidence; `method` strefer, grounded-sam2 (baseline), videorefer or source",
    "samples": "instruction samples: a conversation whose `<region>` tokens refer, in order, to `masklet_ids`; "
    "`kept` false where the Reviewer dropped it (with its verdict and reason)",
    "rejections": "every input or entity that produced nothing, with the stage and the reason",
}


def dataset_card(dataset: "Dataset", config: EngineConfig, version: int) -> str:
    summary = dataset.summary(version)
    record = next(v.record for v in dataset.versions() if v.number == version)
    lines = [
        "# Masklet-grounded instruction dataset",
        "",
        f"Written by video-data-engine {record.engine_version}; version {version} published {record.published_at} "
        f"({record.kind} of {', '.join(sorted({s.pipeline for s in record.settings})) or 'no pipeline'}, profile "
        f"`{config.profile}`).",
        "",
    ]
    if config.is_random:
        random_roles = ", ".join(role for role, spec in config.roles.items() if spec.is_random)
        lines += [
            f"**Made with the `{config.profile}` profile, whose models are built from configs with random "
            f"weights ({random_roles}). The masks, boxes, assignments and texts are meaningless; this dataset "
            "only checks the wiring or measures throughput.**",
            "",
        ]
    lines += ["| table | rows | contents |", "|---|---|---|"]
    for table, info in summary["tables"].items():
        lines.append(f"| `{table}` | {info['rows']} | {_TABLES.get(table, '')} |")
    lines += [
        "",
        f"Items per pipeline and status: {summary['items']}.",
        "",
        "Models: " + ", ".join(f"{role} `{spec.model}`" for role, spec in config.roles.items()),
        "",
        "Masks are COCO RLE (`{size: [h, w], counts}`; decode with `pycocotools.mask.decode`) at the video's "
        "`decode_width` x `decode_height`; boxes are xyxy pixels; times are seconds from the first frame.",
        "",
        "Every table is a Delta Lake table. A row is part of the dataset when the latest `items` row of its "
        "`item_id` has its `write_id` and status done or rejected (a rerun supersedes older rows; a killed "
        "write leaves rows no item names). `engine dataset compact <dir>` deletes the others, after which each "
        "table's plain snapshot is exactly the dataset. Read the committed rows of version V with the engine "
        "(`engine.storage.Dataset(<dir>).read_table('samples', version=V)`), or with Polars alone:",
        "",
        "```python",
        "import polars as pl",
        "V = " + str(version) + "  # a published version; `engine dataset versions <dir>` lists them",
        "row = pl.read_delta('<dir>/versions').sort('published_at').row(V - 1, named=True)",
        "at = {t['key']: t['value'] for t in row['tables']}  # Delta version of every table in version V",
        "items = (pl.read_delta('<dir>/items', version=at['items']).sort('committed_at')",
        "         .group_by('item_id').last().filter(pl.col('status').is_in(['done', 'rejected'])))",
        "samples = pl.read_delta('<dir>/samples', version=at['samples']).join(",
        "    items.select('item_id', 'write_id'), on=['item_id', 'write_id'])",
        "```",
        "",
    ]
    return "\n".join(lines)
