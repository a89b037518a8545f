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
    """(flow name, deployment name) -> the prefect.yaml entry."""
    import flows.prefect_flows as prefect_flows

    out = {}
    for entry in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        path, _, attr = entry["entrypoint"].partition(":")
        assert path == "flows/prefect_flows.py", entry["entrypoint"]
        out[(getattr(prefect_flows, attr).name, entry["name"])] = entry
    return out


def test_prefect_yaml_holds_exactly_the_registrys_deployments():
    entries = _yaml_deployments()
    expected = {(spec.flow, d.name): (spec, d) for spec in registry.specs() for d in spec.deployments}
    assert set(entries) - NOT_PIPELINES == set(expected)
    for key, (spec, d) in expected.items():
        entry = entries[key]
        assert entry["entrypoint"] == f"flows/prefect_flows.py:{spec.entrypoint}"
        assert entry["parameters"] == {"profile": d.profile, "batch_size": d.batch_size}, key
        assert entry["work_pool"]["name"] == d.pool and entry.get("concurrency_limit") == d.concurrency_limit, key
        assert entry["description"] == d.description, key


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
