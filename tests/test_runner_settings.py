"""Where batches run, without Ray or a Prefect server: the GPUs a Ray batch asks for, what a shard of a run with
runner deployment carries and when its parent warns, and what the refresh takes from the recorded settings (the
split; a recorded runner ray)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from types import SimpleNamespace

import pytest

from engine.config import load_config
from engine.errors import ConfigError
from engine.storage import Dataset
from flows import runners
from flows.runners import RunnerSettings, ShardDispatcher, gpus_per_batch


class Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, *args) -> None:
        self.warnings.append(message % args)

    info = error = warning


# -- Ray: GPUs per batch ------------------------------------------------------------------------------------------


def _no_cluster() -> float:
    raise AssertionError("the cluster is asked only where the device is auto")


@pytest.mark.parametrize(("device", "gpus"), [("cuda", 1), ("cuda:1", 1), ("cpu", 0), ("mps", 0)])
def test_auto_asks_one_gpu_per_batch_where_the_device_is_a_gpu(device, gpus):
    assert RunnerSettings().ray_gpus_per_batch == "auto"
    assert gpus_per_batch(RunnerSettings(), device, _no_cluster) == gpus


def test_auto_device_asks_the_cluster_and_a_number_wins():
    assert gpus_per_batch(RunnerSettings(), "auto", lambda: 8.0) == 1
    assert gpus_per_batch(RunnerSettings(), "auto", lambda: 0.0) == 0
    assert gpus_per_batch(RunnerSettings(ray_gpus_per_batch=0), "cuda", _no_cluster) == 0
    assert gpus_per_batch(RunnerSettings(ray_gpus_per_batch=0.5), "cpu", _no_cluster) == 0.5


@pytest.mark.parametrize("value", ["many", -1, True])
def test_a_bad_gpus_per_batch_is_one_line(value):
    with pytest.raises(ConfigError, match="ray_gpus_per_batch must be auto or a number"):
        runners.settings({"ray_gpus_per_batch": value}, None)


def test_the_config_file_takes_auto_or_a_number(tmp_path):
    from flows.pipelines import load

    for value in ("auto", "2", "0.5"):
        path = tmp_path / f"c{value}.yaml"
        path.write_text(f"pipeline:\n  orchestration:\n    ray_gpus_per_batch: {value}\n")
        config = load("tiny", str(path))
        settings = runners.settings(config.section("orchestration"), "ray")
        assert settings.ray_gpus_per_batch == (value if value == "auto" else float(value))


# -- runner deployment: shards ------------------------------------------------------------------------------------


def _dispatcher(tmp_path, shard_size: int, **settings) -> tuple[ShardDispatcher, list[dict]]:
    """A dispatcher whose shards 'run' at once: each writes its result as a shard flow would."""
    dataset = Dataset(str(tmp_path / "ds"))
    dispatcher = ShardDispatcher(dataset, parameters={"run_id": "r1"}, log=Log(),
                                 settings=RunnerSettings(runner="deployment", shard_size=shard_size, **settings))
    sent: list[dict] = []

    def run(parameters):
        items, previous = runners.read_shard_items(dataset, "r1", parameters["shard"])
        sent.append({"items": [i["n"] for i in items], "previous": sorted(previous)})
        runners.write_shard_result(dataset, "r1", parameters["shard"], {"counts": {"done": len(items)}, "stats": {}})
        return SimpleNamespace(state=SimpleNamespace(is_completed=lambda: True, message=""))

    dispatcher._run = run
    return dispatcher, sent


def test_a_shard_file_carries_the_previous_rows_of_its_own_items_only(tmp_path):
    dispatcher, sent = _dispatcher(tmp_path, shard_size=4)
    for b in range(3):  # batches of 3 items into shards of 4: 4, 4, 1
        ids = [f"i{3 * b + k}" for k in range(3)]
        previous = {i: {"item_id": i} for i in ids if int(i[1:]) % 2 == 0}  # the even items supersede a row
        dispatcher.add([{"n": 3 * b + k} for k in range(3)], previous, ids)
    dispatcher.finish()
    assert [s["items"] for s in sent] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert [s["previous"] for s in sent] == [["i0", "i2"], ["i4", "i6"], ["i8"]]
    assert dispatcher.counts == Counter(done=9) and not dispatcher._previous


def test_the_parent_warns_once_when_no_shard_has_started(tmp_path):
    from prefect.states import Pending, Running, Scheduled

    dispatcher, _ = _dispatcher(tmp_path, shard_size=1, shard_start_warning_s=0)
    dispatcher._first_sent = time.monotonic() - 10
    dispatcher._waiting(Scheduled())
    dispatcher._waiting(Pending())
    (warning,) = dispatcher.log.warnings
    assert "no shard of this run has started" in warning and "pipeline-shard/gpu" in warning and "shards" in warning

    patient, _ = _dispatcher(tmp_path, shard_size=1, shard_start_warning_s=3600)
    patient._first_sent = time.monotonic() - 10
    patient._waiting(Running())  # one started: no warning, ever
    patient.settings = RunnerSettings(runner="deployment", shard_start_warning_s=0)
    patient._waiting(Scheduled())
    assert not patient.log.warnings
    dispatcher._pool.shutdown()
    patient._pool.shutdown()


# -- the refresh: the recorded split, a recorded runner ray ----------------------------------------------------------


def _published(tmp_path, *, split: str | None, orchestration: dict | None = None) -> str:
    from engine.stats import Stats
    from flows.pipelines import finish_run, run_settings

    out = str(tmp_path / "ds")
    Dataset(out).prepare()
    config = load_config("tiny")
    if orchestration:
        config = config.model_copy(update={"pipeline": {**config.pipeline, "orchestration": orchestration}})
    settings = run_settings("videorefer", config, {"data_types": ["object_qa"]}, sources=["/data/mevis"], split=split)
    stats = Stats()
    stats.count("items_done")
    finish_run(out, stats, config, run_id="first", kind="run", settings=[settings], counts={"done": 1})
    return out


def _refresh(monkeypatch, out: str, **params) -> tuple[list[dict], list]:
    """The refresh flow's body, here (no Prefect API): what it hands each pipeline run, and what it publishes."""
    import flows.prefect_flows as prefect_flows

    runs, published = [], []
    monkeypatch.setattr(prefect_flows, "get_run_logger", lambda: logging.getLogger("test-refresh"))
    monkeypatch.setattr(prefect_flows, "run_pipeline", lambda pipeline, sources, out, **kw: runs.append(
        {"pipeline": pipeline, "sources": sources, **kw}))
    monkeypatch.setattr(prefect_flows, "_publish", lambda *args: published.append(args[-1]) or {})
    prefect_flows.refresh_dataset_flow.fn(out=out, **params)
    return runs, published


def test_the_split_a_dataset_was_built_with_is_recorded_and_refreshed_with(tmp_path, monkeypatch):
    out = _published(tmp_path, split="valid_u")
    (recorded,) = Dataset(out).versions()[-1].record.settings
    assert recorded.split == "valid_u"
    runs, published = _refresh(monkeypatch, out)
    (run,) = runs
    assert run["split"] == "valid_u" and run["sources"] == ["/data/mevis"] and run["mark_removed"]
    assert run["orchestration"].runner == "local"
    assert [s.split for s in published[0]] == ["valid_u"]


def test_a_dataset_built_on_ray_is_refreshed_locally_with_a_log_line(tmp_path, monkeypatch, caplog):
    out = _published(tmp_path, split=None, orchestration={"runner": "ray", "ray_address": "ray://head:10001"})
    with caplog.at_level(logging.WARNING, logger="test-refresh"):
        runs, _ = _refresh(monkeypatch, out)
    (run,) = runs
    assert run["orchestration"].runner == "local" and run["split"] is None
    assert "runner ray" in caplog.text and "runner local" in caplog.text
    # an explicit runner still wins
    runs, _ = _refresh(monkeypatch, out, runner="deployment")
    assert runs[0]["orchestration"].runner == "deployment"


def test_a_run_records_its_split(tmp_path):
    from flows.pipelines import run_settings

    config = load_config("tiny")
    assert run_settings("sama", config, {}, sources=["/data/mevis"], split="valid_u").split == "valid_u"
    assert run_settings("sama", config, {}, sources=["/data/mevis"]).split is None
    assert json.loads(run_settings("sama", config, {}, sources=["x"]).model_dump_json())["split"] is None


def test_flush_settings_come_from_the_orchestration_section():
    settings = runners.settings
    assert settings({"flush_mb": 64, "flush_minutes": 2}, None).flush == {"flush_mb": 64, "flush_minutes": 2}
    assert RunnerSettings().flush == {"flush_mb": 256, "flush_minutes": 10}
    with pytest.raises(ConfigError, match="flush_mb and flush_minutes must be > 0"):
        settings({"flush_minutes": 0}, None)
