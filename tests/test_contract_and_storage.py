"""Records, Arrow schemas, RLE, config profiles, and the dataset folder's write guarantees."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import masks
from engine.config import ROLES, load_config, profile_names
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
    assert masks.box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3], [0, 0, 2, 2]]).tolist() == [[1 / 7, 1.0]]


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


def test_profiles_resolve_every_role():
    for name in ("default", "paper", "tiny"):
        assert set(load_config(name).roles) == set(ROLES)
    tiny = load_config("tiny")
    assert tiny.is_tiny and not load_config("default").is_tiny
    assert tiny.section("masklets")["box_threshold"] == 0.0  # per-profile pipeline override
    assert load_config("default").section("masklets")["box_threshold"] == 0.25  # Strefer's released value
    assert load_config("default").hash != tiny.hash
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
        + "".join(f"    {r}: {{backend: x, model: /models/{r}}}\n" for r in ROLES)
        + "pipeline:\n  masklets: {num_sample_frames: 8}\n"
    )
    assert "local" in profile_names(cfg)
    conf = load_config("local", cfg)
    assert conf.roles["tracker"].model == "/models/tracker"
    assert conf.section("masklets")["num_sample_frames"] == 8
    assert conf.section("masklets")["track_fps"] == 10.0  # the rest kept
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipelines: {}\n")
    with pytest.raises(ConfigError, match="unknown top-level keys"):
        load_config("tiny", bad)


def _video(video_id="v") -> VideoRecord:
    return VideoRecord(
        video_id=video_id, source="a.mp4", content_sha256="0" * 64, duration_s=1.0, fps=10.0, num_frames=10,
        width=32, height=24, rotation=0, codec="h264", decode_width=32, decode_height=24,
    )


def test_write_is_complete_and_rerun_overwrites(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    assert not ds.is_complete("v", "c")
    tables = {"videos": [_video()], "masklets": [_masklet()]}
    ds.write_video("v", tables, completion={"config_hash": "c"})
    ds.write_video("v", tables, completion={"config_hash": "c"})  # rerun
    assert ds.is_complete("v", "c") and not ds.is_complete("v", "other")
    assert ds.read_table("masklets").num_rows == 1  # overwritten, not duplicated
    for table in TABLES:  # every table gets a shard, empty ones included, so a rerun replaces all rows
        assert len(ds.shards(table)) == 1
    assert ds.read_table("rejections").schema == arrow_schema(RejectionRecord)
    manifest = ds.write_manifest(engine_version="0")
    assert manifest["tables"]["masklets"]["rows"] == 1 and "v" in manifest["complete_videos"]
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["tables"]["videos"]["rows"] == 1


def test_killed_write_leaves_no_visible_shard(tmp_path, monkeypatch):
    ds = Dataset(str(tmp_path / "ds"))
    ds.write_video("a", {"videos": [_video("a")]}, completion={"config_hash": "c"})

    real_mv = ds.fs.mv
    calls = {"n": 0}

    def dying_mv(src, dst, **kw):  # the process "dies" while renaming the third shard of video b
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_mv(src, dst, **kw)

    monkeypatch.setattr(ds.fs, "mv", dying_mv)
    with pytest.raises(KeyboardInterrupt):
        ds.write_video("b", {"videos": [_video("b")], "masklets": [_masklet()]}, completion={"config_hash": "c"})
    monkeypatch.undo()
    assert not ds.is_complete("b", "c")  # no completion record: a rerun redoes b
    leftovers = [p for p in (tmp_path / "ds").rglob("*") if p.name.startswith("_tmp-")]
    assert leftovers == []  # the temporary file was removed
    for table in TABLES:
        for shard in ds.shards(table):
            pq.read_table(shard)  # every visible shard is whole
    assert ds.read_table("videos").column("video_id").to_pylist() == ["a", "b"]


def test_fsspec_memory_url():
    ds = Dataset("memory://engine-test/ds")
    ds.write_video("v", {"videos": [_video()]}, completion={"config_hash": "c"})
    assert ds.is_complete("v", "c") and ds.read_table("videos").num_rows == 1
