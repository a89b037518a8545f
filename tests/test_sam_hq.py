"""HQ-SAM box segmenter with a tiny random model on CPU: shapes, box handling, wiring and the exact geometry of
pre- and post-processing (random weights make mask content meaningless, so geometry is checked with fixed
masks and the boxes the model is given)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from engine.config import EngineConfig, RoleSpec
from engine.errors import ConfigError, MissingWeightsError
from engine.models import factory, weights
from engine.models.interfaces import BoxSegmenter

H, W = 120, 160
BOX_A = (10.0, 20.0, 50.0, 60.0)
BOX_B = (100.0, 70.0, 140.0, 110.0)
BOX_C = (30.0, 5.0, 150.0, 115.0)


def scene() -> np.ndarray:
    """A smooth background with a red and a green square."""
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([xx * 255 // W, yy * 255 // H, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    image[20:60, 10:50] = (230, 30, 30)
    image[70:110, 100:140] = (30, 200, 60)
    return image


@pytest.fixture(scope="module")
def segmenter():
    from engine.models.sam_hq import SamHqBoxSegmenter

    return SamHqBoxSegmenter.tiny()


@pytest.fixture
def offline(monkeypatch):
    """No hub: huggingface_hub's offline mode, in which any HTTP request it would make raises."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(weights, "hub_reachable", lambda: False)


@pytest.fixture
def fresh_factory_cache(monkeypatch):
    monkeypatch.setattr(factory, "_LOADED", {})


def box_config(model: str, **options) -> EngineConfig:
    spec = RoleSpec(backend="hq-sam", model=model, options=options)
    return EngineConfig(profile="test", roles={"box_segmenter": spec}, pipeline={"device": "cpu"})


def test_tiny_builds_offline_and_is_a_box_segmenter(offline) -> None:
    from engine.models.sam_hq import TINY_MODEL_ID, SamHqBoxSegmenter

    segmenter = SamHqBoxSegmenter.tiny()
    assert isinstance(segmenter, BoxSegmenter)
    assert segmenter.model_id == TINY_MODEL_ID == "tiny-random/sam-hq"
    assert segmenter.dtype == "float32"  # auto on a CPU
    assert sum(p.numel() for p in segmenter.model.parameters()) < 200_000
    # the HQ decoder reads the encoder's global-attention block, so the tiny model has one
    assert segmenter.model.config.vision_config.global_attn_indexes == [1]


def test_segment_returns_one_bool_mask_per_box(segmenter) -> None:
    image = scene()
    for boxes in (np.array([BOX_A, BOX_B, BOX_C]), np.array([BOX_A]), np.zeros((0, 4)), []):
        masks = segmenter.segment(image, boxes)
        assert masks.shape == (len(boxes), H, W) and masks.dtype == np.bool_
    # one batched forward gives each box what a forward of that box alone gives (up to pixels whose logit is
    # within rounding of the threshold: the batched matmuls may sum in another order)
    together = segmenter.segment(image, np.array([BOX_A, BOX_B, BOX_C]))
    alone = np.stack([segmenter.segment(image, np.array([box]))[0] for box in (BOX_A, BOX_B, BOX_C)])
    assert (together != alone).mean() < 1e-3
    with pytest.raises(ValueError, match="RGB uint8"):
        segmenter.segment(image.astype(np.float32), np.array([BOX_A]))
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        segmenter.segment(image, np.array([1.0, 2.0, 3.0, 4.0]))


def test_boxes_are_clipped_and_scaled_to_the_model_input(segmenter, monkeypatch) -> None:
    image = scene()
    overshoot = np.array([[-15.0, -8.0, W + 30.0, 50.0], [100.0, 70.0, W + 5.0, H + 12.0]])
    clipped = np.array([[0.0, 0.0, W, 50.0], [100.0, 70.0, W, H]])
    assert np.array_equal(segmenter.segment(image, overshoot), segmenter.segment(image, clipped))
    with pytest.raises(ValueError, match="outside"):
        segmenter.segment(image, np.array([[W + 1.0, 0.0, W + 9.0, 10.0]]))

    # What the model is given: the clipped boxes in the resized image's pixels (longest edge 160 -> 128).
    seen = {}
    forward = segmenter.model.forward

    def spy(**kwargs):
        seen.update(kwargs)
        return forward(**kwargs)

    monkeypatch.setattr(segmenter.model, "forward", spy)
    segmenter.segment(image, overshoot)
    assert tuple(seen["pixel_values"].shape) == (1, 3, 128, 128)
    assert seen["multimask_output"] is False
    np.testing.assert_allclose(seen["input_boxes"][0].numpy(), clipped * 128 / W, atol=1e-5)


def test_post_processing_puts_a_known_mask_back_in_place() -> None:
    """A fixed low-resolution mask on the padded 1024 px square comes back as the same rectangle on a 480x640
    image (scale 1.6, padding below the image dropped), with no weights involved."""
    import torch

    from engine.models.sam_hq import _processor, masks_to_image

    processor = _processor(1024)
    image = np.zeros((480, 640, 3), np.uint8)
    reshaped = tuple(int(v) for v in processor(images=image, return_tensors="pt")["reshaped_input_sizes"][0])
    assert reshaped == (768, 1024)
    low_res = torch.full((2, 1, 256, 256), -10.0)
    # 256 px of mask cover 1024 px of input, 1024 / 640 = 1.6 px of input per image pixel: 2.5 px a cell.
    low_res[0, 0, 48:96, 64:128] = 10.0  # image rows 120-240, columns 160-320
    low_res[1, 0, 200:256, :] = 10.0  # only padding (the image ends at row 192 of 256)
    masks = masks_to_image(processor, low_res, original_size=(480, 640), reshaped_size=reshaped)
    expected = np.zeros((480, 640), bool)
    expected[120:240, 160:320] = True
    assert masks.shape == (2, 480, 640) and masks.dtype == np.bool_
    rows, cols = np.nonzero(masks[0])
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (120, 240, 160, 320)  # exact edges
    assert not (masks[0] & ~expected).any() and (expected & ~masks[0]).sum() == 4  # bilinear rounds the corners
    assert not masks[1].any()


def test_calls_from_threads_match_calls_one_by_one(segmenter) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    jobs = [(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), np.array([BOX_A, BOX_B][: 1 + i % 2])) for i in range(6)]
    alone = [segmenter.segment(im, b) for im, b in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: segmenter.segment(*job), jobs))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_factory_builds_it_from_a_profile_spec(offline, fresh_factory_cache) -> None:
    from engine.models.sam_hq import SamHqBoxSegmenter

    built = factory.build(box_config("tiny-random/sam-hq", hq_token_only=True), {"box_segmenter": "box_segmenter"})
    segmenter = built["box_segmenter"]
    assert isinstance(segmenter, SamHqBoxSegmenter) and segmenter.hq_token_only
    assert segmenter.model_id == "tiny-random/sam-hq" and segmenter.device == "cpu"
    assert segmenter.segment(scene(), np.array([BOX_A])).shape == (1, H, W)
    with pytest.raises(ConfigError, match="needs a tracker backend, got 'hq-sam'"):
        factory.build(EngineConfig(profile="test", roles={"tracker": box_config("x").roles["box_segmenter"]},
                                   pipeline={"device": "cpu"}), {"tracker": "tracker"})


def test_paper_videorefer_profile_uses_hq_sam() -> None:
    from engine.config import load_config

    spec = load_config("paper-videorefer").roles["box_segmenter"]
    assert (spec.backend, spec.model) == ("hq-sam", "syscv-community/sam-hq-vit-huge")
    assert load_config("default").roles["box_segmenter"].backend == "sam2-image"


def test_missing_local_checkpoint_fails_fast_naming_it(offline, fresh_factory_cache, tmp_path) -> None:
    from engine.models.sam_hq import SamHqBoxSegmenter

    missing = str(tmp_path / "sam-hq-vit-huge")
    with pytest.raises(MissingWeightsError, match="sam-hq-vit-huge"):
        factory.build(box_config(missing), {"box_segmenter": "box_segmenter"})
    assert not factory._LOADED  # failed before loading anything
    with pytest.raises(MissingWeightsError, match=f"no folder '{missing}'"):
        SamHqBoxSegmenter.from_pretrained(missing, device="cpu")


def test_from_pretrained_loads_a_local_folder(segmenter, offline, tmp_path) -> None:
    from engine.models.sam_hq import SamHqBoxSegmenter

    segmenter.model.save_pretrained(tmp_path)
    segmenter.processor.save_pretrained(tmp_path)
    loaded = SamHqBoxSegmenter.from_pretrained(str(tmp_path), device="cpu")
    assert loaded.model_id == str(tmp_path) and loaded.dtype == "float32"
    boxes = np.array([BOX_A, BOX_C])
    assert np.array_equal(loaded.segment(scene(), boxes), segmenter.segment(scene(), boxes))
    with pytest.raises(ValueError, match="dtype must be one of"):
        SamHqBoxSegmenter.from_pretrained(str(tmp_path), device="cpu", dtype="float16")


def test_random_fullsize_names_the_released_architectures() -> None:
    from engine.models.sam_hq import SamHqBoxSegmenter

    with pytest.raises(ValueError, match="random/sam-hq-vit-base, random/sam-hq-vit-large, random/sam-hq-vit-huge"):
        SamHqBoxSegmenter.random_fullsize(name="random/sam-hq-vit-giant")


@pytest.mark.integration
def test_random_fullsize_base_has_the_released_shape() -> None:
    from engine.models.sam_hq import SamHqBoxSegmenter

    segmenter = SamHqBoxSegmenter.random_fullsize(name="random/sam-hq-vit-base", device="cpu")
    assert segmenter.model_id == "random/sam-hq-vit-base"
    assert 94e6 < sum(p.numel() for p in segmenter.model.parameters()) < 96e6  # SAM ViT-B's 93.7M + HQ decoder
    assert segmenter.processor.image_processor.size["longest_edge"] == 1024
    # the HQ decoder compresses the encoder's 768-d features
    assert segmenter.model.mask_decoder.compress_vit_conv1.in_channels == 768


def test_importing_the_backend_does_not_import_torch() -> None:
    code = "import sys, engine.models.sam_hq; sys.exit(int({'torch', 'transformers'} & set(sys.modules) != set()))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
