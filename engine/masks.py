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


def area(rle: Rle) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area({"size": list(rle.size), "counts": rle.counts.encode("ascii")}))


def mask_box(mask: np.ndarray) -> list[float] | None:
    """Tight xyxy box of a mask (x2, y2 exclusive), None when the mask is empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, shapes (N, 4) and (M, 4) -> (N, M)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
