"""transformers backends (Grounding DINO, SigLIP) with tiny random models on CPU, plus
their pure helpers on fixed inputs, the Set-of-Mark drawing and the prompt templates.

Random weights make the models' answers meaningless: these tests check shapes, contracts, batching and
wiring, never quality."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.draw import draw_numbered_boxes, palette
from engine.errors import MissingWeightsError
from engine.models.grounding_dino import build_prompt, map_label, nms_per_label, normalize_phrases
from engine.models.interfaces import Detection, Detector, Embedder
from engine.models.siglip import preprocess
from tests.synthetic import blocky_scene as scene

H, W = 96, 160
PHRASES = ["Person", "dog", "red ball"]




# ---------------------------------------------------------------- prompts


def test_render_fills_rexseek_sentence() -> None:
    from prompts import render

    text = render("grounder", referring="the red ball", n=3)
    assert "Please detect the red ball in this image. Answer the question with object indexes." in text
    assert "0 to 2" in text
    assert text == text.strip()


def test_render_rejects_missing_variable_and_bad_name() -> None:
    import jinja2

    from prompts import render

    with pytest.raises(jinja2.UndefinedError):
        render("grounder", referring="the dog")  # n missing
    with pytest.raises(ValueError, match="lowercase"):
        render("../grounder")
    with pytest.raises(ValueError, match="no prompt template"):
        render("no_such_prompt")


def test_template_hash_is_stable_content_hash() -> None:
    import prompts
    from prompts import template_hash

    content = (Path(prompts.__file__).parent / "grounder.j2").read_bytes()
    assert template_hash("grounder") == template_hash("grounder") == hashlib.sha256(content).hexdigest()[:12]
    assert len(template_hash("grounder")) == 12


# ---------------------------------------------------------------- drawing


def test_draw_numbered_boxes_marks_borders_and_keeps_input() -> None:
    image = np.full((120, 160, 3), 60, dtype=np.uint8)
    before = image.copy()
    out = draw_numbered_boxes(image, [(20, 30, 100, 110), (110, 10, 150, 60)])
    assert np.array_equal(image, before)
    assert out.shape == image.shape and out.dtype == np.uint8 and out is not image
    assert tuple(out[80, 20]) == palette(2)[0]  # left border of box 0, below its tag
    assert tuple(out[40, 150]) == palette(2)[1]  # right border of box 1
    assert np.array_equal(out[60:100, 40:90], image[60:100, 40:90])  # the inside stays visible
    assert not np.array_equal(out[30:45, 20:35], image[30:45, 20:35])  # the tag of box 0


def test_draw_numbered_boxes_custom_labels_and_errors() -> None:
    image = np.zeros((50, 50, 3), dtype=np.uint8)
    assert np.array_equal(draw_numbered_boxes(image, []), image)
    assert draw_numbered_boxes(image, [(0, 0, 49, 49)], labels=["A"]).any()
    with pytest.raises(ValueError, match="labels"):
        draw_numbered_boxes(image, [(0, 0, 10, 10)], labels=["a", "b"])
    with pytest.raises(ValueError, match="RGB uint8"):
        draw_numbered_boxes(image.astype(np.float32), [])
    drawn = draw_numbered_boxes(image, [(10, 20, 40, 45)], labels=["dog"], colors=[(200, 10, 10)])
    assert tuple(drawn[30, 10]) == (200, 10, 10)  # the render's own color per masklet
    with pytest.raises(ValueError, match="colors"):
        draw_numbered_boxes(image, [(0, 0, 10, 10)], colors=[])


def test_palette_is_distinct_bright_and_prefix_stable() -> None:
    colors = palette(12)
    assert len(set(colors)) == 12
    assert all(max(c) >= 200 for c in colors)
    assert palette(3) == colors[:3]
    assert palette(0) == []


# ---------------------------------------------------------------- Grounding DINO helpers


def test_build_prompt_and_phrase_validation() -> None:
    assert build_prompt(["Person", " Red  Ball. ", "person"]) == "person. red ball."
    assert normalize_phrases(["Dog", "dog"]) == ["dog"]
    for bad in ([], [""], ["a. b"], "dog"):
        with pytest.raises(ValueError):
            normalize_phrases(bad)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("red ball", "red ball"),  # exact
        ("Red Ball [SEP]", "red ball"),  # exact once special tokens and case are ignored
        ("ball", "red ball"),  # contained in a phrase
        ("big dog", "dog"),  # contains a phrase
        ("person dog", "person"),  # contains two: equal overlap, the earlier phrase wins
        ("person. red ball.", "red ball"),  # contains two: higher overlap wins
        ("ball red", "red ball"),  # no containment, word overlap
        ("cat", None),
        ("[SEP]", None),
        ("", None),
    ],
)
def test_map_label(label: str, expected: str | None) -> None:
    assert map_label(label, ["person", "dog", "red ball"]) == expected


def test_nms_per_label_drops_duplicates_within_a_label_only() -> None:
    dets = [
        Detection(box=(0, 0, 10, 10), score=0.6, label="dog"),
        Detection(box=(0, 0, 10, 11), score=0.9, label="dog"),  # IoU 0.91 with the first: duplicate
        Detection(box=(0, 0, 10, 10), score=0.8, label="cat"),  # same place, other label: kept
        Detection(box=(50, 50, 60, 60), score=0.5, label="dog"),  # far away: kept
    ]
    kept = nms_per_label(dets, iou_threshold=0.7)
    assert kept == [dets[1], dets[2], dets[3]]  # best score first
    assert len(nms_per_label(dets, iou_threshold=0.95)) == 4
    assert nms_per_label([], iou_threshold=0.7) == []


# ---------------------------------------------------------------- Grounding DINO detector


@pytest.fixture(scope="module")
def detector():
    from engine.models.grounding_dino import GroundingDinoDetector

    return GroundingDinoDetector.tiny(seed=0)


@pytest.mark.integration
def test_detector_returns_phrase_labels_and_boxes_inside_images(detector) -> None:
    assert isinstance(detector, Detector) and detector.model_id == "tiny-random/grounding-dino"
    images = [scene(0), scene(1, height=120, width=90)]
    results = detector.detect(images, PHRASES, box_threshold=0.3, text_threshold=0.25)
    assert len(results) == 2
    assert sum(len(r) for r in results) > 0
    for image, dets in zip(images, results):
        h, w = image.shape[:2]
        for d in dets:
            assert d.label in PHRASES  # the caller's own spelling ("Person"), not the prompt's
            assert 0.3 < d.score <= 1.0
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        for label in {d.label for d in dets}:  # per-label NMS ran: no duplicates above the IoU limit
            import torch
            from torchvision.ops import box_iou

            boxes = torch.tensor([d.box for d in dets if d.label == label])
            iou = box_iou(boxes, boxes).fill_diagonal_(0)
            assert float(iou.max()) <= detector.nms_iou


@pytest.mark.integration
def test_detector_batched_equals_per_image(detector) -> None:
    # Same-size images: the batch needs no padding, so each row sees exactly its single-image input.
    images = [scene(i) for i in range(3)]
    batched = detector.detect(images, PHRASES, box_threshold=0.3, text_threshold=0.25)
    single = [detector.detect([im], PHRASES, box_threshold=0.3, text_threshold=0.25)[0] for im in images]
    for b, s in zip(batched, single):
        assert [d.label for d in b] == [d.label for d in s]
        np.testing.assert_allclose([d.box for d in b], [d.box for d in s], atol=1e-3)
        np.testing.assert_allclose([d.score for d in b], [d.score for d in s], atol=1e-4)


@pytest.mark.integration
def test_detector_rejects_bad_arguments(detector) -> None:
    assert detector.detect([], PHRASES, box_threshold=0.3, text_threshold=0.25) == []
    with pytest.raises(ValueError, match="empty"):
        detector.detect([scene(0)], [], box_threshold=0.3, text_threshold=0.25)
    with pytest.raises(ValueError, match="box_threshold"):
        detector.detect([scene(0)], PHRASES, box_threshold=1.5, text_threshold=0.25)
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect([scene(0).astype(np.float32)], PHRASES, box_threshold=0.3, text_threshold=0.25)
    with pytest.raises(ValueError, match="max_text_len"):  # the tiny model reads 32 tokens at most
        detector.detect([scene(0)], [f"dog {i}" for i in range(20)], box_threshold=0.3, text_threshold=0.25)


@pytest.mark.integration
def test_detector_from_pretrained_local_folder(detector, tmp_path) -> None:
    from engine.models.grounding_dino import GroundingDinoDetector

    detector.model.save_pretrained(tmp_path)
    detector.processor.save_pretrained(tmp_path)
    loaded = GroundingDinoDetector.from_pretrained(str(tmp_path), device="cpu")
    args = dict(box_threshold=0.3, text_threshold=0.25)
    assert loaded.detect([scene(0)], PHRASES, **args) == detector.detect([scene(0)], PHRASES, **args)
    with pytest.raises(MissingWeightsError, match="no folder"):
        GroundingDinoDetector.from_pretrained(str(tmp_path / "absent"))


# ---------------------------------------------------------------- SigLIP


def test_siglip_preprocess_squashes_and_normalises_with_half() -> None:
    # Left quarter black, the rest white, 4 x 16: squashed to 4 x 4 the first column stays black.
    # (CLIP's center crop would keep only white columns 6-9.)
    image = np.full((4, 16, 3), 255, dtype=np.uint8)
    image[:, :4] = 0
    pixels = preprocess([image], 4)
    assert pixels.shape == (1, 3, 4, 4) and str(pixels.dtype) == "torch.float32"
    expected = np.tile(np.array([-1.0, 1.0, 1.0, 1.0], dtype=np.float32), (3, 4, 1))
    np.testing.assert_allclose(pixels[0].numpy(), expected, atol=1e-6)
    # mean = std = 0.5: 51 / 255 = 0.2 -> (0.2 - 0.5) / 0.5 = -0.6
    flat = preprocess([np.full((4, 4, 3), 51, dtype=np.uint8)], 4)
    np.testing.assert_allclose(flat.numpy(), -0.6, atol=1e-6)


def test_siglip_preprocess_matches_siglip_image_processor_at_input_size() -> None:
    from transformers import SiglipImageProcessor

    image = scene(3, height=64, width=64)
    reference = SiglipImageProcessor(size={"height": 64, "width": 64})(images=image, return_tensors="pt")
    np.testing.assert_allclose(preprocess([image], 64).numpy(), reference.pixel_values.numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def embedder():
    from engine.models.siglip import SiglipEmbedder

    return SiglipEmbedder.tiny(seed=0, batch_size=3)


@pytest.mark.integration
def test_embedder_returns_unit_norm_float32(embedder) -> None:
    assert isinstance(embedder, Embedder) and embedder.input_size == 64
    images = [scene(i, 64, 64) for i in range(7)] + [scene(7, H, W)]  # other sizes are squashed too
    vectors = embedder.embed(images)
    assert vectors.shape == (8, embedder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])
    from engine.models.siglip import SiglipEmbedder

    one_batch = SiglipEmbedder(model=embedder.model, model_id=embedder.model_id, batch_size=32).embed(images)
    np.testing.assert_allclose(vectors, one_batch, atol=1e-5)  # batching does not change embeddings
    assert embedder.embed([]).shape == (0, embedder.dim)
    with pytest.raises(ValueError, match="RGB uint8"):
        embedder.embed([np.zeros((64, 64), dtype=np.uint8)])


@pytest.mark.integration
def test_embedder_loads_vision_tower_of_full_siglip_checkpoint(tmp_path) -> None:
    import torch
    from transformers import SiglipConfig, SiglipModel

    from engine.models.siglip import SiglipEmbedder

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    full = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    full.save_pretrained(tmp_path)
    images = [scene(i, 64, 64) for i in range(2)]
    loaded = SiglipEmbedder.from_pretrained(str(tmp_path), device="cpu")
    via_full_model = SiglipEmbedder(model=full, model_id="full")  # get_image_features path
    assert not hasattr(loaded.model, "text_model")
    np.testing.assert_allclose(loaded.embed(images), via_full_model.embed(images), atol=1e-5)


# ---------------------------------------------------------------- import cost


def test_backend_modules_import_without_torch() -> None:
    code = (
        "import sys, engine.models.grounding_dino, engine.models.siglip, engine.models.chat_transformers, "
        "engine.models.tiny_vlm, engine.draw, prompts; "
        "sys.exit(1 if {'torch', 'transformers', 'cv2'} & set(sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
