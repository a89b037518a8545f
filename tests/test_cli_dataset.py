"""The dataset commands (show, versions, diff, audit, compact), a bad source refused before Prefect starts, and
one source given as a plain string to a deployment's flow."""

from __future__ import annotations

import json
import subprocess

import pytest
import sys
from pathlib import Path

from typer.testing import CliRunner

from engine.storage import Dataset
from engine.writer import TableWriter
from flows import cli
from flows.cli import app
from schemas import ItemRecord, RunSettings, VersionRecord, VideoRecord

runner = CliRunner()
cli.console.width = cli.err.width = 240


def _video(video_id: str, source: str) -> VideoRecord:
    return VideoRecord(
        video_id=video_id, source=source, content_sha256="0" * 64, duration_s=1.0, fps=10.0, num_frames=10,
        width=32, height=24, rotation=0, codec="h264", decode_width=32, decode_height=24,
    )


def _dataset(tmp_path: Path) -> tuple[Dataset, Path]:
    """Two versions of a fake pipeline's dataset over a folder of (empty) video files: a, b; then b, c."""
    from engine.planning import item_id
    from schemas import WorkItem

    folder = tmp_path / "videos"
    folder.mkdir()
    ds = Dataset(str(tmp_path / "ds"))
    settings = RunSettings(pipeline="fake", variant="v", run_hash="h", options="{}", config="{}", sources=[str(folder)])

    def commit(names: str, run: str, status: str = "done") -> None:
        with TableWriter(ds, run) as writer:
            for name in names:
                item = WorkItem(source=str(folder / f"{name}.mp4"))
                writer.add(ItemRecord(
                    item_id=item_id("fake", item, "v"), pipeline="fake", item_key=item.key, variant="v", source=item.source,
                    status=status, video_id=name, run_hash="h", write_id="", run_id="", engine_version="", committed_at="",
                ), {"videos": [_video(name, item.source)]} if status == "done" else {})

    def publish(run: str) -> None:
        ds.publish(VersionRecord(run_id=run, kind="run", published_at="", engine_version="0", tables={}, settings=[settings],
                                 counts={"done": 2}, stats=json.dumps({"counters": {"items_done": 2}})))

    for name in "abc":
        (folder / f"{name}.mp4").write_bytes(name.encode())
    commit("ab", "r1")
    publish("r1")
    commit("bc", "r2")
    with TableWriter(ds, "r2") as writer:  # a is gone from the source: removed
        row = ds.completion("fake", WorkItem(source=str(folder / "a.mp4")).key)
        writer.keep(ItemRecord.model_validate({**row, "status": "removed"}))
    publish("r2")
    (folder / "a.mp4").unlink()
    return ds, folder


def _cells(output: str) -> dict[str, list[str]]:
    """Rows of the rich tables in `output`, by their first cell."""
    rows = [line.replace("│", " ").split() for line in output.splitlines()]
    return {row[0]: row for row in rows if row and row[0].isidentifier()}


def test_versions_diff_show_audit_and_compact(tmp_path):
    ds, folder = _dataset(tmp_path)
    out = runner.invoke(app, ["dataset", "versions", ds.url])
    assert out.exit_code == 0 and out.output.count("fake") == 2 and "done 2" in out.output
    out = runner.invoke(app, ["dataset", "versions", ds.url, "--version", "1"])  # that run's counters, kept
    assert out.exit_code == 0 and "version 1: run" in out.output and _cells(out.output)["items_done"][1] == "2", out.output
    out = runner.invoke(app, ["dataset", "versions", ds.url, "--version", "9"])
    assert out.exit_code == 2 and "no version 9" in out.output
    out = runner.invoke(app, ["dataset", "diff", ds.url, "1", "2"])
    assert out.exit_code == 0, out.output
    lines = _cells(out.output)
    assert lines["added"][1] == "1" and lines["changed"][1] == "1" and lines["removed"][1] == "1"
    assert "c.mp4" in " ".join(lines["added"]) and lines["videos"][1:4] == ["2", "2", "+0"]
    out = runner.invoke(app, ["dataset", "show", ds.url, "--version", "1", "--rows", "0"])
    assert out.exit_code == 0 and "items: fake done 2" in out.output and _cells(out.output)["videos"][1] == "2"
    out = runner.invoke(app, ["dataset", "audit", ds.url, "--source", str(folder)])
    assert out.exit_code == 0 and "all 2 inputs accounted for" in out.output, out.output
    (folder / "d.mp4").write_bytes(b"d")  # an input nothing accounts for
    out = runner.invoke(app, ["dataset", "audit", ds.url, "--source", str(folder)])
    assert out.exit_code == 1 and "d.mp4" in out.output and "1 inputs are neither" in out.output
    out = runner.invoke(app, ["dataset", "compact", ds.url, "--retention-hours", "0"])
    assert out.exit_code == 0 and "videos: 4 rows -> 2" in out.output, out.output
    assert [v.record.kind for v in ds.versions()] == ["run", "run", "compact"]
    assert _cells(runner.invoke(app, ["dataset", "show", ds.url, "--rows", "0"]).output)["videos"][1] == "2"
    out = runner.invoke(app, ["dataset", "diff", ds.url, "2", "3"])  # retention 0: version 2's files are gone
    assert out.exit_code == 2 and "vacuumed" in out.output
    out = runner.invoke(app, ["dataset", "versions", str(tmp_path / "nowhere")])
    assert out.exit_code == 2 and "does not exist" in out.output


@pytest.mark.parametrize("source, says", [
    ("nowhere", "input not found"),
    ("empty", "a folder the engine cannot read"),
    ("notes", "a folder the engine cannot read"),  # a folder of something else
])
def test_a_bad_source_is_one_line_before_prefect_starts(tmp_path, source, says):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a video")
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "videorefer", "--source", str(tmp_path / source), "--profile", "tiny",
         "--out", str(tmp_path / "ds")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and says in done.stderr, done.stderr
    assert "Prefect" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "ds").exists()  # nothing written either


def test_a_deployment_takes_one_source_as_a_plain_string():
    from flows.prefect_flows import build_strefer_flow, build_videorefer_flow

    for flow in (build_strefer_flow, build_videorefer_flow):  # what `--param source=/data/videos` sends
        params = flow.validate_parameters({"source": "/data/videos", "out": "/data/out"})
        assert params["source"] == "/data/videos"
        assert flow.validate_parameters({"source": ["/a", "/b"], "out": "/o"})["source"] == ["/a", "/b"]
