"""The dataset card: a README.md beside the shards that says what the folder holds and how it was made."""

from __future__ import annotations

from typing import Any

from engine.config import EngineConfig

_TABLES = {
    "videos": "one row per video: content hash id, source, duration, fps, frames decoded, sizes",
    "clips": "contiguous clips covering each video; `method` says which cut it (content / siglip-hac / single)",
    "masklets": "one row per referring expression or noun: per-frame COCO RLE masks and boxes, start frame, "
    "detector score, assignment evidence; `method` strefer, grounded-sam2 (baseline), videorefer or source",
    "samples": "instruction samples: a conversation whose `<region>` tokens refer, in order, to `masklet_ids`; "
    "`kept` false where the Reviewer dropped it (with its verdict and reason)",
    "rejections": "every input or entity that produced nothing, with the stage and the reason",
}


def dataset_card(manifest: dict[str, Any], config: EngineConfig) -> str:
    lines = [
        "# Masklet-grounded instruction dataset",
        "",
        f"Written by video-data-engine {manifest['engine_version']} with profile `{config.profile}` "
        f"(config hash `{config.hash}`), last updated {manifest['updated_at']}.",
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
    lines += ["| table | shards | rows | contents |", "|---|---|---|---|"]
    for table, info in manifest["tables"].items():
        lines.append(f"| `{table}` | {info['shards']} | {info['rows']} | {_TABLES.get(table, '')} |")
    lines += [
        "",
        "Models: " + ", ".join(f"{role} `{spec.model}`" for role, spec in config.roles.items()),
        "",
        "Masks are COCO RLE (`{size: [h, w], counts}`; decode with `pycocotools.mask.decode`) at the video's "
        "`decode_width` x `decode_height`; boxes are xyxy pixels; times are seconds from the first frame.",
        f"Videos: {len(manifest['videos'])}; items per pipeline and status: {manifest['items']}.",
        "Only rows named by a commit record in `_complete/` are part of the dataset (a rerun supersedes "
        "earlier rows): read with `engine.storage.Dataset(<dir>).read_table(<table>)`, `engine dataset show "
        "<dir>` or `engine export`. `pyarrow.parquet.read_table('<dir>/<table>')` reads every shard, which "
        "equals the committed rows unless items were rerun or a run was killed.",
        "",
    ]
    return "\n".join(lines)
