"""Prefect flows. Thin: the flow lists work items, submits one coarse task per batch, merges what the tasks
return and writes the manifest, stats and dataset card, even when a batch failed.

Deployments are declared in prefect.yaml. Called from Python (`clip_and_track_flow(...)`), a flow runs on
Prefect's ephemeral API, which starts by itself.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from engine.errors import transient_faults
from engine.stats import Stats
from flows.pipelines import finish_run, load, run_items
from schemas import WorkItem


# No input caching: items can carry masks, and hashing them buys nothing (reruns skip committed items).
@task(retries=2, retry_delay_seconds=[10, 60], tags=["gpu"], cache_policy=NONE)
def run_batch(
    pipeline: str,
    items: list[dict],
    out: str,
    profile: str,
    config_file: Optional[str],
    force: bool,
    options: dict[str, Any],
) -> dict:
    """One batch of items through a pipeline; returns each item's status and this task's stats. Models load
    once per worker process (a lock makes that safe under the thread task runner)."""
    stats = Stats()
    outcomes = run_items(
        pipeline,
        [WorkItem.model_validate(i) for i in items],
        out,
        config=load(profile, config_file),
        stats=stats,
        force=force,
        transient=transient_faults(),
        **options,
    )
    return {"statuses": {o.item.source: o.status for o in outcomes}, "stats": stats.as_dict()}


def run_pipeline_flow(
    pipeline: str,
    items: list[WorkItem],
    out: str,
    *,
    profile: str,
    config_file: Optional[str],
    batch_size: int,
    force: bool,
    options: dict[str, Any],
) -> dict:
    """The body every pipeline flow shares."""
    from engine.storage import Dataset

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    config = load(profile, config_file)  # validates before any task starts
    Dataset(out).prepare()
    logger = get_run_logger()
    payload = [i.model_dump() for i in items]
    batches = [payload[i : i + batch_size] for i in range(0, len(payload), batch_size)]
    logger.info("%s: %d items in %d batches", pipeline, len(items), len(batches))
    futures = [run_batch.submit(pipeline, b, out, profile, config_file, force, options) for b in batches]
    statuses: dict[str, str] = {}
    stats = Stats()
    failed = []
    try:
        for batch, future in zip(batches, futures):
            result = future.result(raise_on_failure=False)
            if isinstance(result, BaseException) or not isinstance(result, dict):
                failed.append(result)
                statuses.update({i["source"]: "failed" for i in batch})
                logger.error("a batch of %d items failed: %s", len(batch), result)
                continue
            statuses.update(result["statuses"])
            stats.merge(Stats.from_dict(result["stats"]))
    finally:
        manifest = finish_run(out, stats, config)
    logger.info("%s: tables %s", pipeline, {t: i["rows"] for t, i in manifest["tables"].items()})
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(batches)} batches failed (the others are written): {failed[0]}")
    return {"items": statuses, "tables": manifest["tables"], "stats": stats.as_dict()}


def _items(source: list[str], limit: Optional[int], frame_rate: Optional[float]) -> list[WorkItem]:
    """Work items from every source in turn, at most `limit` of them."""
    from itertools import islice

    from engine.sources import open_source

    if isinstance(source, str):  # a single path given where a list is expected
        source = [source]
    items: list[WorkItem] = []
    for spec in source:
        room = None if limit is None else limit - len(items)
        if room == 0:
            break
        items += islice(open_source(spec, frame_rate=frame_rate), room)
    return items


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
    from schemas import EntityRef

    parsed = [EntityRef.parse(e).model_dump() for e in entities]
    return run_pipeline_flow(
        "clip-and-track",
        [WorkItem(source=v) for v in videos],
        out,
        profile=profile,
        config_file=config_file,
        batch_size=batch_size,
        force=force,
        options={"entities": parsed, "baseline": baseline, "render": render},
    )


@flow(name="build-videorefer-700k", log_prints=True)
def build_videorefer_flow(
    source: list[str],
    out: str,
    profile: str = "default",
    config_file: Optional[str] = None,
    batch_size: int = 8,
    limit: Optional[int] = None,
    data_types: list[str] = ["detailed_caption", "short_caption", "object_qa"],
    frame_rate: Optional[float] = None,
    force: bool = False,
) -> dict:
    """VideoRefer's multi-agent engine (Analyzer, Annotator, Segmentor, Reviewer, Refiner) over caption
    manifests (detailed and short captions) and mask datasets in the MeViS or Ref-YouTube-VOS layout
    (object-level QA). `source` lists manifests, dataset folders or videos; `limit` caps the items."""
    from flows.videorefer import check_data_types

    check_data_types(data_types)
    return run_pipeline_flow(
        "videorefer",
        _items(source, limit, frame_rate),
        out,
        profile=profile,
        config_file=config_file,
        batch_size=batch_size,
        force=force,
        options={"data_types": list(data_types)},
    )


@flow(name="build-strefer", log_prints=True)
def build_strefer_flow(
    source: list[str],
    out: str,
    profile: str = "default",
    config_file: Optional[str] = None,
    batch_size: int = 8,
    limit: Optional[int] = None,
    entities: list[str] = [],
    frame_rate: Optional[float] = None,
    force: bool = False,
) -> dict:
    """Strefer's instruction engine: entities (found by the Entity Recognizer and Referring Parser unless
    given as `EXPRESSION[:NOUN]`), clips, masklets, transcripts and instructions of the 11 task types over
    videos, folders of videos, manifests or frame folders."""
    from schemas import EntityRef

    parsed = [EntityRef.parse(e).model_dump() for e in entities]
    return run_pipeline_flow(
        "strefer",
        _items(source, limit, frame_rate),
        out,
        profile=profile,
        config_file=config_file,
        batch_size=batch_size,
        force=force,
        options={"entities": parsed},
    )
