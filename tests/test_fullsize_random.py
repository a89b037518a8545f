"""The `fullsize-random` profile: `default`'s vision architectures at full size with random weights, built
offline from configs (for throughput on any GPU). Here on CPU: they build through the factory, the engine
says their outputs are meaningless, and a `random/...` id a backend cannot build fails before loading."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.config import RoleSpec, load_config
from engine.errors import ConfigError
from engine.models import factory, weights

VISION_ROLES = {"detector": "detector", "tracker": "tracker", "box_segmenter": "box_segmenter", "embedder": "embedder"}


@pytest.fixture
def fresh_factory_cache():
    """The full-size models are big (about 1.3 GB together): drop them from the factory's process-wide cache
    after the test instead of keeping them for the rest of the session."""
    before = dict(factory._LOADED)
    yield
    factory._LOADED.clear()
    factory._LOADED.update(before)


def test_profile_is_default_architectures_with_random_weights() -> None:
    config, default = load_config("fullsize-random"), load_config("default")
    assert set(config.roles) == set(default.roles)
    assert config.is_random and not default.is_random
    for role in VISION_ROLES:
        spec = config.roles[role]
        assert spec.is_random_fullsize and spec.is_random and not spec.is_tiny
        assert spec.backend == default.roles[role].backend
        # the same architecture as default's checkpoint, by name: random/<checkpoint name>
        assert spec.model.removeprefix("random/") == default.roles[role].model.split("/")[-1]
        assert weights.locate(spec, check_hub=False).where == "built from config, full size (random weights)"
    assert config.roles["vlm"].is_tiny  # chat roles: the tiny random VLM (see profiles.yaml)


def test_vision_roles_build_at_full_size_on_cpu(tmp_path, fresh_factory_cache, caplog) -> None:
    # A user's override on top of the bundled profile: the detector at a small resolution keeps CPU time low.
    override = tmp_path / "small.yaml"
    override.write_text("profiles:\n  fullsize-random:\n    detector:\n      options: {resolution: 256}\n")
    config = load_config("fullsize-random", override).model_copy(
        update={"pipeline": {**load_config("fullsize-random").pipeline, "device": "cpu"}}
    )
    with caplog.at_level("WARNING"):
        built = factory.build(config, VISION_ROLES)
    for role in VISION_ROLES:
        assert built[role].model_id == config.roles[role].model
        assert f"{config.roles[role].model} has random weights" in caplog.text

    detector = built["detector"]
    n_params = sum(p.numel() for p in detector.model.parameters())
    assert 170e6 < n_params < 175e6  # grounding-dino-tiny: Swin-T, BERT-base, 6 + 6 layers (172M)
    assert detector.model.config.num_queries == 900 and detector.model.config.max_text_len == 256
    assert len(detector.processor.tokenizer) == 30522
    # Grounding DINO splits phrases at BERT's ids of "." (1012) and "?" (1029); the stand-in vocabulary keeps them.
    assert detector.processor.tokenizer.convert_tokens_to_ids([".", "?", "[CLS]", "[SEP]"]) == [1012, 1029, 101, 102]
    assert detector.processor.image_processor.size.shortest_edge == 800  # the processor's own default size
    assert detector.size == {"shortest_edge": 256, "longest_edge": 427}  # the override's resolution
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[10:30, 20:50] = (200, 40, 40)
    (detections,) = detector.detect([image], ["red box", "person"], box_threshold=0.3, text_threshold=0.25)
    for d in detections:
        assert d.label in ("red box", "person") and 0 <= d.box[0] < d.box[2] <= 64 and 0 <= d.box[1] < d.box[3] <= 48

    assert built["tracker"].image_size == built["box_segmenter"].image_size == 1024  # sam2.1 hiera-s at 1024
    hiera = built["tracker"].predictor.image_encoder.trunk
    assert hiera.stage_ends == [0, 2, 13, 15]  # hiera-small's stages [1, 2, 11, 2]
    assert built["embedder"].input_size == 224 and built["embedder"].dim == 768  # siglip base patch16 224
    assert built["embedder"].embed([image]).shape == (1, 768)


def test_models_command_lists_them_as_built_from_config_with_random_weights(monkeypatch, tmp_path) -> None:
    from flows import cli
    from flows.cli import app

    monkeypatch.setattr(cli.console, "width", 240)  # rich would wrap cells at the runner's 80 columns
    result = CliRunner().invoke(app, ["models", "--profile", "fullsize-random", "--offline"])
    assert result.exit_code == 0, result.output
    for model in ("random/grounding-dino-tiny", "random/sam2.1-hiera-small", "random/siglip-base-patch16-224"):
        rows = [line for line in result.output.splitlines() if model in line]
        assert rows and all("built from config, full size (random weights)" in row for row in rows), model
    assert "missing" not in result.output


def test_card_says_outputs_are_meaningless(tmp_path) -> None:
    from engine.card import dataset_card
    from engine.storage import Dataset
    from schemas import VersionRecord

    dataset = Dataset(str(tmp_path / "ds"))
    dataset.prepare()
    version = dataset.publish(VersionRecord(run_id="r", kind="run", published_at="", engine_version="0", tables={},
                                            settings=[], counts={}, stats="{}"))
    card = dataset_card(dataset, load_config("fullsize-random"), version)
    assert "`fullsize-random` profile" in card and "random weights" in card and "meaningless" in card
    assert "random weights" not in dataset_card(dataset, load_config("default"), version)


def test_random_id_on_a_backend_without_a_full_size_build_fails_before_loading() -> None:
    config = load_config("fullsize-random")
    chat = RoleSpec(backend="transformers", model="random/qwen2.5-vl-7b")
    broken = config.model_copy(update={"roles": {**config.roles, "vlm": chat}})
    with pytest.raises(ConfigError, match="cannot build 'random/qwen2.5-vl-7b' with random weights"):
        factory.build(broken, {"vlm": "chat"})


def test_unknown_full_size_names_are_rejected() -> None:
    from engine.models.grounding_dino import GroundingDinoDetector
    from engine.models.sam2_image import Sam2BoxSegmenter
    from engine.models.sam2_tracker import Sam2Tracker
    from engine.models.siglip import SiglipEmbedder

    with pytest.raises(ValueError, match="random/grounding-dino-tiny"):
        GroundingDinoDetector.random_fullsize(name="random/grounding-dino-huge")
    with pytest.raises(ValueError, match="random/sam2.1-hiera-small"):
        Sam2Tracker.random_fullsize(name="random/sam2.1-hiera-huge", device="cpu")
    with pytest.raises(ValueError, match="random/sam2.1-hiera-small"):
        Sam2BoxSegmenter.random_fullsize(name="random/sam2.1-hiera-huge", device="cpu")
    with pytest.raises(ValueError, match="random/siglip-base-patch16-224"):
        SiglipEmbedder.random_fullsize(name="random/siglip-base-patch16-225")


def test_bert_stand_in_vocabulary_is_deterministic_and_bert_sized() -> None:
    from engine.models.grounding_dino import bert_base_vocab

    vocab = bert_base_vocab()
    assert vocab == bert_base_vocab() and len(vocab) == 30522
    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?")
    assert [vocab[t] for t in specials] == [0, 100, 101, 102, 103, 1012, 1029]
    assert sorted(vocab.values()) == list(range(30522))
