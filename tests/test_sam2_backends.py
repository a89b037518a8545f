"""SAM 2 backends with tiny random models on CPU: shapes, coverage and memory properties, never mask quality
(random weights make mask content meaningless)."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from engine.frame_store import FrameStore
from engine.models.interfaces import BoxSegmenter, Tracker

SIZE = 128  # the smallest image_size at which hiera-t and sam2's mask path run cheaply
H, W = 120, 160  # output resolution (the "video's" size)
BOX_A = (10.0, 20.0, 50.0, 60.0)
BOX_B = (100.0, 70.0, 140.0, 110.0)


def synthetic_frame(i: int) -> np.ndarray:
    """A smooth background with a red square moving right and a still green square."""
    yy, xx = np.mgrid[0:H, 0:W]
    frame = np.stack([xx * 255 // W, yy * 255 // H, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    frame[20:60, 10 + 3 * i : 50 + 3 * i] = (230, 30, 30)
    frame[70:110, 100:140] = (30, 200, 60)
    return frame


def make_store(n: int) -> FrameStore:
    store = FrameStore(size=SIZE)
    for i in range(n):
        store.append(synthetic_frame(i))
    return store


@pytest.fixture(scope="module", params=[True, False], ids=["batched", "per_object"])
def tracker(request):
    """The tracker on each of sam2's predictor classes; pytest builds each once for the module."""
    from engine.models.sam2_tracker import Sam2Tracker

    return Sam2Tracker.tiny(image_size=SIZE, batched=request.param)


@pytest.fixture(scope="module")
def fp32_tracker(tracker):
    """The same predictor in float32, for tests where the dtype does not matter: bf16 autocast is about 4x
    slower on a CPU."""
    from engine.models.sam2_tracker import Sam2Tracker

    return Sam2Tracker(predictor=tracker.predictor, model_id=tracker.model_id, dtype="float32")


@pytest.fixture(scope="module")
def store8() -> FrameStore:
    return make_store(8)


def check_step(position: int, masks: dict[int, np.ndarray], obj_ids: set[int]) -> int:
    assert set(masks) == obj_ids
    for mask in masks.values():
        assert mask.dtype == np.bool_ and mask.shape == (H, W)
    return position


# -- FrameStore ---------------------------------------------------------------------------------------


def test_frame_store_round_trip_and_size() -> None:
    store = make_store(4)
    assert len(store) == 4
    frame = store[2]
    assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
    expected = cv2.resize(synthetic_frame(2), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert np.abs(frame.astype(int) - expected).mean() < 2.0  # JPEG q95
    assert np.array_equal(store[-2], frame)
    # un-squashed back to the source aspect: close to the source, within resize + JPEG loss
    back = store.resized(2, W, H)
    assert back.shape == (H, W, 3)
    assert np.abs(back.astype(int) - synthetic_frame(2)).mean() < 6.0
    fp32_bytes = 4 * SIZE * SIZE * 3 * 4  # what sam2's loader would hold
    assert store.nbytes < fp32_bytes / 20
    assert [f.shape for f in store] == [(SIZE, SIZE, 3)] * 4


def test_frame_store_rejects_bad_input() -> None:
    store = FrameStore(size=SIZE)
    with pytest.raises(ValueError, match="uint8"):
        store.append(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        store.append(np.zeros((10, 10), np.uint8))
    with pytest.raises(IndexError, match="out of range"):
        store[0]
    with pytest.raises(ValueError, match="quality"):
        FrameStore(size=SIZE, quality=0)


# -- tracker ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_mask_prompts_come_back_on_their_frame(tracker, store8) -> None:
    """Each object's mask prompt is its output on the prompted frame, under its own id (sam2.1 takes a mask
    input as the output there, `use_mask_input_as_output_without_sam`), whichever predictor class runs: a
    tracker that dropped, swapped or resized a prompt wrongly would not give it back."""
    assert isinstance(tracker, Tracker)
    assert tracker.model_id == "tiny-random/sam2.1-hiera-t" and tracker.image_size == SIZE
    predictor_module = type(tracker.predictor).__module__
    assert predictor_module == ("sam2.sam2_video_predictor_legacy" if tracker.batched else "sam2.sam2_video_predictor")
    square, tall = np.zeros((H, W), bool), np.zeros((H, W), bool)
    square[70:110, 100:140] = True
    tall[10:70, 20:44] = True
    with tracker.start(store8, height=H, width=W) as session:
        session.add_mask(2, 3, square)
        session.add_mask(2, 5, tall)
        position, masks = next(iter(session.propagate(2)))
    assert position == 2 and set(masks) == {3, 5}
    for obj, prompt in ((3, square), (5, tall)):
        # the prompt went to the model's image size (128 px) and back: only its edge may move
        assert (masks[obj] ^ prompt).sum() <= 0.1 * prompt.sum(), obj


@pytest.mark.integration
def test_forward_then_reverse_cover_every_frame_once(tracker, store8) -> None:
    with tracker.start(store8, height=H, width=W) as session:
        session.add_box(4, 1, BOX_A)
        session.add_box(4, 2, BOX_B)
        forward = [check_step(p, m, {1, 2}) for p, m in session.propagate(4)]
        # reverse from the prompted middle frame, after a forward pass (bf16 autocast; sam2 issue 308)
        reverse = [check_step(p, m, {1, 2}) for p, m in session.propagate(4, reverse=True)]
        assert forward == [4, 5, 6, 7]
        assert reverse == [4, 3, 2, 1, 0]
        assert sorted(set(forward) | set(reverse)) == list(range(8))
        # reverse from a frame that was never prompted (the case sam2 issue 308 is about)
        assert [p for p, _ in session.propagate(6, reverse=True)] == [6, 5, 4, 3, 2, 1, 0]
        # the contract includes `start` also where sam2 would yield nothing (reverse from frame 0)
        assert [p for p, _ in session.propagate(0, reverse=True)] == [0]
        assert session.stats.counters["tracker_passes"] == 4


@pytest.mark.integration
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pass_starting_beyond_the_prompt(tracker, dtype) -> None:
    """The first frame of such a pass sees only the prompt's memory: sam2 issue 308 without autocast."""
    from engine.models.sam2_tracker import Sam2Tracker

    store = make_store(5)
    t = Sam2Tracker(predictor=tracker.predictor, model_id=tracker.model_id, dtype=dtype)
    for start, reverse, expected in ((3, True, [3, 2, 1, 0]), (1, False, [1, 2, 3, 4])):
        with t.start(store, height=H, width=W) as session:
            session.add_box(2, 1, BOX_A)
            assert [check_step(p, m, {1}) for p, m in session.propagate(start, reverse=reverse)] == expected


@pytest.mark.integration
def test_reverse_first_from_prompted_frame(tracker, store8) -> None:
    with tracker.start(store8, height=H, width=W) as session:
        session.add_box(3, 7, BOX_A)
        assert [check_step(p, m, {7}) for p, m in session.propagate(3, reverse=True)] == [3, 2, 1, 0]


@pytest.mark.integration
def test_mask_prompt(tracker, store8) -> None:
    mask = np.zeros((H, W), bool)
    mask[70:110, 100:140] = True
    with tracker.start(store8, height=H, width=W) as session:
        session.add_mask(6, 3, mask)
        session.add_box(6, 4, BOX_A)
        assert [check_step(p, m, {3, 4}) for p, m in session.propagate(6)] == [6, 7]


@pytest.mark.integration
def test_pruning_bounds_stored_outputs(fp32_tracker) -> None:
    from engine.models.sam2_tracker import Sam2Tracker

    # a second tracker on the same predictor, with a small window (stored_outputs counts the batched
    # predictor's consolidated outputs too)
    small = Sam2Tracker(
        predictor=fp32_tracker.predictor, model_id=fp32_tracker.model_id, keep_window=2, dtype="float32"
    )
    store = make_store(10)
    with small.start(store, height=H, width=W) as session:
        session.add_box(0, 1, BOX_A)
        session.add_box(0, 2, BOX_B)
        peak = 0
        for _ in session.propagate(0):
            counts = session.stored_outputs()
            peak = max(peak, counts["non_cond"])
            assert counts["cond"] == 2 and counts["cached_features"] <= 1
        assert peak <= 2 * (2 + 1)  # two objects, window + the current frame
        assert session.stats.counters["tracker_pruned_outputs"] > 0
        for _ in session.propagate(9, reverse=True):
            # this pass's window and what the last pass left within its window
            assert session.stored_outputs()["non_cond"] <= 2 * 2 * (2 + 1)
    with fp32_tracker.start(store, height=H, width=W) as unpruned:  # what sam2 would keep: every tracked frame
        unpruned.add_box(0, 1, BOX_A)
        for _ in unpruned.propagate(0):
            pass
        assert unpruned.stored_outputs()["non_cond"] == 9


@pytest.mark.integration
def test_exact_window_pruning_changes_no_mask(fp32_tracker) -> None:
    from engine.models.sam2_tracker import Sam2Tracker

    window = fp32_tracker.exact_keep_window
    assert window == 15  # sam2.1: 16 object pointers (15 behind), 7 memory frames
    store = make_store(window + 5)
    results = []
    for keep in (window, None):
        t = Sam2Tracker(
            predictor=fp32_tracker.predictor, model_id=fp32_tracker.model_id, keep_window=keep, dtype="float32"
        )
        with t.start(store, height=H, width=W) as session:
            session.add_box(0, 1, BOX_A)
            results.append([m[1] for _, m in session.propagate(0)])
            if keep is not None:
                assert session.stats.counters["tracker_pruned_outputs"] > 0
    assert all(np.array_equal(a, b) for a, b in zip(*results))


@pytest.mark.integration
def test_frames_are_converted_lazily_and_normalized(fp32_tracker, store8) -> None:
    import torch

    tracker = fp32_tracker
    with tracker.start(store8, height=H, width=W) as session:
        images = session._state["images"]
        assert len(images) == 8
        tensor = images[5]
        assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
        assert tensor.device == tracker.predictor.device
        rgb = store8[5].astype(np.float32) / 255.0
        expected = (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        np.testing.assert_allclose(tensor.cpu().numpy(), expected.transpose(2, 0, 1), atol=1e-5)
        # the images object holds no frame: its only tensors are the 3-value mean and std
        held = [v for v in vars(images).values() if isinstance(v, torch.Tensor)]
        assert sum(v.numel() for v in held) == 6
        session.add_box(2, 1, BOX_A)
        before = images.conversions
        for _ in session.propagate(2):
            assert session.stored_outputs()["cached_features"] <= 1  # one fp32 frame alive in sam2
        # frames 3..7 once each; frame 2's features were still cached from the prompt
        assert images.conversions - before == 5


@pytest.mark.integration
def test_each_frame_is_read_once_per_pass_with_prefetch(fp32_tracker, store8) -> None:
    reads: list[int] = []

    class CountingSource:
        def __len__(self) -> int:
            return len(store8)

        def __getitem__(self, position: int) -> np.ndarray:
            reads.append(position)
            return store8[position]

    with fp32_tracker.start(CountingSource(), height=H, width=W) as session:
        session.add_box(2, 1, BOX_A)
        reads.clear()
        assert [p for p, _ in session.propagate(2)] == list(range(2, 8))
        assert sorted(reads) == [3, 4, 5, 6, 7]  # frame 2 was cached by the prompt; prefetch wastes none
        reads.clear()
        assert [p for p, _ in session.propagate(7, reverse=True)] == list(range(7, -1, -1))
        # frame 7 was still cached; frame 2 (the prompt, a conditioning frame) is the one wasted prefetch
        assert sorted(reads) == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.integration
def test_state_mirrors_sam2_init_state(tracker, store8, tmp_path) -> None:
    """Our hand-built inference state is what the predictor's own init_state builds (catches sam2 drift):
    the same keys, value types, and empty containers."""
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), cv2.cvtColor(store8[i], cv2.COLOR_RGB2BGR))
    reference = tracker.predictor.init_state(str(tmp_path))
    with tracker.start(store8, height=H, width=W) as session:
        ours = session._state
        assert set(ours) == set(reference)
        for key, value in reference.items():
            if key in ("images", "cached_features"):  # ours are lazy; init_state's warm-up fills its cache
                continue
            assert type(ours[key]) is type(value), key
            if isinstance(value, (dict, list, set, bool)):
                assert ours[key] == value, key


@pytest.mark.integration
def test_session_validates_arguments(tracker, store8) -> None:
    session = tracker.start(store8, height=H, width=W)
    with pytest.raises(ValueError, match="before any prompt"):
        session.propagate(0)
    with pytest.raises(ValueError, match="out of range"):
        session.add_box(8, 1, BOX_A)
    with pytest.raises(ValueError, match="outside"):
        session.add_box(0, 1, (200.0, 10.0, 260.0, 50.0))
    with pytest.raises(ValueError, match="xyxy"):
        session.add_box(0, 1, (50.0, 10.0, 20.0, 40.0))
    with pytest.raises(ValueError, match="output shape"):
        session.add_mask(0, 1, np.ones((SIZE, SIZE), bool))
    with pytest.raises(ValueError, match="empty"):
        session.add_mask(0, 1, np.zeros((H, W), bool))
    session.add_box(0, 1, (-5.0, -5.0, 40.0, 40.0))  # partly outside: clipped, accepted
    with pytest.raises(ValueError, match="out of range"):
        session.propagate(-1)
    session.close()
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.add_box(0, 1, BOX_A)
    with pytest.raises(ValueError, match="dtype"):
        type(tracker)(predictor=tracker.predictor, model_id="x", dtype="float16")
    with pytest.raises(ValueError, match="batched="):
        type(tracker)(predictor=tracker.predictor, model_id="x", batched=not tracker.batched)
    with pytest.raises(ValueError, match="video predictor"):
        type(tracker)(predictor=object(), model_id="x")
    with pytest.raises(ValueError, match="empty FrameSource"):
        tracker.start(FrameStore(size=SIZE), height=H, width=W)
    too_big = FrameStore(size=SIZE * 2)
    too_big.append(synthetic_frame(0))
    with pytest.raises(ValueError, match="image_size"):
        tracker.start(too_big, height=H, width=W)


@pytest.mark.integration
def test_no_prompt_while_propagating(tracker, store8) -> None:
    with tracker.start(store8, height=H, width=W) as session:
        session.add_box(0, 1, BOX_A)
        steps = session.propagate(0)
        next(steps)
        with pytest.raises(RuntimeError, match="while a propagation"):
            session.add_box(3, 2, BOX_B)
        steps.close()  # an abandoned pass frees the session
        if tracker.batched:
            # sam2's batched predictor takes every prompt before tracking starts
            with pytest.raises(RuntimeError, match="before the first propagation"):
                session.add_box(3, 2, BOX_B)
            with pytest.raises(RuntimeError, match="before the first propagation"):
                session.add_box(3, 1, BOX_B)  # a known object on a new frame would make the others absent
        else:
            session.add_box(3, 2, BOX_B)


def test_weights_resolution_fails_with_a_message(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    from engine.errors import MissingWeightsError
    from engine.models.sam2_tracker import resolve_sam2_weights

    with pytest.raises(ValueError, match="unknown SAM 2 model"):
        resolve_sam2_weights("facebook/not-a-sam2", None)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        resolve_sam2_weights(str(tmp_path / "missing.pt"), None)
    odd = tmp_path / "weights.pt"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match="pass config="):
        resolve_sam2_weights(str(odd), None)
    assert resolve_sam2_weights(str(odd), "configs/sam2.1/sam2.1_hiera_s.yaml")[1] == str(odd)
    named = tmp_path / "sam2.1_hiera_small.pt"
    named.write_bytes(b"")
    assert resolve_sam2_weights(str(named), None)[0] == "configs/sam2.1/sam2.1_hiera_s.yaml"

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(MissingWeightsError, match="sam2.1_hiera_small.pt"):
        resolve_sam2_weights("facebook/sam2.1-hiera-small", None)


# -- box segmenter ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_box_segmenter_returns_one_bool_mask_per_box() -> None:
    from engine.models.sam2_image import Sam2BoxSegmenter

    segmenter = Sam2BoxSegmenter.tiny(image_size=SIZE)
    assert isinstance(segmenter, BoxSegmenter)
    image = synthetic_frame(0)
    for boxes in (np.array([BOX_A, BOX_B]), np.array([BOX_A]), np.zeros((0, 4))):
        masks = segmenter.segment(image, boxes)
        assert masks.shape == (len(boxes), H, W) and masks.dtype == np.bool_
    with pytest.raises(ValueError, match="outside"):
        segmenter.segment(image, np.array([[170.0, 0.0, 180.0, 10.0]]))
    # several videos in flight share one segmenter: calls from threads give what calls one by one give
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(synthetic_frame(i), np.array([BOX_A, BOX_B][: 1 + i % 2])) for i in range(6)]
    alone = [segmenter.segment(im, b) for im, b in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: segmenter.segment(*job), jobs))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_importing_backends_does_not_import_torch() -> None:
    code = (
        "import sys, engine.models.sam2_tracker, engine.models.sam2_image, engine.frame_store;"
        "sys.exit(int('torch' in sys.modules or 'sam2' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_frame_store_spills_past_its_memory_budget_and_cleans_up():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    store = FrameStore(size=32, memory_budget_mb=2 / 1024)  # 2 KB: a noisy 32x32 JPEG is ~1 KB
    for frame in frames:
        store.append(frame)
    assert 0 < store.spilled < len(store) and store.nbytes <= 2048
    reference = FrameStore(size=32, memory_budget_mb=None)
    for frame in frames:
        reference.append(frame)
    assert all(np.array_equal(store[i], reference[i]) for i in range(len(frames)))
    folder = store._spill_dir
    assert folder is not None and folder.exists()
    store.close()
    assert not folder.exists() and len(store) == 0
