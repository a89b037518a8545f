"""Prefect flows. Thin: a loop of coarse tasks (one per batch of videos) that call the agents' pipeline.

Deployments are declared in prefect.yaml. Called from Python (`clip_and_track_flow(...)`), a flow runs on
Prefect's ephemeral API, which starts by itself.
"""

from __future__ import annotations

from functools import cache
from typing import Optional

from prefect import flow, get_run_logger, task

from engine.config import load_config
from engine.stats import Stats
from engine.storage import Dataset
from flows.clip_and_track import ClipAndTrack, finish_run, run_batch
from schemas import EntityRef


def _transient() -> tuple[type[BaseException], ...]:
    """Faults worth a retry of the whole batch: a model server restarting, a GPU momentarily out of memory.
    Completed videos are skipped on the retry."""
    import torch

    return (ConnectionError, TimeoutError, MemoryError, torch.OutOfMemoryError)


@cache
def _pipeline(profile: str, config_file: Optional[str]) -> ClipAndTrack:
    """Models load once per worker process and stay loaded across tasks."""
    return ClipAndTrack.from_config(load_config(profile, config_file), stats=Stats())


@task(retries=2, retry_delay_seconds=[10, 60], tags=["gpu"])
def track_batch(
    videos: list[str],
    entities: list[str],
    out: str,
    profile: str,
    config_file: Optional[str],
    force: bool,
    baseline: bool,
    render: bool,
) -> dict:
    pipeline = _pipeline(profile, config_file)
    outcomes = run_batch(
        pipeline,
        videos,
        [EntityRef.parse(e) for e in entities],
        Dataset(out),
        force=force,
        baseline=baseline,
        render=render,
        transient=_transient(),
    )
    return {o.source: o.status for o in outcomes}


@flow(name="clip-and-track", log_prints=True)
def clip_and_track_flow(
    videos: list[str],
    entities: list[str],
    out: str,
    profile: str = "default",
    config_file: Optional[str] = None,
    batch_size: int = 8,
    force: bool = False,
    baseline: bool = False,
    render: bool = False,
) -> dict:
    """Video Clipper + Referring Masklet Generator over many videos; entities as `EXPRESSION[:NOUN]`."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    config = load_config(profile, config_file)  # validates before any task starts
    Dataset(out).prepare()
    logger = get_run_logger()
    batches = [videos[i : i + batch_size] for i in range(0, len(videos), batch_size)]
    futures = [
        track_batch.submit(batch, entities, out, profile, config_file, force, baseline, render) for batch in batches
    ]
    statuses: dict[str, str] = {}
    for future in futures:
        statuses.update(future.result())
    stats = _pipeline(profile, config_file).stats
    manifest = finish_run(Dataset(out), stats, config)
    logger.info("clip-and-track: %s; tables %s", statuses, {t: i["rows"] for t, i in manifest["tables"].items()})
    return {"videos": statuses, "tables": manifest["tables"]}
