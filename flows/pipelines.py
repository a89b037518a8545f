"""Every pipeline the engine runs, and the one way to run any of them over work items into a dataset.

The CLI and the Prefect tasks both call `run_items`; a pipeline module (flows.registry) declares its `SPEC`
(its settings sections included), the roles it needs, the prompts it renders, and a `build(config, backends,
stats=..., **options) -> Pipeline`. Helpers every pipeline's stages share (`funnel`, `item_window`) live here too. `run_identity` hashes what shapes a pipeline's rows (its own roles, prompts, settings and run
options, nothing of the other pipelines'), so changing the Refiner's prompt redoes VideoRefer items and no
clip-and-track item.
"""

from __future__ import annotations

import json
from collections import Counter
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from engine.config import EngineConfig, load_config
from engine.decode import DecodeResult
from engine.models.chat_queue import ChatQueueConfig
from engine.planning import Plan, variant_id
from engine.runner import DecodeProgress, ItemOutcome, Runner, RunnerConfig, VideoContext
from engine.stats import Stats
from engine.storage import Dataset
from engine.writer import TableWriter
from flows import registry
from schemas import RunSettings, VersionRecord, Window, WorkItem

if TYPE_CHECKING:
    from engine.sources import EngineSamples


def pipeline_names() -> list[str]:
    return [spec.name for spec in registry.specs()]


def pipeline_module(name: str) -> ModuleType:
    return registry.module(name)


def settings_sections() -> dict[str, type]:
    """Every settings section any pipeline reads, so a config file is validated whole, once; `runner` (how
    many items run at once) is the runner's, and so every pipeline's."""
    from flows.runners import RunnerSettings

    # how many items run at once, how chat requests are batched, where batches run: every pipeline's
    sections: dict[str, type] = {"runner": RunnerConfig, "chat_queue": ChatQueueConfig, "orchestration": RunnerSettings}
    for spec in registry.specs():
        sections.update(spec.settings)
    return sections


def load(profile: str, config_file: str | None = None, *, device: str | None = None) -> EngineConfig:
    """The config, validated before any model loads; `device` overrides the config's."""
    config = load_config(profile, config_file, sections=settings_sections())
    if device:
        config = config.model_copy(update={"pipeline": {**config.pipeline, "device": device}})
    return config


def output_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The run options that shape a pipeline's rows, in one canonical form (entities as dicts, data types
    sorted), without those that only add files (a render)."""
    from schemas import EntityRef

    skip = {o.name for o in registry.spec(name).options if not o.shapes_output}
    out: dict[str, Any] = {}
    for key, value in sorted(options.items()):
        if key in skip:
            continue
        if key == "entities":
            value = [EntityRef.parse(e).model_dump() if isinstance(e, str) else EntityRef.model_validate(e).model_dump() for e in value]
        elif key == "data_types":
            value = sorted(value)
        out[key] = value
    return out


def run_identity(name: str, config: EngineConfig, options: dict[str, Any]) -> tuple[str, str]:
    """(run hash, variant) of a pipeline run: the run hash covers the roles the pipeline uses under these
    options, the hashes of the prompts it renders, its settings sections and its run options; the variant
    the run options alone (an input run with other options is another item, kept beside)."""
    from engine.ids import stable_id
    from prompts import template_hash

    module = pipeline_module(name)
    chosen = output_options(name, options)
    roles = module.roles(config, **options)
    run_hash = stable_id(
        name,
        {role: config.roles[role].model_dump() for role in sorted(roles) if role in config.roles},
        {p: template_hash(p) for p in module.prompt_names(config, **options)},
        {section: config.pipeline.get(section, {}) for section in sorted(registry.spec(name).settings)},
        config.pipeline.get("dtype"),
        chosen,
        length=12,
    )
    return run_hash, variant_id({"pipeline": name, **chosen})


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
    writer: TableWriter | None = None,
    plan: Plan | None = None,
    **options: Any,
) -> list[ItemOutcome]:
    """Load the pipeline's models (once per process), build it, and run it over `items` into `out` (through
    `writer` when given: the run's shared writer, which commits later; else committed before returning)."""
    from engine.models import factory

    module = pipeline_module(name)
    dataset = Dataset(out)
    backends = factory.build(config, module.roles(config, **options), pipeline=name)
    pipeline = module.build(config, backends, stats=stats, dataset=dataset, **options)
    pipeline.run_hash, pipeline.variant = run_identity(name, config, options)
    runner = Runner(pipeline, dataset, stats=stats, force=force, progress=progress, transient=transient, writer=writer)
    return runner.run(items, plan=plan)


def iter_items(
    sources: Sequence[str],
    *,
    limit: int | None = None,
    frame_rate: float | None = None,
    split: str | None = None,
    videos: bool = False,
    engine_samples: EngineSamples | None = None,
) -> Iterator[WorkItem]:
    """Work items of every source in turn, read lazily, at most `limit` of them. Every source is opened (and
    so checked, with a one-line error) before the first item is read. With `videos`, each source is one video
    taken as it is (one that cannot be read becomes a rejection when its turn comes, as `engine clip-and-track`
    promises for the files it is given). `engine_samples`: which samples of a dataset the engine wrote give its
    objects (the reading pipeline's `SPEC.engine_samples`; default: every pipeline's kept samples)."""
    from itertools import islice

    from engine.sources import open_source

    extra = {"split": split} if split else {}
    if videos:
        opened = [iter([WorkItem(source=v, frame_rate=frame_rate)]) for v in sources]
    else:
        opened = [open_source(spec, frame_rate=frame_rate, engine_samples=engine_samples, **extra) for spec in sources]

    def chain() -> Iterator[WorkItem]:
        for items in opened:
            yield from items

    return islice(chain(), limit) if limit is not None else chain()


def run_settings(
    name: str,
    config: EngineConfig,
    options: dict[str, Any],
    *,
    sources: Sequence[str],
    frame_rate: float | None = None,
    split: str | None = None,
) -> RunSettings:
    """What a refresh needs to run this pipeline again exactly so."""
    run_hash, variant = run_identity(name, config, options)
    return RunSettings(
        pipeline=name,
        variant=variant,
        run_hash=run_hash,
        options=json.dumps({**options, **output_options(name, options)}, default=str),  # render kept too
        config=config.model_dump_json(),
        sources=list(sources),
        sources_are_videos=registry.spec(name).sources_are_videos,
        frame_rate=frame_rate,
        split=split,
    )


def funnel(stats: Stats, agent: str, n_in: int, n_out: int, dropped: Counter | None = None) -> None:
    """Items in and out of an agent and why the others left (printed at the end of a run)."""
    stats.count(f"funnel.{agent}.in", n_in)
    stats.count(f"funnel.{agent}.out", n_out)
    for reason, n in (dropped or {}).items():
        stats.count(f"funnel.{agent}.dropped.{reason}", n)


def item_window(ctx: VideoContext, decoded: DecodeResult) -> Window | None:
    """The frames and times the item covers where it is a window of its video (a caption manifest row with
    start/end, such as Panda-70M's clips), counted from the file's first frame; None for a whole video."""
    if ctx.item.start_s is None and ctx.item.end_s is None:
        return None
    return Window(
        start_frame=decoded.first_index,
        end_frame=decoded.frames_decoded,
        start_s=round(decoded.first_time, 6),
        end_s=round(decoded.end_time, 6),
    )


COMMITTING = ("items_done", "items_rejected", "items_replaced", "items_removed", "items_touched")


def finish_run(
    out: str, stats: Stats, config: EngineConfig, *, run_id: str, kind: str, settings: list[RunSettings], counts: dict[str, int]
) -> int | None:
    """Publish the run as a dataset version when it committed anything, and write the dataset card.
    Returns the version number (None: nothing changed, nothing published)."""
    from engine import __version__
    from engine.card import dataset_card

    dataset = Dataset(out)
    if not any(stats.counters.get(name) for name in COMMITTING):
        return None
    record = VersionRecord(
        run_id=run_id,
        kind=kind,
        published_at="",
        engine_version=__version__,
        tables={},
        settings=settings,
        counts={k: int(v) for k, v in counts.items() if v},
        stats=json.dumps(stats.as_dict()),
    )
    number = dataset.publish(record)
    dataset.write_text("README.md", dataset_card(dataset, config, number))
    return number


def recorded_settings(dataset: Dataset) -> list[RunSettings]:
    """The latest recorded settings of every (pipeline, run options) the dataset's versions hold: what a
    refresh runs again and an audit checks against."""
    latest: dict[tuple[str, str], RunSettings] = {}
    for version in dataset.versions():
        for s in version.record.settings:
            latest[(s.pipeline, s.variant)] = s
    return list(latest.values())
