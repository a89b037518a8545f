"""ReVOS (reasoning video object segmentation, VISA): MeViS's mask_dict.json format in one folder for all splits.

Layout: `<root>/JPEGImages/<vid>/<frame>.jpg`, `<root>/mask_dict.json` ({anno_id: [RLE or null per listed frame]})
and one `<root>/meta_expressions_<split>_.json` per split (`train`, `valid`; MeViS-like: {"videos": {vid:
{"frames": [...], "expressions": {eid: {"exp", "obj_id", "anno_id"}}}}}). UFVideo's PixTRQA builds on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from engine.errors import BadInputError
from engine.sources._layout import choose_split, load_mask_dict, load_videos, mask_dict_items
from schemas.records import WorkItem

REVOS_FPS = 6.0  # ReVOS draws its videos from MeViS, Ref-YouTube-VOS and others, sampled at 6 fps


def revos_splits(path: Path) -> list[str]:
    """The splits of a ReVOS root (meta_expressions_<split>_.json beside mask_dict.json); empty when it is not one."""
    if not ((path / "mask_dict.json").is_file() and (path / "JPEGImages").is_dir()):
        return []
    return sorted(
        p.name[len("meta_expressions_"):-len("_.json")] for p in path.glob("meta_expressions_*_.json") if p.is_file()
    )


def read_revos(root: str | Path, *, split: str | None = None, frame_rate: float = REVOS_FPS) -> Iterator[WorkItem]:
    """One WorkItem per video of a split (without `split`: the only one there), read as MeViS is: one object per
    anno_id an expression names, masks keyed by the frame's position in JPEGImages/<vid>, bad annotations as
    problems of their item. Both JSON files are read and checked now."""
    root = Path(root)
    splits = revos_splits(root)
    if not splits:
        raise BadInputError(
            f"{root} is not ReVOS: it needs mask_dict.json, JPEGImages/ and meta_expressions_<split>_.json"
        )
    chosen = choose_split(root, "ReVOS", splits, splits, split, "masks")
    meta_path, mask_path = root / f"meta_expressions_{chosen}_.json", root / "mask_dict.json"
    videos = load_videos(meta_path)
    masks = load_mask_dict(mask_path)
    return mask_dict_items(root, meta_path, videos, masks, mask_path, frame_rate=frame_rate, dataset="revos")
