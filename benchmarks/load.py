"""Load run (not a test): short synthetic videos through `build-strefer` with the tiny models, on each runner.

    python -m benchmarks.load [--videos 200] [--runners local,ray,deployment] [--out benchmarks/out]

For each runner, a fresh dataset; after each run `engine dataset audit` must find every video accounted for.
- `local`: the flow in this process (Prefect's ephemeral API), batches on its thread runner.
- `ray`: a local Ray head started here (`ray start --head`, loopback, 2 CPUs), the batches as Ray tasks.
- `deployment`: a private `prefect server start`, the deployments of prefect.yaml, two process workers on the
  `gpu` pool, and `prefect deployment run build-strefer/tiny --param runner=deployment` (shards of
  `--shard-size` videos as child flow runs).
Reports videos per hour, and the orchestration overhead against a baseline run of the same videos through the
engine alone in this process (`run_items`, no Prefect, no planning): 1 - baseline wall / wall, the share of a
runner's wall time its orchestration adds (target under 5%). The workers of one machine share its cores, so the
engine alone on those cores is the bound for every runner; on N GPU machines the bound is N times faster. Then the chat batching
queue: backend calls per chat request of a local run with 4 videos in flight, with the queue and without
(`chat_queue.max_batch: 1`). Writes <out>/load.md and <out>/load.json. A 200-video run takes long on a 2-core
machine (the tiny models still decode, detect and track every video): `--videos 24` gives the shape quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENTITIES = ["square:box"]


def make_videos(folder: Path, n: int) -> Path:
    """`n` one-second videos (4 frames at 4 fps), each with its own background: distinct contents."""
    from tests import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        background = (40 + i % 200, 180 - (7 * i) % 150, 60 + (13 * i) % 190)
        synthetic.make_video(
            folder / f"{i:04d}.mp4", width=96, height=64, fps=4, num_frames=4,
            scenes=[synthetic.SceneSpec(0, background)],
            shapes=[synthetic.ShapeSpec("square", "box", (230, 30, 200), "rect", (12, 12),
                                        synthetic._linear((10, 32), (86, 32), 4))],
        )
    return folder


def baseline(videos: Path, out: Path) -> float:
    """Seconds the engine alone takes over the videos in this process: models loaded, one writer, no Prefect."""
    from engine.stats import Stats
    from engine.storage import Dataset
    from engine.writer import TableWriter
    from flows.pipelines import iter_items, load, run_items

    config, items = load("tiny"), list(iter_items([str(videos)]))
    run_items("strefer", items[:1], str(out / "warm"), config=load("tiny"), stats=Stats(), entities=ENTITIES)  # load models
    start = time.perf_counter()
    with TableWriter(Dataset(str(out / "baseline")), "baseline") as writer:
        run_items("strefer", items, str(out / "baseline"), config=config, stats=Stats(), writer=writer, entities=ENTITIES)
    return time.perf_counter() - start


def _audit(out: Path, videos: Path) -> int:
    from flows.audit import audit

    return audit(str(out), [str(videos)]).missing


def _config(tmp: Path, name: str, text: str) -> str:
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def run_in_process(runner: str, videos: Path, out: Path, config_file: str, batch_size: int) -> dict[str, Any]:
    from flows.prefect_flows import build_strefer_flow

    start = time.perf_counter()
    result = build_strefer_flow(
        source=str(videos), out=str(out), profile="tiny", config_file=config_file, batch_size=batch_size,
        entities=ENTITIES, runner=runner,
    )
    return {"wall_s": time.perf_counter() - start, "items": result["items"], "stats": result["stats"]}


def start_ray(tmp: Path) -> tuple[str, dict[str, str]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run(
        [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
         "--include-dashboard", "false", "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180,
    )
    return f"127.0.0.1:{port}", env


def run_deployment(videos: Path, out: Path, tmp: Path, batch_size: int, shard_size: int, workers: int) -> dict[str, Any]:
    """Through a private Prefect server and `workers` process workers on the gpu pool (the test suite's stack)."""
    from engine.storage import Dataset
    from tests.test_prefect_server import _UUID, PrefectStack, _params

    stack = PrefectStack(tmp / "prefect")
    (tmp / "prefect").mkdir(exist_ok=True)
    try:
        stack.wait_healthy(stack.start("server", "server", "start"))
        for pool in ("cpu", "gpu"):
            stack.cli("work-pool", "create", pool, "--type", "process")
        stack.cli("deploy", "--all", timeout=300)
        stack.start("worker", "worker", "start", "--pool", "cpu")
        for i in range(workers):  # one flow run at a time each, as a GPU worker runs
            stack.start(f"gpu-worker-{i}", "worker", "start", "--pool", "gpu", "--limit", "1")
        config = _config(tmp, "shards", f"pipeline:\n  orchestration:\n    shard_size: {shard_size}\n")
        params = {"source": str(videos), "out": str(out), "runner": "deployment", "config_file": config,
                  "batch_size": batch_size, "entities": ENTITIES}
        start = time.perf_counter()
        run = stack.wait_final(_UUID.search(stack.cli("deployment", "run", "build-strefer/tiny", *_params(params))).group(1), timeout=24 * 3600)
        wall = time.perf_counter() - start
        if run["state_type"] != "COMPLETED":
            raise SystemExit(f"the deployment run ended {run['state_type']}:\n{stack.reports()}")
        version = Dataset(str(out)).versions()[-1].record
        return {"wall_s": wall, "items": version.counts, "stats": json.loads(version.stats)}
    finally:
        stack.stop()


def chat_calls(videos: Path, tmp: Path, batch_size: int) -> dict[str, Any]:
    """Backend calls per chat request with and without the queue, 4 videos in flight, in this process."""
    from engine.models import factory

    out = {}
    for name, queue in (("queue", "{}"), ("no queue", "{max_batch: 1}")):
        factory._QUEUES.clear()
        factory._LOADED.clear()
        config = _config(tmp, f"chat-{name.replace(' ', '-')}", f"pipeline:\n  runner: {{videos_in_flight: 4}}\n  chat_queue: {queue}\n")
        run_in_process("local", videos, tmp / f"chat-{name.replace(' ', '-')}", config, batch_size)
        counts = [q.counts() for q in factory._QUEUES.values()]
        requests, calls = sum(c.requests for c in counts), sum(c.backend_calls for c in counts)
        out[name] = {"requests": requests, "backend_calls": calls, "calls_per_request": calls / requests if requests else 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--runners", default="local,ray,deployment")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--gpu-workers", type=int, default=2, help="process workers on the gpu pool for `deployment`")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    tmp = Path(tempfile.mkdtemp(prefix="engine-load-"))
    results: dict[str, Any] = {"videos": args.videos}
    try:
        videos = make_videos(tmp / "videos", args.videos)
        results["baseline_s"] = base = baseline(videos, tmp)
        print("baseline", f"{base:.1f} s", flush=True)
        for runner in args.runners.split(","):
            out = tmp / f"ds-{runner}"
            if runner == "deployment":
                row, workers = run_deployment(videos, out, tmp, args.batch_size, args.shard_size, args.gpu_workers), args.gpu_workers
            elif runner == "ray":
                address, _ = start_ray(tmp)
                try:
                    config = _config(tmp, "ray", f"pipeline:\n  orchestration:\n    ray_address: '{address}'\n")
                    row, workers = run_in_process("ray", videos, out, config, args.batch_size), 2
                finally:
                    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
            else:
                row, workers = run_in_process("local", videos, out, _config(tmp, "local", "pipeline: {}\n"), args.batch_size), 1
            row.update(
                videos_per_hour=args.videos / row["wall_s"] * 3600,
                overhead_share=1 - base / row["wall_s"],
                workers=workers,
                unaccounted=_audit(out, videos),
            )
            row.pop("stats")
            results[runner] = row
            print(runner, json.dumps(row), flush=True)
        results["chat"] = chat_calls(make_videos(tmp / "chat-videos", min(args.videos, 12)), tmp, args.batch_size)
        print("chat", json.dumps(results["chat"]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Load run: {args.videos} videos through build-strefer (tiny models, {os.cpu_count()} cores); "
             f"the engine alone: {results['baseline_s']:.0f} s", "",
             "| runner | workers | wall s | videos/hour | orchestration overhead | items | unaccounted |", "|---|---|---|---|---|---|---|"]
    for runner in args.runners.split(","):
        r = results[runner]
        lines.append(f"| {runner} | {r['workers']} | {r['wall_s']:.0f} | {r['videos_per_hour']:.0f} | {r['overhead_share']:.1%} | {r['items']} | {r['unaccounted']} |")
    chat = results["chat"]
    lines += ["", "| chat | requests | backend calls | calls per request |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['requests']} | {v['backend_calls']} | {v['calls_per_request']:.2f} |" for k, v in chat.items()]
    (args.out / "load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
