"""The Prefect flow under a temporary Prefect server, and the install's compiled torchvision ops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas import WorkItem
from tests import synthetic


def test_torchvision_compiled_ops_load():
    import torch
    import torchvision

    keep = torchvision.ops.nms(torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.0]]), torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]


@pytest.mark.integration
def test_clip_and_track_flow_with_tiny_models(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    from engine.storage import Dataset
    from flows.prefect_flows import clip_and_track_flow

    video = tmp_path / "entities.mp4"
    synthetic.entities_video(video)
    missing = str(tmp_path / "missing.mp4")
    out = str(tmp_path / "ds")
    with prefect_test_harness():
        result = clip_and_track_flow(
            videos=[str(video), missing], entities=["red person:person", "ball"], out=out, profile="tiny", batch_size=1
        )
    assert result["items"] == {"done": 1, "rejected": 1} and result["version"] == 1  # counts, not an entry per item
    dataset = Dataset(out)
    assert dataset.read_table("videos").num_rows == 1
    assert dataset.completion("clip-and-track", WorkItem(source=missing).key)["reason"] == "unreadable_video"
    assert result["tables"]["rejections"]["rows"] >= 1  # the missing file, at least
    # each task returned its stats; the flow merged them (no model loaded in the flow to read them)
    assert result["stats"]["counters"]["items_done"] == 1 and result["stats"]["counters"]["items_rejected"] == 1
    (version,) = dataset.versions()  # the run's counters are kept with its version
    assert json.loads(version.record.stats)["counters"]["items_done"] == 1


@pytest.mark.integration
def test_a_failed_batch_commits_the_others_and_publishes_no_version(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    import flows.prefect_flows as prefect_flows
    from engine.storage import Dataset

    video = tmp_path / "entities.mp4"
    synthetic.entities_video(video)
    real = prefect_flows.run_items
    calls = {"n": 0}

    def second_batch_dies(name, items, out, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("worker lost")
        return real(name, items, out, **kw)

    monkeypatch.setattr(prefect_flows, "run_items", second_batch_dies)
    monkeypatch.setattr(prefect_flows.run_batch, "retries", 0)
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(video.read_bytes() + b"\0")
    with prefect_test_harness(), pytest.raises(RuntimeError, match="1 items failed in their batches"):
        prefect_flows.clip_and_track_flow(
            videos=[str(video), str(copy)], entities=["ball"], out=str(tmp_path / "ds"), profile="tiny", batch_size=1
        )
    dataset = Dataset(str(tmp_path / "ds"))
    assert dataset.read_table("videos").num_rows == 1  # the batch that finished is committed
    assert dataset.versions() == []  # a run that failed part-way publishes no version


def test_the_license_is_an_spdx_string_so_setuptools_prints_no_deprecation_box():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    # `license = { text = ... }` made every install print setuptools' license deprecation box several times
    assert project["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])
