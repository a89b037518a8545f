"""Drawing on frames: numbered boxes for Set-of-Mark prompts (and, later, mask overlays for rendering)."""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np

from engine.images import check_rgb_uint8

Color = tuple[int, int, int]

_GOLDEN = 0.618033988749895


def palette(n: int) -> list[Color]:
    """`n` distinct bright RGB colors; color i is the same whatever n is, so an object keeps its color."""
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    colors = []
    for i in range(n):
        # Golden-ratio hue steps keep neighbours far apart on the hue circle for any n.
        hue = (0.02 + i * _GOLDEN) % 1.0
        value = 1.0 if (i // 6) % 2 == 0 else 0.85
        r, g, b = colorsys.hsv_to_rgb(hue, 0.9, value)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


# Colors a prompt can name, far apart for a VLM's eye: Set-of-Mark boxes whose color the prompt says (SAMA A.3).
NAMED_COLORS: tuple[tuple[str, Color], ...] = (
    ("red", (230, 25, 25)), ("green", (30, 180, 60)), ("blue", (30, 90, 230)), ("yellow", (255, 225, 25)),
    ("magenta", (230, 40, 220)), ("cyan", (40, 220, 230)), ("orange", (250, 130, 20)), ("purple", (130, 50, 180)),
    ("white", (255, 255, 255)), ("lime", (170, 255, 60)), ("pink", (250, 160, 190)), ("brown", (140, 80, 30)),
)


def _text_color(color: Color) -> Color:
    # Black on light fills, white on dark ones (ITU-R BT.601 luma).
    r, g, b = color
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_numbered_boxes(
    image: np.ndarray,
    boxes: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[str] | None = None,
    colors: Sequence[Color] | None = None,
) -> np.ndarray:
    """A copy of `image` (RGB uint8, H x W x 3) with each xyxy box outlined in its own color (default: the
    palette's, by position) and its label (default: its 0-based index) written in a filled tag at the box's
    top-left corner. Set-of-Mark prompts and the overlay render both draw with it."""
    import cv2

    check_rgb_uint8(image)
    boxes_arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if labels is None:
        labels = [str(i) for i in range(len(boxes_arr))]
    if len(labels) != len(boxes_arr):
        raise ValueError(f"got {len(labels)} labels for {len(boxes_arr)} boxes")
    colors = palette(len(boxes_arr)) if colors is None else list(colors)
    if len(colors) != len(boxes_arr):
        raise ValueError(f"got {len(colors)} colors for {len(boxes_arr)} boxes")

    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    # Line width and font grow with the image so the marks stay legible after a VLM's resize.
    thickness = max(1, round(min(h, w) / 200))
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.35, min(h, w) / 700)
    for (x0, y0, x1, y1), label, color in zip(boxes_arr, labels, colors):
        x0, x1 = sorted((int(np.clip(round(x0), 0, w - 1)), int(np.clip(round(x1), 0, w - 1))))
        y0, y1 = sorted((int(np.clip(round(y0), 0, h - 1)), int(np.clip(round(y1), 0, h - 1))))
        cv2.rectangle(out, (x0, y0), (x1, y1), color, thickness)  # axis-aligned: crisp, exact color

        (tw, th), baseline = cv2.getTextSize(label, font, scale, max(1, thickness // 2))
        pad = max(1, thickness)
        tag_w, tag_h = tw + 2 * pad, th + baseline + 2 * pad
        # Tag sits above the box; where there is no room above, it goes just inside the top edge.
        top = y0 - tag_h if y0 - tag_h >= 0 else y0
        left = min(x0, max(0, w - tag_w))
        cv2.rectangle(out, (left, top), (left + tag_w, top + tag_h), color, thickness=-1)
        cv2.putText(
            out, label, (left + pad, top + pad + th), font, scale, _text_color(color),
            max(1, thickness // 2), lineType=cv2.LINE_AA,
        )
    return out


def draw_region(
    image: np.ndarray,
    mask: np.ndarray,
    color: Color = (255, 0, 0),
    *,
    thickness: int | None = None,
    fill_alpha: float = 0.1,
) -> np.ndarray:
    """A copy of `image` (RGB uint8, H x W x 3) with the region of `mask` (bool, H x W) marked Set-of-Mark
    style: a thin contour in `color` and, inside the mask, a light translucent tint of the same color.

    Keep the mark light. Strefer (§4.1.3) first drew thick boundaries with a semi-transparent red fill and the
    model then described the region as "a red object"; VideoRefer's thinner boundaries with a fully transparent
    fill did much better. So the contour is thin (about 1/320 of the short side, at least 1 px) and the fill
    is at most half-opaque (`fill_alpha=0` reproduces VideoRefer's fully transparent fill). Pixels away from
    the mask are never changed: only the mask and a band of `thickness` pixels around its edge are.
    """
    import cv2

    check_rgb_uint8(image)
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != image.shape[:2]:
        raise ValueError(
            f"mask must be boolean of shape {image.shape[:2]} (the image's height and width), "
            f"got {mask.dtype} {mask.shape}"
        )
    if not 0.0 <= fill_alpha <= 0.5:
        raise ValueError(
            f"fill_alpha must be in [0, 0.5], got {fill_alpha}: a heavier fill makes models describe the "
            "fill color instead of the object (Strefer §4.1.3)"
        )
    if len(color) != 3 or any(not 0 <= int(c) <= 255 for c in color):
        raise ValueError(f"color must be three ints in [0, 255], got {color!r}")
    h, w = image.shape[:2]
    if thickness is None:
        thickness = max(1, round(min(h, w) / 320))
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1 pixel, got {thickness}")

    out = np.ascontiguousarray(image.copy())
    if fill_alpha > 0:
        tint = np.asarray(color, dtype=np.float32)
        inside = out[mask].astype(np.float32)
        out[mask] = np.clip(np.rint((1.0 - fill_alpha) * inside + fill_alpha * tint), 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    # No anti-aliasing: the contour keeps the exact color, so it never blends into a second, muddier color.
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness, lineType=cv2.LINE_8)
    return out
