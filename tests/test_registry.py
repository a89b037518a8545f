"""The pipeline registry: prefect.yaml, the flows, the CLI and the roles agree with every pipeline's SPEC."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from engine.config import load_config
from flows import registry

ROOT = Path(__file__).resolve().parents[1]
NOT_PIPELINES = {("refresh-dataset", "nightly"), ("pipeline-shard", "gpu")}  # flows that are not a pipeline's


def _yaml_deployments() -> dict[tuple[str, str], dict]:
    """(flow name, deployment name) -> the prefect.yaml entry; no (flow, name) twice."""
    import flows.prefect_flows as prefect_flows

    out = {}
    for entry in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        path, _, attr = entry["entrypoint"].partition(":")
        assert path == "flows/prefect_flows.py", entry["entrypoint"]
        key = (getattr(prefect_flows, attr).name, entry["name"])
        assert key not in out, f"prefect.yaml declares {'/'.join(key)} twice"
        out[key] = entry
    return out


def test_prefect_yaml_holds_exactly_the_registrys_deployments():
    entries = _yaml_deployments()
    expected = {(spec.flow, d.name): (spec, d) for spec in registry.specs() for d in spec.all_deployments}
    assert set(entries) - NOT_PIPELINES == set(expected)
    for key, (spec, d) in expected.items():
        entry = entries[key]
        assert entry["entrypoint"] == f"flows/prefect_flows.py:{spec.entrypoint}"
        assert entry["parameters"] == d.parameters, key
        assert entry["work_pool"]["name"] == d.pool and entry.get("concurrency_limit") == d.concurrency_limit, key
        assert entry["description"] == d.description, key


def test_runner_deployment_parents_take_no_gpu_slot_and_the_shard_deployment_is_runner_settings():
    """A run with runner deployment starts from a cpu-pool deployment (its parent must not hold the slot of a GPU
    worker its shards wait for), and its shards go to the one deployment RunnerSettings names, on the gpu pool."""
    import flows.prefect_flows as prefect_flows
    from flows.runners import RunnerSettings

    entries = _yaml_deployments()
    shard_flow, shard_name = RunnerSettings().shard_deployment.split("/")
    shard = entries[(shard_flow, shard_name)]
    assert shard_flow == prefect_flows.pipeline_shard_flow.name
    assert shard["entrypoint"] == "flows/prefect_flows.py:pipeline_shard_flow" and shard["work_pool"]["name"] == "gpu"
    sharded = [(spec.flow, d) for spec in registry.specs() for d in spec.all_deployments if d.runner == "deployment"]
    assert {flow for flow, _ in sharded} == {spec.flow for spec in registry.specs()}  # every pipeline has one
    for flow, d in sharded:
        assert d.pool != shard["work_pool"]["name"], (flow, d.name)
        assert entries[(flow, d.name)]["parameters"]["runner"] == "deployment"


def test_settings_formats_and_engine_samples_are_declared_in_the_specs():
    """Every module's settings sections are its SPEC's; every declared export format has an exporter and every
    exporter a pipeline that declares it; the default format is one declared; what a pipeline reads of an engine
    dataset names pipelines and data types that exist."""
    from engine.export import FORMAT_HELP, FORMATS
    from flows.cli import ExportFormat, export
    from flows.pipelines import settings_sections

    for spec in registry.specs():
        module = registry.module(spec.name)
        assert spec.settings and spec.settings == getattr(module, "SETTINGS", spec.settings), spec.name
        assert set(spec.settings) <= set(settings_sections())
    declared = registry.export_formats()
    assert set(declared) == set(FORMATS) == set(FORMAT_HELP)
    assert {f.value for f in ExportFormat} == set(declared)
    import inspect

    default = inspect.signature(export).parameters["fmt"].default
    assert default.value == registry.default_export_format() == registry.specs()[0].export_formats[0]
    data_types = {t for spec in registry.specs() for t in spec.data_types}
    for spec in registry.specs():
        if spec.engine_samples is None:
            continue
        assert spec.engine_samples.pipeline in (None, *(s.name for s in registry.specs())), spec.name
        assert set(spec.engine_samples.data_types or ()) <= data_types, spec.name


def test_every_pipeline_has_its_flow_command_and_roles():
    import flows.prefect_flows as prefect_flows
    from flows.cli import app

    config = load_config("tiny")
    runner = CliRunner()
    for spec in registry.specs():
        flow = getattr(prefect_flows, spec.entrypoint)
        params = flow.parameters.properties
        assert flow.name == spec.flow and spec.source_param in params and "out" in params
        assert {o.name for o in spec.options} <= set(params)
        help_text = runner.invoke(app, ["run", spec.name, "--help"], terminal_width=200).output
        for option in spec.options:
            assert option.cli_flag in help_text, (spec.name, option.cli_flag)
        module = registry.module(spec.name)
        for options in ({}, {o.name: o.default for o in spec.options}):
            for role, kind in module.roles(config, **options).items():
                assert spec.roles.get(role) == kind, (spec.name, role)


def test_an_option_outside_its_choices_is_one_line(tmp_path):
    import flows.prefect_flows as prefect_flows
    from engine.errors import BadInputError

    spec = next(s for s in registry.specs() if any(o.choices for o in s.options))
    option = next(o for o in spec.options if o.choices)
    with pytest.raises(BadInputError, match=f"{option.name} must be among"):
        prefect_flows._check_options(spec, {**spec.defaults(), option.name: ["no-such-choice"]})
    from flows.cli import app

    manifest = tmp_path / "captions.jsonl"
    manifest.write_text('{"video": "a.mp4", "caption": "A dog."}\n')
    result = CliRunner().invoke(
        app, ["run", spec.name, "--source", str(manifest), "--out", str(tmp_path / "ds"), option.cli_flag, "no-such-choice"],
        terminal_width=200,
    )
    assert result.exit_code == 2 and f"{option.cli_flag} must be among" in result.output
