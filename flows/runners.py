"""Where a run's batches execute (`runner`): `local` (tasks on the flow's own task runner, in its process),
`ray` (tasks on a Ray cluster through prefect-ray), or `deployment` (shards of many batches, each a child flow
run of the `pipeline-shard` deployment on the GPU work pool, so N workers on N machines share one run; the parent
runs elsewhere, from a pipeline's `shards` deployment on the cpu pool, so that it holds no GPU worker's slot).

A dispatcher takes planned batches as the flow streams them, keeps a bounded number in flight, and adds what
comes back to the run's counts and stats. Nothing here knows a pipeline.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, Union

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
    # GPUs a batch asks Ray for; `auto`: 1 where the run's device is a GPU, else 0 (see `gpus_per_batch`)
    ray_gpus_per_batch: Union[float, Literal["auto"]] = "auto"
    shard_size: int = 1000  # items per child flow run (runner: deployment)
    max_shards_in_flight: int = 8
    shard_deployment: str = "pipeline-shard/gpu"
    shard_start_warning_s: float = 300  # the parent warns when no shard has started this long after the first
    # A process's writer commits when its buffer holds `flush_mb` of Arrow data (its memory bound; zstd Parquet on
    # disk is several times smaller) or its oldest item is `flush_minutes` old (what a crash can lose).
    flush_mb: float = 256
    flush_minutes: float = 10

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.shard_size < 1 or self.max_shards_in_flight < 1 or self.shard_start_warning_s < 0:
            raise ValueError("shard_size and max_shards_in_flight must be >= 1, shard_start_warning_s >= 0")
        if not self.flush_mb > 0 or not self.flush_minutes > 0:
            raise ValueError(f"flush_mb and flush_minutes must be > 0, got {self.flush_mb}, {self.flush_minutes}")
        gpus = self.ray_gpus_per_batch
        if gpus != "auto" and (isinstance(gpus, (str, bool)) or not isinstance(gpus, (int, float)) or gpus < 0):
            raise ValueError(f"ray_gpus_per_batch must be auto or a number >= 0, got {gpus!r}")

    @property
    def flush(self) -> dict[str, float]:
        """The writer's flush settings (`shared_writer(..., **flush)`)."""
        return {"flush_mb": self.flush_mb, "flush_minutes": self.flush_minutes}


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

    def add(self, payload: list[dict], previous: dict[str, dict], ids: Sequence[str]) -> None:
        """A batch: its items, the `items` rows they may supersede (by item id) and their item ids, in order."""
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
    counts and stats beside the dataset; its failure counts its items as failed. When no shard has started
    `shard_start_warning_s` after the first was scheduled, the parent says so (no free worker on the shards'
    pool; a parent on that pool holds a slot itself)."""

    poll_s = 5.0  # how often a shard's flow run is read while the parent waits for it

    def __init__(self, dataset: Any, *, parameters: dict[str, Any], settings: RunnerSettings, log: Any) -> None:
        self.dataset, self.parameters, self.settings, self.log = dataset, parameters, settings, log
        self.counts: Counter = Counter()
        self.stats = Stats()
        self._items: list[dict] = []
        self._ids: list[str] = []
        self._previous: dict[str, dict] = {}  # of the items not yet sent only
        self._pool = ThreadPoolExecutor(max_workers=settings.max_shards_in_flight, thread_name_prefix="engine-shard")
        self._futures: deque[tuple[int, str, Future]] = deque()
        self._first_sent: float | None = None
        self._started = threading.Event()  # a shard of this run left Scheduled/Pending
        self._warned = threading.Event()
        warn_if_parent_holds_a_shard_slot(settings, log)

    def add(self, payload: list[dict], previous: dict[str, dict], ids: Sequence[str]) -> None:
        """A batch: its items, the `items` rows they may supersede (by item id) and their item ids, in order."""
        self._items += payload
        self._ids += ids
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
        ids, self._ids = self._ids[:n], self._ids[n:]
        previous = {i: self._previous.pop(i) for i in ids if i in self._previous}  # this shard's items' rows only
        write_shard_items(self.dataset, self.parameters["run_id"], shard, items, previous)
        parameters = {**self.parameters, "shard": shard}
        if self._first_sent is None:
            self._first_sent = time.monotonic()
        # the flow run's context goes with the call, so the shard is recorded as a child of this flow run
        context = contextvars.copy_context()
        self._futures.append((n, shard, self._pool.submit(context.run, self._run, parameters)))
        self._collect(self.settings.max_shards_in_flight)

    def _run(self, parameters: dict[str, Any]) -> Any:
        """The shard's flow run, once final: created now (as a subflow, so it shows under this run in the UI),
        then read every `poll_s` however long it takes."""
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        run = run_deployment(self.settings.shard_deployment, parameters=parameters, timeout=0, as_subflow=True)
        with get_client(sync_client=True) as client:
            while not (run.state is not None and run.state.is_final()):
                self._waiting(run.state)
                time.sleep(self.poll_s)
                run = client.read_flow_run(run.id)
        self._started.set()
        return run

    def _waiting(self, state: Any) -> None:
        """A shard not yet final is in `state`: note that one started, or warn (once) that none has."""
        if state is not None and not (state.is_scheduled() or state.is_pending()):
            self._started.set()
            return
        waited = 0.0 if self._first_sent is None else time.monotonic() - self._first_sent
        if self._started.is_set() or waited < self.settings.shard_start_warning_s or self._warned.is_set():
            return
        self._warned.set()
        self.log.warning(
            "no shard of this run has started %.0f s after the first was scheduled: is a worker with a free slot "
            "polling the work pool of %s? (A parent flow run on that pool holds one of its slots: run the "
            "pipeline's `shards` deployment, on the cpu pool, instead.) The run waits for its shards.",
            waited, self.settings.shard_deployment,
        )

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


def warn_if_parent_holds_a_shard_slot(settings: RunnerSettings, log: Any) -> None:
    """Warn when this (parent) flow run was started by a worker of the pool its shards run on: with one worker
    there, started with `--limit 1` as GPU workers are, the parent holds the only slot and no shard can start."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    pool = getattr(getattr(context, "flow_run", None), "work_pool_name", None)
    if not pool:  # not a deployment's flow run (Python, `engine run`): no worker slot held
        return
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            shards_pool = client.read_deployment_by_name(settings.shard_deployment).work_pool_name
    except Exception:  # noqa: BLE001 - the shard deployment is read again (and its absence reported) by the first shard
        return
    if shards_pool == pool:
        log.warning(
            "this flow run holds a worker slot of the %s pool, where its shards (%s) run: unless another worker "
            "there has a free slot, no shard can start. Run the pipeline's `shards` deployment (cpu pool) instead.",
            pool, settings.shard_deployment,
        )


def gpus_per_batch(settings: RunnerSettings, device: str, cluster_gpus: Callable[[], float]) -> float:
    """GPUs a Ray batch asks for: `ray_gpus_per_batch` where it is a number; with `auto`, 1 where the run's
    device (`pipeline.device`) is a GPU: `cuda`, `cuda:N`, or `auto` on a cluster that has GPUs
    (`cluster_gpus()`, asked only then); else 0. A batch that asks for none sees no GPU on its worker."""
    if settings.ray_gpus_per_batch != "auto":
        return float(settings.ray_gpus_per_batch)
    if device == "auto":
        return 1.0 if cluster_gpus() > 0 else 0.0
    return 1.0 if device.startswith("cuda") else 0.0


def ray_gpus(settings: RunnerSettings, device: str) -> float:
    """`gpus_per_batch` on the Ray cluster this process is connected to (prefect-ray's task runner started it)."""

    def cluster_gpus() -> float:
        import ray

        return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0

    return gpus_per_batch(settings, device, cluster_gpus)


def ray_options(num_gpus: float) -> Any:
    """What each batch asks Ray for. `max_calls=0`: the worker process lives on after a task (Ray's default for
    a task that asks for a GPU is 1, a new process per task), so the models it loaded serve the next batch."""
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=num_gpus, max_calls=0)
