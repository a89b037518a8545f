"""A source dataset's own objects as masklets, for the pipelines that build on annotated datasets (VideoRefer's
object QA, SAMA, UFVideo).

- Masks (MeViS, Ref-YouTube-VOS, LV-VIS, SA-V, ReVOS, A2D-Sentences, the engine's own masklets) are ground
  truth: copied as they are (`method="source"`), resized only where the frames are decoded smaller than the
  source's (`decode.max_side`, or an odd size made even).
- Boxes without masks (VidSTG) get pseudo masks from the box-prompted segmenter (HQ-SAM in SAMA §3.1 and A.3)
  on the frames the pipeline samples (`method="pseudo"`): one segmenter call per frame for all its boxes.

An annotation that cannot be used (a mask of another size, a box the segmenter finds nothing in) becomes a
rejection row of the item, and the other objects go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from engine import masks
from engine.ids import stable_id
from engine.models.interfaces import BoxSegmenter
from engine.runner import Outputs, VideoContext
from engine.stats import Stats
from schemas import Assignment, FrameMask, MaskletRecord, Rle, SourceObject


@dataclass
class SourceMasklets:
    """The masklets of an item's objects (object id -> masklet) and the rows about them."""

    masklets: dict[str, MaskletRecord] = field(default_factory=dict)
    outputs: Outputs = field(default_factory=Outputs)


def annotated_positions(objects: Sequence[SourceObject]) -> list[int]:
    """Every frame position (in the item) where some object has a mask or a box, in order."""
    return sorted({p for o in objects for p in (*o.masks, *o.boxes)})


def spread(positions: Sequence[int], count: int) -> list[int]:
    """`count` of `positions` spread uniformly from the first to the last (all of them when there are fewer)."""
    if len(positions) <= count:
        return list(positions)
    picks = np.linspace(0, len(positions) - 1, num=count)
    return sorted({positions[int(round(p))] for p in picks})


def object_names(ctx: VideoContext) -> dict[str, str]:
    """Object id -> the first referring expression that names it, else its category, else its id."""
    names: dict[str, str] = {}
    for expression in ctx.item.expressions:
        for object_id in expression.object_ids:
            names.setdefault(object_id, expression.expression)
    for obj in ctx.item.objects:
        names.setdefault(obj.object_id, obj.category or obj.object_id)
    return names


def source_masklets(
    ctx: VideoContext,
    stage: str,
    stats: Stats,
    *,
    box_segmenter: BoxSegmenter | None = None,
    frames: dict[int, np.ndarray] | None = None,
) -> SourceMasklets:
    """Masklets of the item's objects. Objects with masks keep them; objects with boxes only get pseudo masks
    from `box_segmenter` on the decoded `frames` (frame index -> RGB at decode size) that have their box."""
    out = SourceMasklets()
    names = object_names(ctx)
    boxed: list[SourceObject] = []
    for obj in ctx.item.objects:
        if obj.masks:
            frame_masks = _copied(ctx, stage, stats, obj, names, out.outputs)
            method = "source"
        elif obj.boxes:
            boxed.append(obj)
            continue
        else:
            continue
        if frame_masks:
            out.masklets[obj.object_id] = _masklet(ctx, obj, names, frame_masks, method)
    if boxed and box_segmenter is not None and frames:
        made = _pseudo(ctx, stage, stats, boxed, names, box_segmenter, frames, out.outputs)
        for obj in boxed:
            if made.get(obj.object_id):
                out.masklets[obj.object_id] = _masklet(ctx, obj, names, made[obj.object_id], "pseudo")
    out.outputs.masklets.extend(out.masklets.values())
    return out


def _masklet(ctx: VideoContext, obj: SourceObject, names: dict[str, str], frames: list[FrameMask],
             method: str) -> MaskletRecord:
    return MaskletRecord(
        # the run hash: another pipeline, run options or box segmenter (pseudo masks) is another masklet
        masklet_id=stable_id(ctx.video_id, ctx.provenance.config_hash, method, obj.object_id),
        video_id=ctx.video_id,
        expression=names.get(obj.object_id, obj.object_id),
        noun=obj.category or obj.object_id,
        method=method,
        start_frame=frames[0].frame_index,
        start_time=frames[0].timestamp,
        detector_score=1.0,
        detector_box=frames[0].box,
        assignment=Assignment(method="source", candidate_index=0, num_candidates=1, score=1.0),
        num_frames_tracked=0,
        frames=frames,
        provenance=ctx.provenance,
    )


def _copied(ctx: VideoContext, stage: str, stats: Stats, obj: SourceObject, names: dict[str, str],
            out: Outputs) -> list[FrameMask]:
    """The object's masks at decode size, or none (and a rejection) where one has a size that is neither the
    decoded frames' nor the source's."""
    size = [ctx.info.decode_height, ctx.info.decode_width]
    source_size = [ctx.info.height, ctx.info.width]
    first, fps = ctx.first_frame, ctx.info.fps
    frames = []
    for position, rle in sorted(obj.masks.items()):
        if list(rle.size) == source_size != size:
            rle = resized(rle, size)
            stats.count("source_masks_resized")
        elif list(rle.size) != size:
            detail = (f"object {obj.object_id}: mask size {rle.size} is neither the decoded frame size {size} "
                      f"nor the source's {source_size}")
            out.rejections.append(keyed_rejection(ctx, stage, "mask_size_mismatch", detail, key=obj.object_id,
                                                  expression=names.get(obj.object_id)))
            return []
        box = masks.rle_box(rle)
        if box is not None:
            index = first + position
            frames.append(FrameMask(frame_index=index, timestamp=round(index / fps, 6), rle=rle, box=box))
    return frames


def _pseudo(ctx: VideoContext, stage: str, stats: Stats, objects: list[SourceObject], names: dict[str, str],
            segmenter: BoxSegmenter, frames: dict[int, np.ndarray], out: Outputs) -> dict[str, list[FrameMask]]:
    """Pseudo masks of box-only objects: per decoded frame, every box on it in one segmenter call. Boxes are
    given at the source's size and scaled to the decoded frames'."""
    sx = ctx.info.decode_width / ctx.info.width
    sy = ctx.info.decode_height / ctx.info.height
    first, fps = ctx.first_frame, ctx.info.fps
    made: dict[str, list[FrameMask]] = {o.object_id: [] for o in objects}
    empty: dict[str, int] = {}
    for index in sorted(frames):
        on_frame = [(o, o.boxes[index - first]) for o in objects if index - first in o.boxes]
        if not on_frame:
            continue
        boxes = np.array([[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for _, b in on_frame], dtype=np.float64)
        predicted = segmenter.segment(frames[index], boxes)
        stats.count("box_segmenter_calls")
        for (obj, _), mask in zip(on_frame, predicted):
            box = masks.mask_box(mask)
            if box is None:
                empty[obj.object_id] = empty.get(obj.object_id, 0) + 1
                continue
            made[obj.object_id].append(FrameMask(frame_index=index, timestamp=round(index / fps, 6), rle=masks.encode(mask),
                                       box=box))
    for object_id, n in empty.items():
        detail = f"object {object_id}: the box segmenter found no mask in its box on {n} frame(s)"
        out.rejections.append(keyed_rejection(ctx, stage, "empty_pseudo_mask", detail, key=object_id,
                                              expression=names.get(object_id)))
    stats.count("pseudo_masks", sum(len(f) for f in made.values()))
    return made


def keyed_rejection(ctx: VideoContext, stage: str, reason: str, detail: str, *, key: Any,
                    expression: str | None = None, raw: str | None = None) -> Any:
    """`ctx.rejection` with `key` in its id, where one stage can reject several inputs of a video for one
    reason without an expression to tell them apart (ids must be unique, or a rerun cannot supersede them)."""
    rejection = ctx.rejection(stage, reason, detail, expression=expression, raw=raw)
    return rejection.model_copy(update={"rejection_id": stable_id(rejection.rejection_id, key)})


def resized(rle: Rle, size: list[int]) -> Rle:
    """A mask resized to `size` ([h, w]): area-weighted, then covered at least half."""
    import cv2

    mask = masks.decode(rle).astype(np.float32)
    small = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return masks.encode(small >= 0.5)
