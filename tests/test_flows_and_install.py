"""The Prefect flow under a temporary Prefect server, and the install's compiled torchvision ops."""

from __future__ import annotations

import pytest

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
    assert result["videos"] == {str(video): "done", missing: "rejected"}
    dataset = Dataset(out)
    assert dataset.read_table("videos").num_rows == 1
    assert len(dataset.completions()) == 1
    assert result["tables"]["rejections"]["rows"] >= 1  # the missing file, at least
