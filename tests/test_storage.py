"""The dataset on Delta Lake tables: commits of many items, the committed view, supersession, orphans of a
killed flush (a real SIGKILL), two writer processes, versions, diff, compaction, and the old layout refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.errors import BadInputError
from engine.ids import stable_id
from engine.planning import Fingerprints, fingerprint
from engine.storage import ITEMS, Dataset
from engine.writer import TableWriter
from schemas import (
    Assignment,
    FrameMask,
    ItemRecord,
    MaskletRecord,
    Provenance,
    RejectionRecord,
    VersionRecord,
    VideoRecord,
    arrow_schema,
)
from tests import synthetic

ROOT = Path(__file__).resolve().parents[1]
PROV = Provenance(engine_version="0", profile="tiny", models={}, config_hash="c")


def _video(video_id: str = "v") -> VideoRecord:
    return VideoRecord(
        video_id=video_id, source="a.mp4", content_sha256="0" * 64, duration_s=1.0, fps=10.0, num_frames=10,
        width=32, height=24, rotation=0, codec="h264", decode_width=32, decode_height=24,
    )


def _masklet(expression: str = "a dog", video_id: str = "v") -> MaskletRecord:
    from engine import masks

    mask = np.zeros((24, 32), dtype=bool)
    mask[5:10, 7:20] = True
    frame = FrameMask(frame_index=3, timestamp=0.3, rle=masks.encode(mask), box=[7, 5, 20, 10])
    return MaskletRecord(
        masklet_id=stable_id(video_id, expression), video_id=video_id, expression=expression, noun="dog", method="strefer",
        start_frame=3, start_time=0.3, detector_score=0.5, detector_box=[7, 5, 20, 10],
        assignment=Assignment(method="sole-candidate", candidate_index=0, num_candidates=1, score=1.0),
        num_frames_tracked=1, frames=[frame], provenance=PROV,
    )


def _item(key: str, *, pipeline: str = "p", status: str = "done", reason: str | None = None,
          video_id: str | None = None) -> ItemRecord:
    return ItemRecord(
        item_id=stable_id(pipeline, key), pipeline=pipeline, item_key=key, variant="v", source=f"{key}.mp4",
        status=status, reason=reason, video_id=video_id or key, run_hash="h", write_id="", run_id="", engine_version="", committed_at="",
    )


def _commit(ds: Dataset, key: str, tables: dict, **kw) -> None:
    with TableWriter(ds, "run") as writer:
        writer.add(_item(key, **kw), tables)


def _publish(ds: Dataset, run_id: str) -> int:
    record = VersionRecord(run_id=run_id, kind="run", published_at="", engine_version="0", tables={}, settings=[], counts={}, stats="{}")
    return ds.publish(record)


def test_rerun_supersedes_and_never_duplicates(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    assert ds.completion("p", "k") is None
    _commit(ds, "k", {"videos": [_video("k")], "masklets": [_masklet()]})
    _commit(ds, "k", {"videos": [_video("k")], "masklets": [_masklet()]})  # a rerun
    assert ds.completion("p", "k")["status"] == "done"
    assert ds.read_table("masklets").num_rows == 1  # superseded, not duplicated
    assert ds.arrow_dataset("masklets").count_rows() == 2  # both on disk until compaction
    assert ds.read_table("rejections").schema.names == [*arrow_schema(RejectionRecord).names, "pipeline"]
    assert ds.summary()["tables"]["masklets"]["rows"] == 1 and ds.summary()["items"] == {"p": {"done": 1}}


def test_later_success_supersedes_an_earlier_rejection(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    rejection = RejectionRecord(rejection_id="r", source="a.mp4", stage="input", reason="unreadable_video", detail="x")
    _commit(ds, "a", {"rejections": [rejection]}, status="rejected", reason="unreadable_video")
    assert ds.read_table("rejections").num_rows == 1
    _commit(ds, "a", {"videos": [_video("a")]})
    assert ds.read_table("rejections").num_rows == 0 and ds.read_table("videos").num_rows == 1


def test_one_commit_holds_many_items_and_a_video_has_one_row(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    with TableWriter(ds, "run") as writer:
        for i in range(5):  # five captions of two videos
            writer.add(_item(f"k{i}", video_id=f"v{i % 2}"), {"videos": [_video(f"v{i % 2}")], "masklets": [_masklet(f"e{i}")]})
    _commit(ds, "k0", {"masklets": [_masklet("other")]}, pipeline="two", video_id="v0")  # same input, another pipeline
    assert ds.delta("videos").version() == 1 and ds.delta(ITEMS).version() == 2  # created, then one append each
    assert sorted(ds.read_table("videos")["video_id"].to_pylist()) == ["v0", "v1"]
    masklets = ds.read_table("masklets")
    assert masklets.num_rows == 6 and sorted(set(masklets["pipeline"].to_pylist())) == ["p", "two"]
    assert set(ds.summary()["items"]) == {"p", "two"}


def test_flushes_by_size_and_by_age(tmp_path, monkeypatch):
    import engine.writer as writer_module

    ds = Dataset(str(tmp_path / "ds"))
    writer = TableWriter(ds, "run", flush_mb=1e-6, combine_every=1)  # every item passes the size
    writer.add(_item("a"), {"masklets": [_masklet("a")]})
    assert writer.commits == 1 and ds.read_table("masklets").num_rows == 1
    clock = [1000.0]
    monkeypatch.setattr(writer_module.time, "monotonic", lambda: clock[0])
    aged = TableWriter(ds, "run", flush_minutes=10)
    aged.add(_item("b"), {"masklets": [_masklet("b")]})
    assert aged.commits == 0  # young and small: still buffered, not yet part of the dataset
    assert ds.read_table("masklets").num_rows == 1
    clock[0] += 601
    aged.add(_item("c"), {"masklets": [_masklet("c")]})
    assert aged.commits == 1 and ds.read_table("masklets").num_rows == 3


def test_orphans_of_an_interrupted_flush_stay_invisible(tmp_path, monkeypatch):
    import deltalake

    ds = Dataset(str(tmp_path / "ds"))
    _commit(ds, "a", {"videos": [_video("a")]})
    real = deltalake.write_deltalake

    def dying(uri, data, **kw):  # the process dies after the data tables' appends, before the items'
        if str(uri).endswith("/items"):
            raise KeyboardInterrupt
        return real(uri, data, **kw)

    monkeypatch.setattr(deltalake, "write_deltalake", dying)
    writer = TableWriter(ds, "run")
    writer.add(_item("b"), {"videos": [_video("b")], "masklets": [_masklet()]})
    with pytest.raises(KeyboardInterrupt):
        writer.flush()
    monkeypatch.undo()
    assert ds.completion("p", "b") is None  # no items row: a rerun redoes b
    assert ds.arrow_dataset("masklets").count_rows() == 1  # the orphan is on disk...
    assert ds.read_table("masklets").num_rows == 0  # ...and never read
    assert ds.read_table("videos")["video_id"].to_pylist() == ["a"]


def test_fingerprints_from_one_listing_per_folder(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i}.mp4").write_bytes(b"x" * i)
    prints = Fingerprints()
    first = [prints.of(str(folder / f"{i}.mp4")) for i in range(20)]
    assert prints.listings == 1 and len(set(first)) == 20
    os.utime(folder / "3.mp4", (1, 1))
    assert fingerprint(str(folder / "3.mp4")) != first[3] and fingerprint(str(folder / "4.mp4")) == first[4]
    assert prints.of(str(folder / "missing.mp4")) is None


def test_versions_pin_every_table_and_diff_them(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    _commit(ds, "a", {"videos": [_video("a")], "masklets": [_masklet("a")]})
    _commit(ds, "b", {"videos": [_video("b")], "masklets": [_masklet("b")]})
    one = _publish(ds, "r1")
    _commit(ds, "b", {"videos": [_video("b")], "masklets": [_masklet("b2")]})  # changed
    _commit(ds, "c", {"videos": [_video("c")]})  # added
    with TableWriter(ds, "run") as writer:  # removed
        row = ds.completion("p", "a")
        writer.keep(ItemRecord.model_validate({**row, "status": "removed"}))
    two = _publish(ds, "r2")
    assert [v.number for v in ds.versions()] == [one, two] and two > one
    assert sorted(ds.read_table("masklets", version=one)["expression"].to_pylist()) == ["a", "b"]
    assert ds.read_table("masklets", version=two)["expression"].to_pylist() == ["b2"]
    _commit(ds, "d", {"videos": [_video("d")]})  # after the last version: not in it
    assert sorted(ds.read_table("videos", version=two)["video_id"].to_pylist()) == ["b", "c"]
    diff = ds.diff(one, two)
    assert (diff.added, diff.changed, diff.removed) == ({"p": 1}, {"p": 1}, {"p": 1})
    assert diff.rows["videos"] == (2, 2) and diff.rows["masklets"] == (2, 1)
    with pytest.raises(BadInputError, match="no version 9"):
        ds.read_table("videos", version=9)


def test_compaction_keeps_the_committed_view_as_the_plain_snapshot(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    for key in ("a", "b", "a"):  # a rerun of a leaves superseded rows
        _commit(ds, key, {"videos": [_video(key)], "masklets": [_masklet(key)]})
    with TableWriter(ds, "run") as writer:  # and two captions of one video: one video row
        writer.add(_item("c1", video_id="c"), {"videos": [_video("c")]})
        writer.add(_item("c2", video_id="c"), {"videos": [_video("c")]})
    before = {t: sorted(map(str, ds.read_table(t).to_pylist())) for t in ("videos", "masklets")}
    counts = ds.compact(retention_hours=0)
    assert counts["masklets"] == (3, 2) and counts["videos"][1] == 3
    for table in ("videos", "masklets"):
        assert sorted(map(str, ds.read_table(table).to_pylist())) == before[table]  # the same committed view
        plain = ds.arrow_dataset(table).to_table().drop_columns(["item_id", "write_id"])
        assert sorted(map(str, plain.to_pylist())) == before[table]  # the plain snapshot is exactly it


def test_a_compacted_video_row_stays_while_any_item_of_its_video_does(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    with TableWriter(ds, "run") as writer:  # two captions of one video: compaction keeps one row, c1's
        writer.add(_item("c1", video_id="c"), {"videos": [_video("c")]})
        writer.add(_item("c2", video_id="c"), {"videos": [_video("c")]})
    ds.compact(retention_hours=0)
    assert ds.arrow_dataset("videos").count_rows() == 1
    _commit(ds, "c1", {}, status="removed", video_id="c")  # the caption that wrote the row leaves the source
    assert ds.read_table("videos")["video_id"].to_pylist() == ["c"]  # c2 still points at the video
    assert ds.summary()["tables"]["videos"]["rows"] == 1
    _commit(ds, "c2", {}, status="removed", video_id="c")
    assert ds.read_table("videos").num_rows == 0 and ds.summary()["tables"]["videos"]["rows"] == 0


def test_a_table_written_before_a_column_was_added_takes_new_rows(tmp_path):
    from deltalake import write_deltalake

    ds = Dataset(str(tmp_path / "ds"))
    _commit(ds, "a", {"masklets": [_masklet("a")]})
    before = ds.arrow_dataset("masklets").to_table().drop_columns(["cuts"])  # as an earlier version wrote it
    write_deltalake(ds.uri("masklets"), before, mode="overwrite", schema_mode="overwrite")
    _commit(ds, "b", {"masklets": [_masklet("b")]})  # rows with the new column
    rows = {r["expression"]: r for r in ds.read_table("masklets").to_pylist()}
    assert set(rows) == {"a", "b"} and rows["b"]["cuts"] == [] and not rows["a"]["cuts"]


def test_an_old_layout_is_refused_with_the_way_out(tmp_path):
    old = tmp_path / "old"
    (old / "_complete" / "videorefer").mkdir(parents=True)
    with pytest.raises(BadInputError, match=r"earlier layout.*convert it .*engine run videorefer --source <its sources> --out <new folder>"):
        Dataset(str(old)).prepare()


def _child(out: Path, videos: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.storage_child", str(out), str(videos), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for i in range(4):  # distinct lengths: distinct contents, distinct video ids
        synthetic.short_video(folder / f"v{i}.mp4", seconds=0.5 + 0.1 * i)
    return folder


def _view(ds: Dataset) -> dict[str, list[str]]:
    return {t: sorted(map(str, ds.read_table(t).to_pylist())) for t in ("videos", "clips")}


def test_sigkill_during_a_flush_then_rerun_equals_an_uninterrupted_run(tmp_path, videos):
    from flows.audit import audit

    killed = _child(tmp_path / "ds", videos, "--pause-before-items")
    for line in killed.stdout:  # the first item's rows are appended; its items row is not
        if line.startswith("FLUSH"):
            break
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    ds = Dataset(str(tmp_path / "ds"))
    assert ds.arrow_dataset("clips").count_rows() == 1 and ds.read_table("clips").num_rows == 0
    for run in (_child(tmp_path / "ds", videos), _child(tmp_path / "clean", videos)):
        out, errors = run.communicate(timeout=300)
        assert run.returncode == 0 and "DONE" in out, errors[-2000:]
    assert _view(ds) == _view(Dataset(str(tmp_path / "clean")))  # no duplicates, nothing lost
    assert ds.read_table("clips").num_rows == 4
    report = audit(str(tmp_path / "ds"), [str(videos)])
    assert report.missing == 0 and report.counts["done"] == 4


def test_two_processes_write_one_dataset_at_once(tmp_path, videos):
    other = tmp_path / "other"
    other.mkdir()
    for i in range(3):
        synthetic.short_video(other / f"w{i}.mp4", seconds=1.0 + 0.1 * i)
    runs = [_child(tmp_path / "ds", videos), _child(tmp_path / "ds", other)]
    for run in runs:
        out, errors = run.communicate(timeout=300)
        assert run.returncode == 0, errors[-2000:]
    ds = Dataset(str(tmp_path / "ds"))
    assert ds.read_table("clips").num_rows == 7 and ds.read_table("videos").num_rows == 7
    assert len(ds.versions()) == 2 and ds.summary()["items"] == {"fake-storage": {"done": 7}}


def _readme_snippet(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    after = text.split(f"<!-- reader: {name} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("reader", ["polars", "duckdb"])
def test_the_readmes_readers_see_the_committed_view_of_a_version(tmp_path, reader):
    """The README's Polars and DuckDB snippets, run as printed (but for the folder and version), give the
    engine's committed view of a version: superseded, orphaned and later rows left out."""
    import deltalake

    ds = Dataset(str(tmp_path / "ds"))
    from schemas import SampleRecord, Turn

    def sample(sample_id: str) -> SampleRecord:
        return SampleRecord(
            sample_id=sample_id, video_id="v", source="a.mp4", pipeline="p", data_type="object_qa",
            conversation=[Turn(role="human", value="<video>\nWhat is <region>?"), Turn(role="gpt", value="A dog.")],
            masklet_ids=["m"], frames=[3], kept=True, provenance=PROV,
        )

    _commit(ds, "a", {"samples": [sample("a-old")]})
    _commit(ds, "a", {"samples": [sample("a-new")]})  # supersedes a-old
    _commit(ds, "b", {"samples": [sample("b")]})
    real = deltalake.write_deltalake
    try:  # an orphan: a flush whose items append never happened
        deltalake.write_deltalake = lambda uri, data, **kw: None if str(uri).endswith("/items") else real(uri, data, **kw)
        with TableWriter(ds, "run") as writer:
            writer.add(_item("c"), {"samples": [sample("orphan")]})
    finally:
        deltalake.write_deltalake = real
    version = _publish(ds, "r1")
    _commit(ds, "d", {"samples": [sample("later")]})  # after the version
    code = _readme_snippet(reader).replace('"runs/vr", 1', f'{str(tmp_path / "ds")!r}, {version}')
    scope: dict = {}
    exec(compile(code, f"README {reader} snippet", "exec"), scope)
    got = scope["samples"]
    ids = sorted(got["sample_id"].to_list() if reader == "polars" else got["sample_id"].to_pylist())
    assert ids == ["a-new", "b"] == sorted(ds.read_table("samples", version=version)["sample_id"].to_pylist())
