"""The deployment path a user takes, against a real `prefect server start` (not `prefect_test_harness`).

Server, work pools, `prefect deploy --all` from the repo root, a process worker, `prefect deployment run`, and
the dataset the flow run wrote. Everything goes through the venv's `prefect` executable in subprocesses, as a
user would type it. This catches what the in-process harness cannot, e.g. a fastapi release under which the
server answers 422 to Prefect's own CLI (`'loc': ['body', 'limit'], 'msg': 'Input should be a valid integer'`).

Adding a deployment to the check is one entry in DEPLOYMENTS: its name, a function that builds its parameters
in a temporary folder, and a function that checks what its run left there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests import synthetic

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PREFECT = Path(sys.executable).parent / "prefect"

SERVER_START_TIMEOUT_S = 60  # about 20 s here
CLI_TIMEOUT_S = 60  # one `prefect ...` command (imports take a few seconds)
FLOW_RUN_TIMEOUT_S = 480  # scheduled -> picked up by the worker -> a final state (tiny models on a busy machine)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
LOG_TAIL_CHARS = 6000


# -- the deployments under test ----------------------------------------------------------------------------


def _clip_and_track_params(tmp: Path) -> dict[str, Any]:
    video = tmp / "short.mp4"
    synthetic.short_video(video, seconds=2.0, fps=4)  # 8 frames: short even on a busy 2-core machine
    return {"videos": [str(video)], "entities": ["dog:dog"], "out": str(tmp / "dataset")}


def _check_clip_and_track(tmp: Path, params: dict[str, Any]) -> None:
    from engine.storage import Dataset

    out = Path(params["out"])
    manifest_path = out / "manifest.json"
    assert manifest_path.is_file(), f"no manifest.json in {out}: {sorted(p.name for p in out.iterdir())}"
    manifest = json.loads(manifest_path.read_text())
    for table, info in manifest["tables"].items():  # one clean run: the plain Delta snapshot is the dataset
        assert Dataset(str(out)).arrow_dataset(table).count_rows() == info["rows"], table
    assert len(_read(out, "videos")) == 1


def _read(out: Path, table: str) -> list[dict]:
    from engine.storage import Dataset

    return Dataset(str(out)).read_table(table).to_pylist()


def _run_stats(out: Path) -> dict[str, int]:
    """The counters of the dataset's latest published run."""
    from engine.storage import Dataset

    return json.loads(Dataset(str(out)).versions()[-1].record.stats)["counters"]


def _videorefer_params(tmp: Path) -> dict[str, Any]:
    from tests.test_sources import mevis_layout

    video = tmp / "clip.mp4"
    synthetic.short_video(video, seconds=2.0, fps=4)
    manifest = tmp / "captions.jsonl"
    manifest.write_text(json.dumps({"video": "clip.mp4", "caption": "A dog runs across the grass."}) + "\n")
    mevis_layout(tmp / "mevis")
    return {"source": [str(manifest), str(tmp / "mevis")], "out": str(tmp / "dataset")}


def _check_videorefer(tmp: Path, params: dict[str, Any]) -> None:
    out = Path(params["out"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["items"]["videorefer"].get("done", 0) == 3, manifest["items"]  # 1 caption + 2 MeViS videos
    masklets = _read(out, "masklets")
    assert sum(m["method"] == "source" for m in masklets) == 3  # MeViS anno ids 10, 11 and 20 (12 is empty)
    stats = _run_stats(out)
    for agent in ("analyzer", "annotator", "refiner"):  # these chat agents asked the tiny model for real
        asked = sum(n for k, n in stats.items() if k.startswith(f"{agent}_") and k.endswith("_requests"))
        assert asked > 0, (agent, stats)


def _strefer_params(tmp: Path) -> dict[str, Any]:
    videos = tmp / "videos"
    videos.mkdir()
    synthetic.short_video(videos / "a.mp4", seconds=2.0, fps=4)
    return {"source": [str(videos)], "entities": ["dog:dog"], "out": str(tmp / "dataset")}


def _check_strefer(tmp: Path, params: dict[str, Any]) -> None:
    out = Path(params["out"])
    assert len(_read(out, "videos")) == 1 and _read(out, "clips")
    samples = _read(out, "samples")
    # labels is an Arrow map: pyarrow reads it back as (key, value) pairs
    assert samples and all(s["pipeline"] == "strefer" and dict(s["labels"])["group"].startswith("G") for s in samples)


def _mevis_params(tmp: Path) -> dict[str, Any]:
    from tests.test_sources import mevis_layout

    mevis_layout(tmp / "mevis")
    return {"source": [str(tmp / "mevis")], "out": str(tmp / "dataset")}


def _check_annotated(agent: str, masklets: int) -> Callable[[Path, dict[str, Any]], None]:
    """SAMA's and UFVideo's checks: the release's masks became masklets, and the agent asked the tiny VLM."""

    def check(tmp: Path, params: dict[str, Any]) -> None:
        out = Path(params["out"])
        assert sum(m["method"] == "source" for m in _read(out, "masklets")) == masklets
        stats = _run_stats(out)
        assert stats.get(f"{agent}_requests", 0) > 0, stats

    return check


def _refresh_params(tmp: Path) -> dict[str, Any]:
    """A tiny clip-and-track dataset made here (no Prefect), and a source that adds a video to it."""
    from engine.stats import Stats
    from engine.storage import Dataset
    from engine.writer import TableWriter
    from flows.pipelines import finish_run, load, run_items, run_settings
    from schemas import WorkItem

    old, new = tmp / "old.mp4", tmp / "new.mp4"
    synthetic.short_video(old, seconds=2.0, fps=4)
    synthetic.short_video(new, seconds=1.5, fps=4)
    out, config, stats = str(tmp / "dataset"), load("tiny"), Stats()
    options = {"entities": [{"expression": "dog", "noun": "dog"}], "baseline": False, "render": False}
    with TableWriter(Dataset(out), "first") as writer:
        run_items("clip-and-track", [WorkItem(source=str(old))], out, config=config, stats=stats, writer=writer, **options)
    settings = run_settings("clip-and-track", config, options, sources=[str(old)])
    finish_run(out, stats, config, run_id="first", kind="run", settings=[settings], counts={"done": 1})
    return {"out": out, "source": [str(old), str(new)]}


def _check_refresh(tmp: Path, params: dict[str, Any]) -> None:
    from engine.storage import Dataset

    dataset = Dataset(params["out"])
    first, second = dataset.versions()
    assert second.record.kind == "refresh" and second.record.counts == {"done": 1, "skipped": 1}  # only the new video
    assert len(_read(Path(params["out"]), "videos")) == 2


def _videorefer_shards_params(tmp: Path) -> dict[str, Any]:
    """Four captions, one shard each (`orchestration.shard_size: 1`), run from the `shards` deployment (its
    parent on the cpu pool, runner deployment) as child flow runs of pipeline-shard/gpu on the GPU pool's two
    workers; the tiny models."""
    videos = [tmp / f"clip{i}.mp4" for i in range(2)]
    for i, video in enumerate(videos):
        synthetic.short_video(video, seconds=1.5 + 0.5 * i, fps=4)
    manifest = tmp / "captions.jsonl"
    rows = [{"video": v.name, "caption": f"A dog runs, take {k}."} for v in videos for k in range(2)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp / "shards.yaml"
    config.write_text("pipeline:\n  orchestration:\n    shard_size: 1\n")
    return {"source": str(manifest), "out": str(tmp / "dataset"), "profile": "tiny", "batch_size": 4,
            "config_file": str(config), "data_types": ["short_caption"]}


def _check_videorefer_shards(tmp: Path, params: dict[str, Any], stack: "PrefectStack") -> None:
    from engine.storage import Dataset

    parent = stack.request("GET", "/deployments/name/build-videorefer-700k/shards")
    parents = stack.request("POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [parent["id"]]}}})
    assert [p["work_pool_name"] for p in parents] == ["cpu"]  # the parent held no GPU worker's slot
    assert parent["parameters"]["runner"] == "deployment"
    shard = stack.request("GET", "/deployments/name/pipeline-shard/gpu")
    runs = stack.request("POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [shard["id"]]}}})
    done = [r["id"] for r in runs if r["state_type"] == "COMPLETED"]
    assert len(done) >= 4, [(r["id"], r["state_type"]) for r in runs]
    # a shard's items travel beside the dataset, not as flow-run parameters; the parent removes them at its end
    assert all("items" not in r["parameters"] and r["parameters"]["shard"] for r in runs), runs[0]["parameters"]
    assert not list((Path(params["out"]) / "_runs").glob("*/*")), "shard files left behind"
    logs = {name: _tail_all(stack.home / f"{name}.log") for name in ("gpu-worker", "gpu-worker-2")}
    for name, text in logs.items():  # both workers ran shards of the one `prefect deployment run`
        assert any(run_id in text for run_id in done), f"{name} ran no shard\n{text[-3000:]}"
    sharded = Dataset(params["out"])
    assert sharded.summary()["items"] == {"videorefer": {"done": 4}}
    # the same run with runner local: the same dataset
    local = stack.cli("deployment", "run", "build-videorefer-700k/tiny", *_params({**params, "runner": "local", "out": str(tmp / "local")}))
    run = stack.wait_final(_UUID.search(local).group(1))
    assert run["state_type"] == "COMPLETED", stack.reports()
    for table in ("videos", "masklets", "samples", "rejections"):
        key = {"videos": "video_id", "masklets": "masklet_id", "samples": "sample_id", "rejections": "rejection_id"}[table]
        assert sorted(Dataset(str(tmp / "local")).read_table(table)[key].to_pylist()) == sorted(
            sharded.read_table(table)[key].to_pylist()), table


def _tail_all(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _params(params: dict[str, Any]) -> list[str]:
    args = []
    for key, value in params.items():
        args += ["--param", f"{key}={json.dumps(value)}"]
    return args


@dataclass(frozen=True)
class DeploymentCase:
    name: str  # FLOW_NAME/DEPLOYMENT_NAME, as `prefect deployment run` takes it
    params: Callable[[Path], dict[str, Any]]  # builds its inputs in a temporary folder
    check: Callable[..., None]  # checks the outputs of a COMPLETED run: (tmp, params[, stack])
    needs_stack: bool = False  # the check also takes the PrefectStack


DEPLOYMENTS = [
    DeploymentCase("clip-and-track/tiny-wiring-check", _clip_and_track_params, _check_clip_and_track),
    DeploymentCase("build-videorefer-700k/tiny", _videorefer_params, _check_videorefer),
    DeploymentCase("build-strefer/tiny", _strefer_params, _check_strefer),
    # anno ids 10 and 11 of v1; SAMA skips v2, whose one object (20) UFVideo keeps
    DeploymentCase("build-sama/tiny", _mevis_params, _check_annotated("sama_annotator", 2)),
    DeploymentCase("build-ufvideo/tiny", _mevis_params, _check_annotated("ufvideo_annotator", 3)),
    DeploymentCase("refresh-dataset/nightly", _refresh_params, _check_refresh),
    DeploymentCase("build-videorefer-700k/shards", _videorefer_shards_params, _check_videorefer_shards, needs_stack=True),
]


# -- processes ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return text[-LOG_TAIL_CHARS:]


class Background:
    """A long-running command in its own process group, its output in a log file; stop() ends it and every
    descendant (a process worker starts each flow run as a child process)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.name, self.log = name, log
        self._file = open(log, "wb")
        self.proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=self._file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def report(self) -> str:
        return f"--- {self.name} log ({self.log}) ---\n{_tail(self.log)}"

    def stop(self) -> None:
        import psutil

        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        for p in descendants:  # children that left the process group
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(descendants, timeout=5)
        self._file.close()


class PrefectStack:
    """A private Prefect server with pools `cpu` and `gpu`, `prefect deploy --all` done, and a `cpu` worker."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(home / "prefect-home"),
            PREFECT_API_URL=self.api,
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="false",  # PREFECT_UI_ENABLED is its older alias
            PREFECT_CLI_PROMPT="false",
            PREFECT_WORKER_QUERY_SECONDS="2",  # default 10 s: the worker would idle most of the test
            ENGINE_CHECKOUT=str(REPO),  # the pull step of prefect.yaml cds there
            ENGINE_DATASET=str(home / "nightly-dataset"),  # the nightly refresh's default dataset (overridden per run)
            HF_HUB_OFFLINE="1",
            # torch's default of one thread per core thrashes when the CPUs are shared (tests in parallel): the
            # same tiny run took 3.4 min with the default and 1.3 min with 1 thread on 2 busy cores
            OMP_NUM_THREADS="1",
            COLUMNS="200",  # rich tables in the CLI's output (and in failure messages) unabridged
        )
        self.env = env
        self.background: list[Background] = []

    def reports(self) -> str:
        return "\n".join(b.report() for b in self.background)

    def start(self, name: str, *args: str) -> Background:
        proc = Background(name, [str(PREFECT), *args], self.env, REPO, self.home / f"{name}.log")
        self.background.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.background):  # the worker before the server
            proc.stop()

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> str:
        cmd = [str(PREFECT), *args]
        try:
            done = subprocess.run(
                cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"`prefect {' '.join(args)}` ran past {timeout} s\n{e.stdout}\n{e.stderr}\n{self.reports()}")
        if done.returncode != 0:
            pytest.fail(
                f"`prefect {' '.join(args)}` exited {done.returncode}\n--- stdout ---\n{done.stdout}\n"
                f"--- stderr ---\n{done.stderr}\n{self.reports()}"
            )
        return done.stdout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.api + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def wait_healthy(self, server: Background) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                pytest.fail(f"`prefect server start` exited {server.proc.returncode}\n{self.reports()}")
            try:
                if self.request("GET", "/health") is True:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        pytest.fail(f"no answer from {self.api}/health within {SERVER_START_TIMEOUT_S} s\n{self.reports()}")

    def wait_final(self, flow_run_id: str, timeout: float = FLOW_RUN_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            run = self.request("GET", f"/flow_runs/{flow_run_id}")
            if run.get("state_type") in FINAL_STATES:
                return run
            time.sleep(1)
        pytest.fail(
            f"flow run {flow_run_id} still {run.get('state_type')} ({run.get('state_name')}) after {timeout} s\n"
            f"{self.reports()}"
        )


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory) -> Iterator[PrefectStack]:
    if not PREFECT.exists():
        pytest.skip(f"no prefect executable next to {sys.executable}")
    stack = PrefectStack(tmp_path_factory.mktemp("prefect-stack"))
    try:
        stack.wait_healthy(stack.start("server", "server", "start"))
        # prefect.yaml deploys to pools `gpu` and `cpu`; `deploy --all` needs both. No worker polls `gpu` here.
        for pool in ("cpu", "gpu"):
            stack.cli("work-pool", "create", pool, "--type", "process")
        stack.cli("deploy", "--all", timeout=300)  # about 20 deployments, each its own API round trips
        # the calls that answered 422 with fastapi>=0.151
        pools = stack.cli("work-pool", "ls")
        assert "cpu" in pools and "gpu" in pools, pools
        stack.cli("deployment", "ls")
        for case in DEPLOYMENTS:
            try:
                stack.request("GET", f"/deployments/name/{case.name}")
            except urllib.error.HTTPError as e:
                pytest.fail(f"{case.name} not deployed by `prefect deploy --all`: HTTP {e.code}\n{stack.reports()}")
        nightly = stack.request("GET", "/deployments/name/refresh-dataset/nightly")
        (schedule,) = [s["schedule"] for s in nightly["schedules"]]
        assert (schedule["cron"], schedule["timezone"]) == ("0 2 * * *", "UTC"), schedule  # 02:00 every night
        shown = stack.cli("deployment", "inspect", "refresh-dataset/nightly")
        assert "0 2 * * *" in shown, shown
        stack.start("worker", "worker", "start", "--pool", "cpu")
        # the nightly refresh's and the shards' pool; one flow run at a time per worker, as one per GPU would be,
        # so shards in flight together must spread over both workers
        stack.start("gpu-worker", "worker", "start", "--pool", "gpu", "--limit", "1")
        stack.start("gpu-worker-2", "worker", "start", "--pool", "gpu", "--limit", "1")
        yield stack
    finally:
        stack.stop()


_UUID = re.compile(r"UUID:\s*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


@pytest.mark.parametrize("case", DEPLOYMENTS, ids=[c.name + (" runner=deployment" if c.needs_stack else "") for c in DEPLOYMENTS])
def test_deployment_run_completes(prefect_stack: PrefectStack, case: DeploymentCase, tmp_path: Path) -> None:
    params = case.params(tmp_path)
    out = prefect_stack.cli("deployment", "run", case.name, *_params(params))
    match = _UUID.search(out)
    assert match, f"no flow run id in the output of `prefect deployment run`:\n{out}"
    run = prefect_stack.wait_final(match.group(1))
    assert run["state_type"] == "COMPLETED", (
        f"{case.name}: flow run ended {run['state_type']} ({run['state_name']}): "
        f"{(run.get('state') or {}).get('message')}\n{prefect_stack.reports()}"
    )
    if case.needs_stack:
        case.check(tmp_path, params, prefect_stack)
    else:
        case.check(tmp_path, params)
