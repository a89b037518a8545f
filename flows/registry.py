"""One typed registry of pipelines: each pipeline module declares a `SPEC` once, and the CLI (`engine run
<pipeline>`), the Prefect flows, the export formats and the deployments in prefect.yaml derive from it.

Adding a pipeline: its agents in `agents/`, its prompts in `prompts/`, one module under `flows/` with `SPEC` (its
settings sections included), `roles`, `prompt_names` and `build`, and one line in `MODULES` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from types import ModuleType
from typing import Any

from engine.sources.engine_dataset import EngineSamples

# The registration line of every pipeline: the modules that declare one.
MODULES = ("flows.clip_and_track", "flows.videorefer", "flows.strefer", "flows.sama", "flows.ufvideo")


@dataclass(frozen=True)
class Option:
    """A run option of a pipeline: a flow parameter and an `engine run <pipeline>` flag (`--name-with-dashes`)."""

    name: str
    kind: type  # str, bool, int, float; a repeatable option is a list of `kind`
    default: Any
    help: str
    repeatable: bool = False
    choices: tuple[str, ...] = ()
    flag: str = ""  # the CLI flag; default `--name-with-dashes`
    short: str | None = None  # a one-letter flag, e.g. "-e"
    shapes_output: bool = True  # False: adds files, not rows (not part of an item's identity)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Deployment:
    """A default deployment of the pipeline's flow (prefect.yaml must hold exactly these)."""

    name: str
    profile: str
    pool: str
    batch_size: int
    description: str
    concurrency_limit: int | None = None
    runner: str | None = None  # a `runner` parameter; None: the config's (`pipeline.orchestration.runner`)

    @property
    def parameters(self) -> dict[str, Any]:
        """The deployment's parameters in prefect.yaml."""
        return {"profile": self.profile, "batch_size": self.batch_size, **({"runner": self.runner} if self.runner else {})}


# Every pipeline's flow also has this deployment: a run with runner `deployment` whose parent flow run plans on a
# CPU worker, so that it never holds the slot of a GPU worker that its own shards (pipeline-shard/gpu) wait for.
SHARDS = Deployment(
    "shards", "default", "cpu", 8,
    "Runner deployment: this flow run plans on a CPU worker and runs its shards as pipeline-shard/gpu flow runs on the "
    "GPU workers, holding no GPU worker's slot itself.",
    runner="deployment",
)


@dataclass(frozen=True)
class PipelineSpec:
    name: str  # `engine run <name>`; tags items and rows
    flow: str  # the Prefect flow's name
    entrypoint: str  # the flow's attribute in flows/prefect_flows.py
    summary: str  # the flow's docstring and the command's help
    roles: dict[str, str]  # every role the pipeline may use -> the interface it must provide
    # the config sections it reads (`pipeline.<section>`) -> their dataclass: validated, and in its run hash
    settings: dict[str, type] = field(default_factory=dict)
    options: tuple[Option, ...] = ()
    data_types: tuple[str, ...] = ()  # what its samples' `data_type` can be
    export_formats: tuple[str, ...] = ()  # the training formats its samples export to (engine/export.py's FORMATS)
    deployments: tuple[Deployment, ...] = ()  # besides SHARDS, which every pipeline has (`all_deployments`)
    source_param: str = "source"  # the flow parameter that takes the sources
    sources_are_videos: bool = False  # each source is one video file as given (not a manifest or dataset)
    batched_sources: bool = True  # whether the flow takes limit/frame_rate/split (sources read through adapters)
    funnel: tuple[str, ...] = field(default=())  # agents whose funnel `engine run` prints, in order
    # which kept samples of a dataset the engine wrote, given as a source, it reads (None: every pipeline's)
    engine_samples: EngineSamples | None = None

    @property
    def all_deployments(self) -> tuple[Deployment, ...]:
        return (*self.deployments, SHARDS)

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)

    def defaults(self) -> dict[str, Any]:
        return {o.name: list(o.default) if o.repeatable else o.default for o in self.options}


@cache
def _loaded() -> dict[str, tuple[PipelineSpec, ModuleType]]:
    out = {}
    for name in MODULES:
        module = import_module(name)
        spec = module.SPEC
        out[spec.name] = (spec, module)
    return out


def specs() -> list[PipelineSpec]:
    return [spec for spec, _ in _loaded().values()]


def spec(name: str) -> PipelineSpec:
    loaded = _loaded()
    if name not in loaded:
        raise ValueError(f"unknown pipeline {name!r}; pipelines: {', '.join(loaded)}")
    return loaded[name][0]


def known(name: str) -> PipelineSpec | None:
    """The spec of a pipeline, or None for one this engine does not know (a dataset another version wrote)."""
    loaded = _loaded().get(name)
    return loaded[0] if loaded else None


def module(name: str) -> ModuleType:
    spec(name)
    return _loaded()[name][1]


def export_formats() -> list[str]:
    """Every format a pipeline declares, in the order of MODULES and of each declaration."""
    return list(dict.fromkeys(f for s in specs() for f in s.export_formats))


def default_export_format() -> str:
    """`engine export`'s default: the first format a registered pipeline declares."""
    return export_formats()[0]
