"""Benchmark of the chat queue (not a test): backend calls per chat request, and wall time, with and without
coalescing across the videos in flight.

    python -m benchmarks.chat_queue [--videos 12] [--in-flight 1 2 4] [--max-wait-ms 20] [--call-ms 60] [--row-ms 4]
                                    [--out benchmarks/out]

Short synthetic videos go through the shared runner with `videos_in_flight` N. Each video's one stage plays
VideoRefer's chat chain with the engine's own helpers (`ask_json` / `ask_text`, retries included): the
Analyzer (one request), then per noun (1 to 4, drawn per video) the Annotator (dynamic and static), the
region captioner, the Reviewer's judge and the Refiner (merge, then QA), with vision work between them
(a sleep of 10-60 ms, drawn, where the detector and tracker would run). One judge answer in five is invalid
JSON the first time, so `ask_json` asks that request again alone.

The chat model is `SimulatedEngine`, a fake that stands in for a GPU engine running one batch at a time
(transformers' `generate`, vLLM's offline `LLM.chat`): a call costs `call_ms` plus `row_ms` per request, so a
batch of 8 costs little more than a batch of 1. It sits behind the real `ChatQueue`, once with coalescing off
(`max_batch: 1`, every `chat()` its own backend call: the baseline) and once on (the default `max_batch`,
`--max-wait-ms`, by default the default's). Reports per N: requests, backend calls, calls per request,
requests per call, the longest a call stayed queued (for partners, or for the engine busy with an earlier
call), wall time and videos per hour. Writes <out>/chat_queue.json.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel

from engine.models.interfaces import ChatMessage, ChatRequest


class Verdict(BaseModel):
    reason: str
    same_object: bool


class Nouns(BaseModel):
    nouns: list[str]


class SimulatedEngine:
    """A fake chat engine: one call at a time, `call_ms + row_ms * len(requests)` each; answers the schema
    asked (a judge's first answer invalid one time in five), text otherwise. Records every call's size."""

    model_id = "simulated/engine"

    def __init__(self, *, call_ms: float, row_ms: float) -> None:
        self.call_s, self.row_s = call_ms / 1000, row_ms / 1000
        self.sizes: list[int] = []
        self._lock = threading.Lock()

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        with self._lock:
            time.sleep(self.call_s + self.row_s * len(requests))
            self.sizes.append(len(requests))
        return [self._answer(r) for r in requests]

    @staticmethod
    def _answer(request: ChatRequest) -> str:
        text = str(request.messages[0].content[0])
        if request.json_schema is None:
            return f"a description for {text[:40]}"
        if request.json_schema.get("title") == "Nouns":
            count = 1 + zlib.crc32(text.encode()) % 4
            return json.dumps({"nouns": [f"object {k}" for k in range(count)]})
        if len(request.messages) == 1 and zlib.crc32(text.encode()) % 5 == 0:
            return '{"reason": "unfinished'
        return json.dumps({"reason": "both describe it", "same_object": True})


class ChainStage:
    """Plays one video's chat chain (see the module docstring) through `llm`."""

    name = "chat_chain"

    def __init__(self, llm: Any, seed: int) -> None:
        self.llm = llm
        self.seed = seed

    def start(self, ctx: Any) -> Any:
        from engine.chat import ask_json, ask_text
        from engine.runner import FunctionPass, Outputs

        def ask(*texts: str) -> list[ChatRequest]:
            return [ChatRequest((ChatMessage.user(t),), max_tokens=64) for t in texts]

        def finish(decoded: Any, so_far: Outputs) -> Outputs:
            rng = random.Random(f"{self.seed}:{ctx.item.source}")
            stats, video = ctx.stats, ctx.video_id
            (nouns,) = ask_json(self.llm, ask(f"nouns of {video}"), Nouns, stats=stats, agent="analyzer")
            found = nouns.value.nouns if nouns.ok else []
            for step, agent in (("describe", "annotator"), ("caption region", "region_captioner"),
                                ("judge", "reviewer"), ("merge", "refiner"), ("write QA", "refiner_qa")):
                time.sleep(rng.uniform(0.01, 0.06))  # the vision models' turn
                if agent == "reviewer":
                    ask_json(self.llm, ask(*(f"{step} {n} of {video}" for n in found)), Verdict, stats=stats,
                             agent=agent)
                else:
                    per_noun = 2 if agent == "annotator" else 1  # dynamic and static
                    texts = [f"{step} {n} ({k}) of {video}" for n in found for k in range(per_noun)]
                    ask_text(self.llm, ask(*texts), stats=stats, agent=agent)
            return Outputs()

        return FunctionPass(finish)


def run_once(items: list, in_flight: int, coalesce: bool, args: argparse.Namespace, out: Path) -> dict:
    from engine.config import load_config
    from engine.models.chat_queue import ChatQueue, ChatQueueConfig
    from engine.runner import Pipeline, Runner
    from engine.stats import Stats
    from engine.storage import Dataset

    engine = SimulatedEngine(call_ms=args.call_ms, row_ms=args.row_ms)
    settings = ChatQueueConfig(max_wait_ms=args.max_wait_ms) if coalesce else ChatQueueConfig(max_batch=1)
    queue = ChatQueue(engine, settings, calls_at_once=1)
    stats = Stats()
    pipeline = Pipeline(name="bench-chat-queue", stages=[ChainStage(queue, seed=0)], config=load_config("tiny"),
                        models={"llm": engine.model_id})
    dataset = Dataset(str(out / f"n{in_flight}-{'on' if coalesce else 'off'}"))
    start = time.perf_counter()
    outcomes = Runner(pipeline, dataset, stats=stats, force=True, videos_in_flight=in_flight, prefetch=1).run(items)
    wall = time.perf_counter() - start
    assert all(o.status == "done" for o in outcomes), [o.detail for o in outcomes if o.status != "done"]
    counts = queue.counts()
    assert counts.backend_calls == len(engine.sizes) and counts.requests == sum(engine.sizes)
    return {
        "videos_in_flight": in_flight,
        "queue": f"max_batch {settings.max_batch}, max_wait_ms {settings.max_wait_ms:g}" if coalesce else "off",
        "chat_calls": counts.chat_calls,
        "requests": counts.requests,
        "backend_calls": counts.backend_calls,
        "calls_per_request": round(counts.calls_per_request, 3),
        "requests_per_call": round(counts.requests / counts.backend_calls, 2),
        "largest_call": max(engine.sizes),
        "retried_requests": sum(v for k, v in stats.counters.items() if k.endswith("_retried_requests")),
        "longest_queued_ms": round(counts.longest_queued_s * 1000, 1),
        "wall_s": round(wall, 2),
        "videos_per_hour": round(len(items) / wall * 3600),
    }


def main() -> None:
    from engine.models.chat_queue import ChatQueueConfig
    from tests import synthetic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-wait-ms", type=float, default=ChatQueueConfig().max_wait_ms)
    parser.add_argument("--call-ms", type=float, default=60.0, help="the simulated engine's cost of a call")
    parser.add_argument("--row-ms", type=float, default=4.0, help="its cost of each request of a call")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    from schemas import WorkItem

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        items = []
        for k in range(args.videos):
            truth = synthetic.short_video(folder / f"v{k}.mp4", seconds=0.5 + 0.1 * (k % 5), fps=10)
            items.append(WorkItem(source=str(truth.path)))
        for in_flight in args.in_flight:
            for coalesce in (False, True):
                row = run_once(items, in_flight, coalesce, args, folder)
                rows.append(row)
                print(f"in flight {in_flight}  queue {row['queue']:<28} requests {row['requests']:4d}  "
                      f"backend calls {row['backend_calls']:4d}  calls/request {row['calls_per_request']:.3f}  "
                      f"requests/call {row['requests_per_call']:5.2f}  "
                      f"longest queued {row['longest_queued_ms']:6.1f} ms  "
                      f"wall {row['wall_s']:6.2f} s  videos/h {row['videos_per_hour']}", flush=True)
    report = {"benchmark": "chat_queue", "videos": args.videos, "call_ms": args.call_ms, "row_ms": args.row_ms,
              "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_queue.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'chat_queue.json'}")


if __name__ == "__main__":
    main()
