"""Every pipeline the engine runs, and the one way to run any of them over work items into a dataset.

The CLI and the Prefect tasks both call `run_items`; a pipeline module declares its name, its settings
sections, the roles it needs, and a `build(config, backends, stats=..., **options) -> Pipeline`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Sequence

from engine.config import EngineConfig, load_config
from engine.models.chat_queue import ChatQueueConfig
from engine.runner import DecodeProgress, ItemOutcome, Runner, RunnerConfig
from engine.stats import Stats
from engine.storage import Dataset
from schemas import WorkItem


def _modules() -> dict[str, ModuleType]:
    from flows import clip_and_track, strefer, videorefer

    return {m.NAME: m for m in (clip_and_track, videorefer, strefer)}


def pipeline_names() -> list[str]:
    return list(_modules())


def pipeline_module(name: str) -> ModuleType:
    modules = _modules()
    if name not in modules:
        raise ValueError(f"unknown pipeline {name!r}; pipelines: {', '.join(modules)}")
    return modules[name]


def settings_sections() -> dict[str, type]:
    """Every settings section any pipeline reads, so a config file is validated whole, once; `runner` (how
    many items run at once) is the runner's, and so every pipeline's."""
    sections: dict[str, type] = {"runner": RunnerConfig, "chat_queue": ChatQueueConfig}
    for module in _modules().values():
        sections.update(module.SETTINGS)
    return sections


def load(profile: str, config_file: str | None = None, *, device: str | None = None) -> EngineConfig:
    """The config, validated before any model loads; `device` overrides the config's."""
    config = load_config(profile, config_file, sections=settings_sections())
    if device:
        config = config.model_copy(update={"pipeline": {**config.pipeline, "device": device}})
    return config


def run_items(
    name: str,
    items: Sequence[WorkItem],
    out: str,
    *,
    config: EngineConfig,
    stats: Stats,
    force: bool = False,
    progress: DecodeProgress | None = None,
    transient: tuple[type[BaseException], ...] = (),
    on_models_loading: Callable[[], Any] | None = None,
    **options: Any,
) -> list[ItemOutcome]:
    """Load the pipeline's models (once per process), build it, and run it over `items` into `out`."""
    from engine.models import factory

    module = pipeline_module(name)
    dataset = Dataset(out)
    backends = factory.build(config, module.roles(config, **options), pipeline=name)
    pipeline = module.build(config, backends, stats=stats, dataset=dataset, **options)
    runner = Runner(pipeline, dataset, stats=stats, force=force, progress=progress, transient=transient)
    return runner.run(items)


def finish_run(out: str, stats: Stats, config: EngineConfig) -> dict:
    """Manifest, stats and dataset card after a run."""
    from engine import __version__
    from engine.card import dataset_card

    dataset = Dataset(out)
    manifest = dataset.write_manifest(engine_version=__version__)
    dataset.write_json("stats.json", {"config_hash": config.hash, "profile": config.profile, **stats.as_dict()})
    dataset.write_text("README.md", dataset_card(manifest, config))
    return manifest
