"""Work items of annotated datasets for the SAMA and UFVideo tests: a folder of frames with flat colored
rectangles whose masks (or boxes) are exact, as a source adapter would yield them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine import masks
from schemas import SourceExpression, SourceObject, WorkItem

H, W = 96, 192
FPS = 6.0
COLORS = ((220, 40, 40), (40, 40, 220), (40, 200, 60), (230, 200, 30), (200, 60, 200))


@dataclass
class ObjectTruth:
    masks: dict[int, np.ndarray]  # frame position -> exact mask
    color: tuple[int, int, int]


def _rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def object_item(folder: Path, *, objects: int = 3, frames: int = 20, boxes_only: tuple[int, ...] = (),
                present: dict[int, range] | None = None, dataset: str = "mevis") -> tuple[WorkItem, list[ObjectTruth]]:
    """Object k is a rectangle of COLORS[k] moving right, 30 pixels right of and 18 below object k-1 (five fit),
    on frames `present[k]` (default: all). Objects in `boxes_only` carry boxes and no masks (as VidSTG does)."""
    present = present or {}
    truth = []
    for k in range(objects):
        on = present.get(k, range(frames))
        truth.append(ObjectTruth({i: _rect(2 + 2 * i % 40 + 30 * k, 4 + 18 * k, 14 + 2 * i % 40 + 30 * k, 16 + 18 * k) for i in on},
                                 COLORS[k]))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(frames):
        image = np.full((H, W, 3), 90, dtype=np.uint8)
        for t in truth:
            if i in t.masks:
                image[t.masks[i]] = t.color
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    items = []
    for k, t in enumerate(truth):
        if k in boxes_only:
            boxes = {i: masks.mask_box(m) for i, m in t.masks.items()}
            items.append(SourceObject(object_id=str(k), boxes=boxes, category="box"))
        else:
            items.append(SourceObject(object_id=str(k), masks={i: masks.encode(m) for i, m in t.masks.items()}))
    expressions = [SourceExpression(expression=f"the {name} box", object_ids=[str(k)])
                   for k, name in zip(range(objects), ("red", "blue", "green", "yellow", "purple"))]
    return WorkItem(source=str(folder), frame_rate=FPS, dataset=dataset, objects=items, expressions=expressions), truth
