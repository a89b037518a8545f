"""Records, Arrow schemas, RLE, config profiles, and the dataset folder's write guarantees."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import masks
from engine.config import load_config, profile_names
from engine.errors import ConfigError
from engine.ids import stable_id
from engine.storage import Dataset
from schemas import (
    TABLES,
    Assignment,
    ClipRecord,
    EntityRef,
    FrameMask,
    MaskletRecord,
    Provenance,
    RejectionRecord,
    VideoRecord,
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


def _video(video_id="v") -> VideoRecord:
    return VideoRecord(
        video_id=video_id, source="a.mp4", content_sha256="0" * 64, duration_s=1.0, fps=10.0, num_frames=10,
        width=32, height=24, rotation=0, codec="h264", decode_width=32, decode_height=24,
    )


def _commit(ds, key, tables, *, pipeline="p", status="done", shard_mb=128):
    with ds.writer(pipeline, shard_mb=shard_mb) as writer:
        writer.add(key, tables, {"status": status, "config_hash": "c", "video_id": key})


def test_rerun_supersedes_and_never_duplicates(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    assert ds.completion("p", "v") is None
    _commit(ds, "v", {"videos": [_video()], "masklets": [_masklet()]})
    _commit(ds, "v", {"videos": [_video()], "masklets": [_masklet()]})  # rerun
    assert ds.completion("p", "v")["status"] == "done"
    assert ds.read_table("masklets").num_rows == 1  # superseded, not duplicated
    assert len(ds.shards("masklets")) == 2 and len(ds.committed_ranges("masklets")) == 1
    assert ds.read_table("rejections").schema == arrow_schema(RejectionRecord)
    manifest = ds.write_manifest(engine_version="0")
    assert manifest["tables"]["masklets"]["rows"] == 1 and manifest["videos"] == ["v"]
    assert manifest["items"] == {"p": {"done": 1}}
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["tables"]["videos"]["rows"] == 1


def test_later_success_supersedes_an_earlier_rejection(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    rejection = RejectionRecord(rejection_id="r", source="a.mp4", stage="input", reason="unreadable_video", detail="x")
    _commit(ds, "a", {"rejections": [rejection]}, status="rejected")
    assert ds.read_table("rejections").num_rows == 1
    _commit(ds, "a", {"videos": [_video("a")]})
    assert ds.read_table("rejections").num_rows == 0 and ds.read_table("videos").num_rows == 1


def test_pipelines_share_a_dataset_and_shards_hold_many_items(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    with ds.writer("one") as writer:
        for i in range(5):
            writer.add(f"k{i}", {"videos": [_video(f"v{i}")]}, {"status": "done", "video_id": f"v{i}"})
    _commit(ds, "k0", {"masklets": [_masklet()]}, pipeline="two")  # same item key, another pipeline
    assert len(ds.shards("videos")) == 1  # one batch, one shard
    assert sorted(ds.read_table("videos").column("video_id").to_pylist()) == [f"v{i}" for i in range(5)]
    assert ds.read_table("masklets").num_rows == 1
    assert {r["pipeline"] for r in ds.completions()} == {"one", "two"}


def test_shards_rotate_by_size_without_splitting_an_item(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    with ds.writer("p", shard_mb=0.0001) as writer:  # about 100 bytes: every item passes it
        for i in range(3):
            writer.add(f"k{i}", {"masklets": [_masklet(f"e{i}"), _masklet(f"f{i}")]}, {"status": "done"})
    assert len(ds.shards("masklets")) == 3
    for record in ds.completions():
        ((name, first, count),) = record["rows"]["masklets"]
        assert count == 2
    assert ds.read_table("masklets").num_rows == 6


def test_killed_write_leaves_no_visible_rows(tmp_path, monkeypatch):
    ds = Dataset(str(tmp_path / "ds"))
    _commit(ds, "a", {"videos": [_video("a")]})

    real_mv = ds.fs.mv
    calls = {"n": 0}

    def dying_mv(src, dst, **kw):  # the process "dies" renaming b's commit record, after its shards
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_mv(src, dst, **kw)

    monkeypatch.setattr(ds.fs, "mv", dying_mv)
    writer = ds.writer("p")
    writer.add("b", {"videos": [_video("b")], "masklets": [_masklet()]}, {"status": "done"})
    with pytest.raises(KeyboardInterrupt):
        writer.flush()  # no `with`: a killed process gets no second try at the end
    monkeypatch.undo()
    assert ds.completion("p", "b") is None  # no commit record: a rerun redoes b
    leftovers = [p for p in (tmp_path / "ds").rglob("*") if p.name.startswith("_tmp-")]
    assert leftovers == []  # the temporary file was removed
    for table in TABLES:
        for shard in ds.shards(table):
            pq.read_table(shard)  # every visible shard is whole
    assert ds.read_table("videos").column("video_id").to_pylist() == ["a"]  # b's orphan rows stay invisible
    assert ds.read_table("masklets").num_rows == 0


def test_fingerprint_is_cheap_and_changes_with_the_file(tmp_path):
    import os

    ds = Dataset(str(tmp_path / "ds"))
    video = tmp_path / "a.bin"
    video.write_bytes(b"x" * 10)
    first = ds.fingerprint(str(video))
    assert first == ds.fingerprint(str(video))
    os.utime(video, (1, 1))
    assert ds.fingerprint(str(video)) != first
    assert ds.fingerprint(str(tmp_path / "missing")) is None


def test_fsspec_memory_url():
    ds = Dataset("memory://engine-test/ds")
    _commit(ds, "v", {"videos": [_video()]})
    assert ds.completion("p", "v")["status"] == "done" and ds.read_table("videos").num_rows == 1
