"""Records, Arrow schemas, RLE and config profiles (the dataset's storage: tests/test_storage.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from engine import masks
from engine.config import load_config, profile_names
from engine.errors import ConfigError
from engine.ids import stable_id
from schemas import (
    Assignment,
    ClipRecord,
    EntityRef,
    FrameMask,
    MaskletRecord,
    Provenance,
    arrow_schema,
    from_table,
    to_table,
)

PROV = Provenance(engine_version="0", profile="tiny", models={"detector": "d"}, prompt_hashes={"g": "h"}, config_hash="c")


def _masklet(expression="a dog") -> MaskletRecord:
    mask = np.zeros((24, 32), dtype=bool)
    mask[5:10, 7:20] = True
    return MaskletRecord(
        masklet_id=stable_id("v", expression),
        video_id="v",
        expression=expression,
        noun="dog",
        method="strefer",
        start_frame=3,
        start_time=0.1,
        detector_score=0.5,
        detector_box=[7, 5, 20, 10],
        assignment=Assignment(method="grounder", candidate_index=1, num_candidates=2, score=1.0, grounder_answer="1"),
        num_frames_tracked=4,
        frames=[FrameMask(frame_index=3, timestamp=0.1, rle=masks.encode(mask), box=masks.mask_box(mask))],
        provenance=PROV,
    )


def test_rle_round_trip_and_box():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = masks.encode(mask)
    assert rle.size == [37, 53] and isinstance(rle.counts, str)
    assert np.array_equal(masks.decode(rle), mask)
    assert masks.area(rle) == mask.sum()
    assert masks.mask_box(np.zeros((4, 4), bool)) is None
    m = np.zeros((10, 10), bool)
    m[2:5, 3:9] = True
    assert masks.mask_box(m) == [3, 2, 9, 5]


def test_arrow_schemas_are_explicit_and_round_trip():
    schema = arrow_schema(MaskletRecord)
    assert schema.field("frames").type.value_type.field("rle").type.field("counts").type == pa.string()
    assert pa.types.is_map(schema.field("provenance").type.field("models").type)
    assert schema.field("assignment").type.field("grounder_answer").nullable
    row = _masklet()
    table = to_table(MaskletRecord, [row])
    assert table.schema == schema
    assert from_table(MaskletRecord, table) == [row]
    assert to_table(ClipRecord, []).schema == arrow_schema(ClipRecord)  # empty tables keep their schema


def test_entity_parse():
    assert EntityRef.parse("girl in a blue dress:person") == EntityRef(expression="girl in a blue dress", noun="person")
    assert EntityRef.parse("dog") == EntityRef(expression="dog", noun="dog")
    with pytest.raises(ValueError, match="empty expression"):
        EntityRef.parse(":person")


ROLES = ("detector", "tracker", "box_segmenter", "embedder", "grounder", "llm", "vlm", "region_captioner", "refiner")


def test_profiles_resolve_every_role():
    for name in ("default", "tiny"):  # a paper profile holds its own pipeline's roles (tests/test_videorefer_data.py)
        assert set(load_config(name).roles) == set(ROLES)
    default = load_config("default")
    assert default.roles["llm"] == default.roles["vlm"] == default.roles["grounder"]  # aliases share one spec
    tiny = load_config("tiny")
    assert tiny.is_tiny and not default.is_tiny
    assert tiny.section("masklets")["box_threshold"] == 0.0  # per-profile pipeline override
    assert default.section("masklets")["box_threshold"] == 0.25  # Strefer's released value
    assert default.hash != tiny.hash
    changed = tiny.model_copy(update={"pipeline": {**tiny.pipeline, "masklets": {"track_fps": 1.0}}})
    assert changed.hash != tiny.hash  # the hash follows the settings (no stale cached value)
    moved = tiny.model_copy(update={"pipeline": {**tiny.pipeline, "device": "cuda:1"}})
    assert moved.hash == tiny.hash  # the device does not shape the output
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config("nope")


def test_user_config_merges_over_bundled(tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text(
        "profiles:\n  local:\n"
        + "".join(f"    {r}: {{backend: x, model: /models/{r}}}\n" for r in ROLES[:4])
        + "    llm: {backend: openai, model: served-model, options: {base_url: 'http://127.0.0.1:1/v1'}}\n"
        + "    refiner: llm\n"
        + "pipeline:\n  masklets: {num_sample_frames: 8}\n"
    )
    assert "local" in profile_names(cfg)
    conf = load_config("local", cfg)
    assert conf.roles["tracker"].model == "/models/tracker"
    assert conf.roles["refiner"].backend == "openai"  # a profile defines only the roles it has
    assert "vlm" not in conf.roles
    assert conf.section("masklets")["num_sample_frames"] == 8
    assert conf.section("masklets")["track_fps"] == 10.0  # the rest kept
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipelines: {}\n")
    with pytest.raises(ConfigError, match="unknown top-level keys"):
        load_config("tiny", bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("profiles:\n  x:\n    llm: vlm\n    vlm: llm\n")
    with pytest.raises(ConfigError, match="role llm refers to"):
        load_config("x", loop)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("pipeline:\n  clipper: {treshold: 20}\n", "unknown setting pipeline.clipper.treshold"),
        ("pipeline:\n  masklets: {track_fps: fast}\n", "pipeline.masklets.track_fps"),
        ("pipeline:\n  segmentor: {frame_choice: sometimes}\n", "frame_choice"),
        ("pipeline:\n  nonsense: {a: 1}\n", "unknown setting pipeline.nonsense"),
        ("pipeline:\n  device: 3\n", "pipeline.device must be a str"),
    ],
)
def test_settings_are_validated_when_the_config_loads(tmp_path, yaml_text, message):
    from flows.pipelines import load

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as info:
        load("tiny", str(cfg))
    assert "\n" not in str(info.value)  # one line
    load("tiny")  # the bundled settings validate


def test_factory_checks_role_kinds_and_missing_roles(tmp_path):
    from engine.models import factory

    config = load_config("tiny")
    with pytest.raises(ConfigError, match="role grounder needs a detector backend"):
        factory.build(config, {"grounder": "detector"})
    with pytest.raises(ConfigError, match="has no planner role"):
        factory.build(config, {"planner": "chat"}, pipeline="x")
