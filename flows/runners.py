"""Where a run's batches execute (`runner`): `local` (tasks on the flow's own task runner, in its process),
`ray` (tasks on a Ray cluster through prefect-ray), or `deployment` (shards of many batches, each a child flow
run of the `pipeline-shard` deployment on the GPU work pool, so N workers on N machines share one run).

A dispatcher takes planned batches as the flow streams them, keeps a bounded number in flight, and adds what
comes back to the run's counts and stats. Nothing here knows a pipeline.
"""

from __future__ import annotations

import contextvars
import json
import uuid
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal

from engine.errors import ConfigError
from engine.stats import Stats

RUNNERS = ("local", "ray", "deployment")
Runner = Literal["local", "ray", "deployment"]
# <dataset>/_runs/<run_id>/<shard>.items.json: a shard's work items, written by its parent (items of a mask
# dataset carry their masks: far too big for flow-run parameters); <shard>.json: its counts and stats, for the
# parent. The parent removes the folder when its run ends.
SHARD_STATS = "_runs"


@dataclass(frozen=True)
class RunnerSettings:
    """Settings section `orchestration` (not in any run hash: where work runs never shapes its rows)."""

    runner: Runner = "local"
    ray_address: str = "auto"  # `auto` (a local or the current cluster), or `ray://host:10001`
    ray_gpus_per_batch: float = 0  # GPUs a batch asks Ray for (1 on a GPU cluster; 0 on CPU)
    shard_size: int = 1000  # items per child flow run (runner: deployment)
    max_shards_in_flight: int = 8
    shard_deployment: str = "pipeline-shard/gpu"

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.shard_size < 1 or self.max_shards_in_flight < 1 or self.ray_gpus_per_batch < 0:
            raise ValueError("shard_size and max_shards_in_flight must be >= 1, ray_gpus_per_batch >= 0")


def settings(section: dict[str, Any], runner: str | None) -> RunnerSettings:
    """The config's `orchestration` section, with `runner` (a flow parameter or `--runner`) over it."""
    try:
        return RunnerSettings(**{**section, **({"runner": runner} if runner else {})})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pipeline.orchestration: {exc}") from None


class BatchDispatcher:
    """`local` and `ray`: one task per batch on the flow's task runner, at most `in_flight` submitted at once.
    On Ray each batch commits its own rows before it returns (a Ray worker outlives no flow to flush it)."""

    def __init__(self, submit: Callable[..., Any], *, in_flight: int, commit_each: bool, log: Any) -> None:
        self._submit, self._in_flight, self._commit_each, self._log = submit, in_flight, commit_each, log
        self._queue: deque = deque()
        self.counts: Counter = Counter()
        self.stats = Stats()

    def add(self, payload: list[dict], previous: dict[str, dict]) -> None:
        self._queue.append((len(payload), self._submit(payload, previous, self._commit_each)))
        self._collect(self._in_flight)

    def finish(self) -> None:
        self._collect(0)

    def _collect(self, keep: int) -> None:
        while len(self._queue) > keep:
            n, future = self._queue.popleft()
            result = future.result(raise_on_failure=False)
            if isinstance(result, BaseException) or not isinstance(result, dict):
                self.counts["failed"] += n
                self._log.error("a batch of %d items failed: %s", n, result)
                continue
            self.counts.update(result["counts"])
            self.stats.merge(Stats.from_dict(result["stats"]))


class ShardDispatcher:
    """`deployment`: batches grouped into shards of `shard_size` items, each run as a child flow run of the
    shard deployment (Prefect's `run_deployment`), at most `max_shards_in_flight` at once. A shard writes its
    counts and stats beside the dataset; its failure counts its items as failed."""

    def __init__(self, dataset: Any, *, parameters: dict[str, Any], settings: RunnerSettings, log: Any) -> None:
        self.dataset, self.parameters, self.settings, self.log = dataset, parameters, settings, log
        self.counts: Counter = Counter()
        self.stats = Stats()
        self._items: list[dict] = []
        self._previous: dict[str, dict] = {}
        self._pool = ThreadPoolExecutor(max_workers=settings.max_shards_in_flight, thread_name_prefix="engine-shard")
        self._futures: deque[tuple[int, str, Future]] = deque()

    def add(self, payload: list[dict], previous: dict[str, dict]) -> None:
        self._items += payload
        self._previous.update(previous)
        while len(self._items) >= self.settings.shard_size:  # a shard re-batches its items by batch_size
            self._send(self.settings.shard_size)

    def finish(self) -> None:
        if self._items:
            self._send(len(self._items))
        self._collect(0)
        self._pool.shutdown(wait=True)

    def _send(self, n: int) -> None:
        shard = uuid.uuid4().hex[:12]
        items, self._items = self._items[:n], self._items[n:]
        write_shard_items(self.dataset, self.parameters["run_id"], shard, items, self._previous)
        parameters = {**self.parameters, "shard": shard}
        # the flow run's context goes with the call, so the shard is recorded as a child of this flow run
        context = contextvars.copy_context()
        self._futures.append((n, shard, self._pool.submit(context.run, self._run, parameters)))
        self._previous = {} if not self._items else self._previous  # what a later shard may still need stays
        self._collect(self.settings.max_shards_in_flight)

    def _run(self, parameters: dict[str, Any]) -> Any:
        from prefect.deployments import run_deployment

        # as_subflow: the shard shows under this run in the UI; timeout None: wait for its end, however long
        return run_deployment(self.settings.shard_deployment, parameters=parameters, timeout=None, as_subflow=True)

    def _collect(self, keep: int) -> None:
        while len(self._futures) > keep:
            n, shard, future = self._futures.popleft()
            try:
                run = future.result()
                ok = run.state is not None and run.state.is_completed()
                why = None if ok else (run.state.message if run.state else "no state")
            except Exception as exc:  # the API refused the run: its items are lost to this run, not to the next
                ok, why = False, f"{type(exc).__name__}: {exc}"
            if not ok:
                self.counts["failed"] += n
                self.log.error("shard %s (%d items) failed: %s", shard, n, why)
                continue
            result = read_shard_result(self.dataset, self.parameters["run_id"], shard)
            self.counts.update(result["counts"])
            self.stats.merge(Stats.from_dict(result["stats"]))


def write_shard_items(dataset: Any, run_id: str, shard: str, items: list[dict], previous: dict[str, dict]) -> None:
    """A shard's items, and the `items` rows of the plan that its items may supersede."""
    dataset.write_text(f"{SHARD_STATS}/{run_id}/{shard}.items.json", json.dumps({"items": items, "previous": previous}))


def read_shard_items(dataset: Any, run_id: str, shard: str) -> tuple[list[dict], dict[str, dict]]:
    with dataset.fs.open(f"{dataset.root}/{SHARD_STATS}/{run_id}/{shard}.items.json", "rb") as f:
        payload = json.loads(f.read())
    return payload["items"], payload["previous"]


def write_shard_result(dataset: Any, run_id: str, shard: str, result: dict[str, Any]) -> None:
    dataset.write_json(f"{SHARD_STATS}/{run_id}/{shard}.json", result)


def read_shard_result(dataset: Any, run_id: str, shard: str) -> dict[str, Any]:
    with dataset.fs.open(f"{dataset.root}/{SHARD_STATS}/{run_id}/{shard}.json", "rb") as f:
        return json.loads(f.read())


def forget_shard_results(dataset: Any, run_id: str) -> None:
    path = f"{dataset.root}/{SHARD_STATS}/{run_id}"
    if dataset.fs.exists(path):
        dataset.fs.rm(path, recursive=True)


def ray_task_runner(settings: RunnerSettings) -> Any:
    """prefect-ray's task runner on the configured cluster (the `ray` extra installs it)."""
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise ConfigError("runner ray needs prefect-ray and ray: pip install '.[ray]'") from None
    address = None if settings.ray_address == "auto" else settings.ray_address
    # init_kwargs: a local cluster started here must not ship the working directory (models load from disk)
    return RayTaskRunner(address=address, init_kwargs={"include_dashboard": False})


def ray_options(settings: RunnerSettings) -> Any:
    """What each batch asks Ray for. `max_calls=0`: the worker process lives on after a task (Ray's default for
    a task that asks for a GPU is 1, a new process per task), so the models it loaded serve the next batch."""
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=settings.ray_gpus_per_batch, max_calls=0)
