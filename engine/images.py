"""The one check every image consumer makes: an RGB uint8 numpy array of shape (H, W, 3)."""

from __future__ import annotations

import numpy as np


def check_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """`image` as a contiguous array, or a ValueError naming `name` and what it got."""
    if (
        not isinstance(image, np.ndarray)
        or image.ndim != 3
        or image.shape[2] != 3
        or image.dtype != np.uint8
        or 0 in image.shape[:2]
    ):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be RGB uint8 of shape (H, W, 3), got {got}")
    return np.ascontiguousarray(image)
