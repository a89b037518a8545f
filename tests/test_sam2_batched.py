"""sam2's batched predictor against its per-object one, and sessions of one tracker in several threads. Tiny
random models in float32 on CPU: deterministic, so both paths and both schedules must agree mask for mask."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine.frame_store import FrameStore
from tests.test_sam2_backends import BOX_A, BOX_B, SIZE, H, W, make_store, synthetic_frame

BOX_C = (60.0, 5.0, 100.0, 45.0)
Masks = dict[tuple[bool, int], dict[int, np.ndarray]]  # (reverse, position) -> {obj_id: mask}

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trackers():
    """{batched: tracker}, both on the same random weights."""
    from engine.models.sam2_tracker import Sam2Tracker

    return {batched: Sam2Tracker.tiny(image_size=SIZE, dtype="float32", batched=batched) for batched in (True, False)}


def track(
    tracker, store: FrameStore, boxes: dict[int, tuple], start: int, barrier: threading.Barrier | None = None
) -> Masks:
    """Prompt every box on `start`, then track forward and backward from it; with `barrier`, wait on it after
    every frame so that two sessions advance in lockstep."""
    masks: Masks = {}
    with tracker.start(store, height=H, width=W) as session:
        for obj_id, box in boxes.items():
            session.add_box(start, obj_id, box)
        for reverse in (False, True):
            for position, frame_masks in session.propagate(start, reverse=reverse):
                masks[(reverse, position)] = frame_masks
                if barrier is not None:
                    barrier.wait(timeout=120)
    return masks


def store_of(frames: list[np.ndarray]) -> FrameStore:
    store = FrameStore(size=SIZE)
    for frame in frames:
        store.append(np.ascontiguousarray(frame))
    return store


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)  # empty on both: equal


def test_batched_and_per_object_predictors_agree(trackers) -> None:
    import torch

    batched, per_object = trackers[True].predictor, trackers[False].predictor
    assert type(batched) is not type(per_object)
    ours, theirs = batched.state_dict(), per_object.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    boxes = {1: BOX_A, 2: BOX_B, 3: BOX_C}
    store = make_store(8)
    results = {kind: track(tracker, store, boxes, start=4) for kind, tracker in trackers.items()}
    assert results[True].keys() == results[False].keys() == {(False, p) for p in range(4, 8)} | {
        (True, p) for p in range(5)
    }
    for step, masks in results[True].items():
        assert masks.keys() == results[False][step].keys() == boxes.keys()
        for obj_id, mask in masks.items():
            # Same weights, same fp32 arithmetic: only batched against one-by-one kernels may differ
            # (bit-identical here on CPU).
            assert iou(mask, results[False][step][obj_id]) >= 0.99, (step, obj_id)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_object"])
def test_sessions_in_two_threads_match_sessions_one_after_another(trackers, batched) -> None:
    """The engine runs several videos at once on one loaded model: sessions share only the predictor."""
    tracker = trackers[batched]
    videos = [
        (make_store(6), {1: BOX_A, 2: BOX_B}),
        (store_of([synthetic_frame(5 - i)[::-1] for i in range(6)]), {7: BOX_B, 8: BOX_C, 9: BOX_A}),
    ]
    one_after_another = [track(tracker, store, boxes, start=2) for store, boxes in videos]
    barrier = threading.Barrier(len(videos))
    with ThreadPoolExecutor(len(videos)) as pool:
        futures = [pool.submit(track, tracker, store, boxes, 2, barrier) for store, boxes in videos]
        at_once = [f.result() for f in futures]
    for sequential, concurrent in zip(one_after_another, at_once):
        assert sequential.keys() == concurrent.keys()
        for step, masks in sequential.items():
            assert all(np.array_equal(mask, concurrent[step][obj_id]) for obj_id, mask in masks.items()), step


def test_a_session_leaves_the_predictor_unchanged() -> None:
    """sam2's RoPEAttention rebinds (and, at image_size != 1024, rebuilds) its table in forward; the tracker
    builds it up front so that concurrent first frames find nothing to rebuild."""
    from sam2.modeling.sam.transformer import RoPEAttention

    from engine.models.sam2_tracker import Sam2Tracker

    tracker = Sam2Tracker.tiny(image_size=SIZE, dtype="float32")  # fresh: no forward has run on it
    tables = {name: m.freqs_cis for name, m in tracker.predictor.named_modules() if isinstance(m, RoPEAttention)}
    assert tables
    track(tracker, make_store(2), {1: BOX_A}, start=0)
    after = {name: m.freqs_cis for name, m in tracker.predictor.named_modules() if isinstance(m, RoPEAttention)}
    assert all(after[name] is table for name, table in tables.items())
