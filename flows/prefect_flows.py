"""Prefect flows. Thin: a flow streams its sources a chunk at a time, drops complete items in bulk before
anything is scheduled, submits one coarse task per batch of the rest with a bounded number in flight, commits
what the batches wrote and publishes a dataset version. It returns counts, never an entry per item.

Deployments are declared in prefect.yaml. Called from Python (`clip_and_track_flow(...)`), a flow runs on
Prefect's ephemeral API, which starts by itself.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any, Callable, Optional, Union

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.tasks import exponential_backoff

from engine.config import EngineConfig
from engine.errors import BadInputError, free_gpu_memory, is_out_of_memory, transient_faults
from engine.stats import Stats
from flows import registry, runners
from flows.pipelines import (
    finish_run,
    iter_items,
    load,
    output_options,
    recorded_settings,
    run_identity,
    run_items,
    run_settings,
)
from schemas import RunSettings, WorkItem

PLAN_CHUNK = 8192  # items checked against the dataset per bulk skip check
Sources = Union[str, list[str]]  # one source, or several


# No input caching: items can carry masks, and hashing them buys nothing (reruns skip committed items).
# Transient faults: three more tries, 10, 20 and 40 s later, each delay jittered by up to half of itself.
@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5, tags=["gpu"], cache_policy=NONE)
def run_batch(
    pipeline: str,
    items: list[dict],
    out: str,
    config: dict,
    run_id: str,
    force: bool,
    options: dict[str, Any],
    previous: dict[str, dict],
    commit: bool = False,
) -> dict:
    """One batch of items (already planned: none is complete) through a pipeline, into the process's writer
    of this run; returns counts per status and this task's stats. Models load once per worker process. With
    `commit`, the batch's rows are committed before it returns (on a Ray worker, which no flow flushes)."""
    from engine.planning import Plan
    from engine.storage import Dataset
    from engine.writer import flush_writers, shared_writer

    stats = Stats()
    engine_config = EngineConfig.model_validate(config)
    writer = shared_writer(Dataset(out), run_id, **runners.settings(engine_config.section("orchestration"), None).flush)

    def run(todo: list[WorkItem]) -> list[Any]:
        return run_items(
            pipeline, todo, out, config=engine_config, stats=stats, force=force, transient=transient_faults(),
            writer=writer, plan=Plan(todo=todo, previous=previous), **options,
        )

    outcomes = halving_on_out_of_memory(run, [WorkItem.model_validate(i) for i in items], stats)
    if commit:
        flush_writers(out, run_id)
    return {"counts": dict(Counter(o.status for o in outcomes)), "stats": stats.as_dict()}


def halving_on_out_of_memory(run: Callable[[list[WorkItem]], list[Any]], todo: list[WorkItem], stats: Stats) -> list[Any]:
    """`run(todo)`; where the GPU runs out of memory, the two halves one after the other (items finished before
    the fault are committed and skipped), down to one item, whose fault goes to the task's retries."""
    try:
        return run(todo)
    except Exception as exc:
        if len(todo) == 1 or not is_out_of_memory(exc):
            raise
    stats.count("batches_halved_out_of_memory")
    free_gpu_memory()
    half = len(todo) // 2
    return halving_on_out_of_memory(run, todo[:half], stats) + halving_on_out_of_memory(run, todo[half:], stats)


def _as_list(source: Sources) -> list[str]:
    """A deployment parameter given as one string or a list."""
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise BadInputError("give at least one source")
    return sources


def run_pipeline(
    pipeline: str,
    sources: list[str],
    out: str,
    *,
    config: EngineConfig,
    options: dict[str, Any],
    batch_size: int = 8,
    force: bool = False,
    limit: Optional[int] = None,
    frame_rate: Optional[float] = None,
    split: Optional[str] = None,
    max_batches_in_flight: int = 4,
    run_id: str,
    stats: Stats,
    counts: Counter,
    orchestration: runners.RunnerSettings = runners.RunnerSettings(),
    mark_removed: bool = False,
) -> None:
    """Stream the sources through one pipeline: plan each chunk in bulk, run the rest in batches on the
    configured runner with a bounded number in flight, and with `mark_removed` record as removed the live items
    of this pipeline and options that the sources no longer hold. Adds to `stats` and `counts`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from engine.planning import Planner, chunked, item_id
    from engine.storage import Dataset, item_row
    from engine.writer import shared_writer
    from schemas import ItemRecord

    if batch_size < 1 or max_batches_in_flight < 1:
        raise BadInputError("batch_size and max_batches_in_flight must be >= 1")
    logger = get_run_logger()
    dataset = Dataset(out)
    run_hash, variant = run_identity(pipeline, config, options)
    planner = Planner(dataset, pipeline=pipeline, variant=variant, run_hash=run_hash, force=force)
    writer = shared_writer(dataset, run_id, **orchestration.flush)
    spec = registry.spec(pipeline)
    items = iter_items(sources, limit=limit, frame_rate=frame_rate, split=split, videos=spec.sources_are_videos,
                       engine_samples=spec.engine_samples)
    seen: list[Any] = []  # item ids of the sources, as Arrow chunks (for removals)
    dispatcher = _dispatcher(pipeline, out, config, options, run_id, force, batch_size, max_batches_in_flight, orchestration)

    for chunk in chunked(items, PLAN_CHUNK):
        plan = planner.split(chunk)
        if mark_removed:
            seen.append(pa.array([item_id(pipeline, i, variant) for i in chunk], pa.string()))
        counts["skipped"] += plan.skipped
        stats.count("items_skipped_complete", plan.skipped)
        if plan.beside:
            stats.count("items_beside_other_options", plan.beside)
        for row in plan.replace:
            writer.keep(ItemRecord.model_validate({**item_row(row), "status": "replaced", "run_id": run_id}))
            stats.count("items_replaced")
        for batch in chunked(plan.todo, batch_size):
            ids = [item_id(pipeline, w, variant) for w in batch]
            previous = {i: plan.previous[i] for i in ids if i in plan.previous}
            dispatcher.add([w.model_dump() for w in batch], previous, ids)
    dispatcher.finish()
    counts.update(dispatcher.counts)
    stats.merge(dispatcher.stats)
    if plan_beside := stats.counters.get("items_beside_other_options"):
        how = "replaced them (--force)" if force else "kept them and added this run's beside them (--force replaces)"
        logger.info("%s: %d inputs hold outputs made with other options; %s", pipeline, plan_beside, how)
    if mark_removed:
        live = planner.live_rows()
        present = pa.concat_arrays(seen) if seen else pa.array([], pa.string())
        gone = live.filter(pc.invert(pc.is_in(live["item_id"], value_set=present)))
        for row in gone.to_pylist():
            writer.keep(ItemRecord.model_validate({**item_row(row), "status": "removed", "run_id": run_id}))
        stats.count("items_removed", gone.num_rows)
        counts["removed"] += gone.num_rows


def _dispatcher(
    pipeline: str, out: str, config: EngineConfig, options: dict[str, Any], run_id: str, force: bool, batch_size: int,
    max_batches_in_flight: int, orchestration: runners.RunnerSettings,
) -> Any:
    """Where this run's batches go: tasks here (local), tasks on Ray, or shards on the GPU pool's workers."""
    from contextlib import nullcontext

    from engine.storage import Dataset

    logger = get_run_logger()
    dump = config.model_dump()
    if orchestration.runner == "deployment":
        parameters = {"pipeline": pipeline, "out": out, "config": dump, "run_id": run_id, "force": force, "options": options,
                      "batch_size": batch_size}
        return runners.ShardDispatcher(Dataset(out), parameters=parameters, settings=orchestration, log=logger)
    on_ray = orchestration.runner == "ray"
    if on_ray:
        gpus = runners.ray_gpus(orchestration, str(config.pipeline.get("device") or "auto"))
        logger.info("each batch asks Ray for %g GPU(s) (pipeline.orchestration.ray_gpus_per_batch: %s)", gpus,
                    orchestration.ray_gpus_per_batch)

    def submit(payload: list[dict], previous: dict[str, dict], commit: bool) -> Any:
        with runners.ray_options(gpus) if on_ray else nullcontext():
            return run_batch.submit(pipeline, payload, out, dump, run_id, force, options, previous, commit)

    return runners.BatchDispatcher(submit, in_flight=max_batches_in_flight, commit_each=on_ray, log=logger)


def run_and_publish(
    pipeline: str,
    source: Sources,
    out: str,
    *,
    config: EngineConfig,
    options: dict[str, Any],
    batch_size: int,
    force: bool,
    limit: Optional[int] = None,
    frame_rate: Optional[float] = None,
    split: Optional[str] = None,
    max_batches_in_flight: int = 4,
    runner: Optional[str] = None,
) -> dict:
    """The body every pipeline flow shares: run, commit, publish a version unless a batch failed."""
    from engine.storage import Dataset
    from engine.writer import flush_writers

    sources = _as_list(source)
    orchestration = runners.settings(config.section("orchestration"), runner)
    Dataset(out).prepare()
    run_id = uuid.uuid4().hex[:16]
    stats, counts = Stats(), Counter()
    try:
        run_pipeline(
            pipeline, sources, out, config=config, options=options, batch_size=batch_size, force=force, limit=limit,
            frame_rate=frame_rate, split=split, max_batches_in_flight=max_batches_in_flight, run_id=run_id,
            stats=stats, counts=counts, orchestration=orchestration,
        )
    finally:
        flush_writers(out, run_id)  # what finished is committed, even when a batch failed
        runners.forget_shard_results(Dataset(out), run_id)
    settings = run_settings(pipeline, config, options, sources=sources, frame_rate=frame_rate, split=split)
    return _publish(out, stats, config, counts, run_id, "run", [settings])


def _publish(out: str, stats: Stats, config: EngineConfig, counts: Counter, run_id: str, kind: str, settings: list[RunSettings]) -> dict:
    from engine.storage import Dataset

    logger = get_run_logger()
    if counts.get("failed"):
        raise RuntimeError(
            f"{counts['failed']} items failed in their batches (the other items are committed; no version is "
            "published: rerun to finish them)"
        )
    version = finish_run(out, stats, config, run_id=run_id, kind=kind, settings=settings, counts=dict(counts))
    tables = Dataset(out).summary(version)["tables"] if version else Dataset(out).summary()["tables"]
    logger.info("version %s; items %s; tables %s", version or "unchanged", dict(counts), {t: i["rows"] for t, i in tables.items()})
    return {"version": version, "items": {k: n for k, n in counts.items() if n}, "tables": tables, "stats": stats.as_dict()}


def _check_options(spec: registry.PipelineSpec, options: dict[str, Any]) -> None:
    for option in spec.options:
        values = options[option.name] if option.repeatable else [options[option.name]]
        wrong = [v for v in values if option.choices and v not in option.choices]
        if wrong or (option.choices and option.repeatable and not values):
            raise BadInputError(f"{option.name} must be among {', '.join(option.choices)}; got {list(values)}")


def make_flow(spec: registry.PipelineSpec) -> Any:
    """The Prefect flow of a pipeline, its parameters derived from the spec: the sources (one or a list), the
    dataset, the profile and config file, batching, and the pipeline's own options."""
    import inspect
    from inspect import Parameter

    def param(name: str, annotation: Any, default: Any = Parameter.empty) -> Parameter:
        return Parameter(name, Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    params = [
        param(spec.source_param, Sources),
        param("out", str),
        param("profile", str, "default"),
        param("config_file", Optional[str], None),
        param("batch_size", int, 8),
    ]
    if spec.batched_sources:
        params += [param("limit", Optional[int], None), param("frame_rate", Optional[float], None), param("split", Optional[str], None)]
    params += [param("force", bool, False), param("max_batches_in_flight", int, 4), param("runner", Optional[str], None)]
    for option in spec.options:
        kind = list[option.kind] if option.repeatable else option.kind
        params.append(param(option.name, kind, list(option.default) if option.repeatable else option.default))

    def pipeline_flow(**values: Any) -> dict:
        options = {o.name: values.pop(o.name) for o in spec.options}
        _check_options(spec, options)
        options = {**options, **output_options(spec.name, options)}  # entities parsed, data types sorted
        config = load(values.pop("profile"), values.pop("config_file"))
        body = run_and_publish
        orchestration = runners.settings(config.section("orchestration"), values["runner"])
        if orchestration.runner == "ray":
            # The batches' tasks go to Ray: this run's body as a subflow whose task runner is prefect-ray's.
            body = on_ray.with_options(task_runner=runners.ray_task_runner(orchestration))
        return body(spec.name, values.pop(spec.source_param), values.pop("out"), config=config, options=options, **values)

    pipeline_flow.__signature__ = inspect.Signature(params, return_annotation=dict)  # type: ignore[attr-defined]
    pipeline_flow.__annotations__ = {p.name: p.annotation for p in params} | {"return": dict}
    pipeline_flow.__name__ = pipeline_flow.__qualname__ = spec.entrypoint
    pipeline_flow.__doc__ = spec.summary
    return flow(name=spec.flow, log_prints=True)(pipeline_flow)


@flow(name="run-on-ray", log_prints=True)
def on_ray(pipeline: str, source: Sources, out: str, **kwargs: Any) -> dict:
    """A pipeline run whose batches run as Ray tasks (given its task runner by the pipeline's flow)."""
    return run_and_publish(pipeline, source, out, **kwargs)


@flow(name="pipeline-shard", log_prints=True)
def pipeline_shard_flow(
    pipeline: str,
    out: str,
    config: dict,
    run_id: str,
    force: bool,
    options: dict[str, Any],
    shard: str,
    batch_size: int = 8,
) -> dict:
    """One shard of a run with `runner: deployment`: its items (written beside the dataset by the parent run)
    in many batches, one after another on this worker (its models load once), committed before it ends; its
    counts and stats go beside the dataset for the parent run."""
    from engine.planning import chunked, item_id
    from engine.storage import Dataset
    from engine.writer import flush_writers

    stats, counts = Stats(), Counter()
    items, previous = runners.read_shard_items(Dataset(out), run_id, shard)
    _, variant = run_identity(pipeline, EngineConfig.model_validate(config), options)
    try:
        for batch in chunked(items, batch_size):
            ids = [item_id(pipeline, WorkItem.model_validate(i), variant) for i in batch]
            result = run_batch(pipeline, batch, out, config, run_id, force, options, {i: previous[i] for i in ids if i in previous})
            counts.update(result["counts"])
            stats.merge(Stats.from_dict(result["stats"]))
    finally:
        flush_writers(out, run_id)
    result = {"counts": dict(counts), "stats": stats.as_dict()}
    runners.write_shard_result(Dataset(out), run_id, shard, result)
    return result


# One flow per registered pipeline, at the names prefect.yaml's entrypoints give (`build_videorefer_flow`, ...).
for _spec in registry.specs():
    globals()[_spec.entrypoint] = make_flow(_spec)


def refresh_orchestration(pipeline: str, config: EngineConfig, runner: Optional[str]) -> runners.RunnerSettings:
    """Where a refresh runs a recorded pipeline's batches: `runner`, else the recorded config's; a recorded
    `ray` runs locally instead (the refresh flow has one task runner for all its pipelines), with a log line."""
    from dataclasses import replace

    orchestration = runners.settings(config.section("orchestration"), runner)
    if orchestration.runner == "ray":
        get_run_logger().warning(
            "%s: runner ray is not one the refresh runs on (its flow has one task runner for every pipeline): its "
            "batches run here, with runner local; pass runner=deployment to spread them over the GPU pool's workers, "
            "or run the pipeline's own flow with runner ray", pipeline,
        )
        orchestration = replace(orchestration, runner="local")
    return orchestration


@flow(name="refresh-dataset", log_prints=True)
def refresh_dataset_flow(
    out: str,
    source: Optional[Sources] = None,
    batch_size: int = 8,
    max_batches_in_flight: int = 4,
    runner: Optional[str] = None,
) -> dict:
    """Bring a dataset up to date with its sources: run every pipeline (with the options and settings it was
    published with) over only the inputs that are new or changed, retry rejections whose reason was
    transient, mark inputs gone from the source as removed, and publish one version; nothing changed, nothing
    written. `source` overrides the sources the dataset recorded (the recorded split and frame rate still apply).
    `runner` overrides the recorded one (`ray` runs locally here: see `refresh_orchestration`)."""
    from engine.storage import Dataset
    from engine.writer import flush_writers

    dataset = Dataset(out)
    dataset.require()
    settings = recorded_settings(dataset)
    if not settings:
        raise BadInputError(f"{out} has no published run to refresh: build it with a pipeline first")
    run_id = uuid.uuid4().hex[:16]
    stats, counts = Stats(), Counter()
    used = []
    try:
        for s in settings:
            sources = _as_list(source) if source is not None else s.sources
            options = json.loads(s.options)
            config = EngineConfig.model_validate_json(s.config)
            run_pipeline(
                s.pipeline, sources, out, config=config, options=options, batch_size=batch_size,
                frame_rate=s.frame_rate, split=s.split, max_batches_in_flight=max_batches_in_flight, run_id=run_id,
                stats=stats, counts=counts, orchestration=refresh_orchestration(s.pipeline, config, runner),
                mark_removed=True,
            )
            used.append(s.model_copy(update={"sources": sources}))
    finally:
        flush_writers(out, run_id)
        runners.forget_shard_results(dataset, run_id)
    return _publish(out, stats, EngineConfig.model_validate_json(settings[-1].config), counts, run_id, "refresh", used)
