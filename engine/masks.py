"""Masks as COCO RLE through pycocotools, and the box and overlap helpers built on them."""

from __future__ import annotations

import numpy as np

from schemas.records import Rle


def encode(mask: np.ndarray) -> Rle:
    """Boolean (H, W) mask -> COCO compressed RLE."""
    from pycocotools import mask as mask_utils

    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return Rle(size=[int(s) for s in rle["size"]], counts=rle["counts"].decode("ascii"))


def decode(rle: Rle) -> np.ndarray:
    """COCO RLE -> boolean (H, W) mask."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": list(rle.size), "counts": rle.counts.encode("ascii")}).astype(bool)


def iou(a: Rle, b: Rle) -> float:
    """Intersection over union of two masks of one size (0 when both are empty)."""
    from pycocotools import mask as mask_utils

    def coco(rle: Rle) -> dict:
        return {"size": list(rle.size), "counts": rle.counts.encode("ascii")}

    return float(mask_utils.iou([coco(a)], [coco(b)], [0])[0, 0])


def area(rle: Rle) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area({"size": list(rle.size), "counts": rle.counts.encode("ascii")}))


def rle_box(rle: Rle) -> list[float] | None:
    """Tight xyxy box of an RLE mask (as `mask_box`), None when it is empty; no decode needed."""
    from pycocotools import mask as mask_utils

    coco = {"size": list(rle.size), "counts": rle.counts.encode("ascii")}
    if not mask_utils.area(coco):
        return None
    x, y, w, h = (float(v) for v in mask_utils.toBbox(coco))
    return [x, y, x + w, y + h]


def mask_box(mask: np.ndarray) -> list[float] | None:
    """Tight xyxy box of a mask (x2, y2 exclusive), None when the mask is empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]
