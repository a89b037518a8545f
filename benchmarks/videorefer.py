"""Benchmark of the VideoRefer pipeline (not a test): how well each agent batches its model requests.

    python -m benchmarks.videorefer [--profile tiny] [--config FILE] [--videos 6] [--out benchmarks/out]

Inputs, written or gathered in a temporary folder:
- a caption manifest (JSONL) of the real videos in ../shared/videos/ (skipped, with a note, where absent),
  topped up with synthetic videos from tests/synthetic.py to reach N videos;
- a tiny MeViS-layout source (JPEG frames, meta_expressions.json, mask_dict.json) with exact masks, one of
  its expressions referring to two objects.
Both go through the source adapters (`engine.sources.open_source`) and one `Runner` batch, all data types on.

Every chat backend role is wrapped in a counting proxy that records each `chat()` call (its batch size and
time) and the agent that sent it (read from the `engine.chat.ask_*` frame that called it). Reports, per
agent (analyzer, annotator dynamic/static, reviewer captioner/judge, refiner merge/qa): requests and backend
calls per video and requests per backend call (the batching), cross-checked with the engine's own
`<agent>_requests` / `<agent>_backend_calls` counters; per data type the samples written (kept/dropped); wall
time per stage (`stats.seconds`). Writes <out>/videorefer.md and <out>/videorefer.json.

The `tiny` profile (default) runs a random-weight Qwen2.5-VL through the real transformers chat backend with
grammar-constrained JSON: every request is a real generate call, but the answers are meaningless, so the
funnel (what survives each agent) says nothing about quality, only which paths ran. For a run of about two
minutes on two CPU cores the tiny profile gets `CPU_OVERLAY` (smaller frames, 1 fps tracking, short text
answers), JSON strings capped at `CPU_JSON_STRING_CAP` characters in the grammar, and chat seed
`TINY_CHAT_SEED`; `--as-configured` and `--chat-seed -1` turn these off. With tiny models the Reviewer and the
Refiner's merge are never reached: the tiny detector's vocabulary never matches the random nouns, so no
caption noun gets a masklet. A real profile (`--profile default`, on a GPU) exercises every agent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
# The agents as `engine.chat.ask_*` name them (the `agent=` of each call).
AGENTS = (
    "analyzer", "annotator_dynamic", "annotator_static", "reviewer_captioner", "reviewer_judge", "refiner_merge",
    "refiner_qa",
)
# Captions of the shared videos, in the style of Panda-70M (one sentence or two).
CAPTIONS = {
    "01_dog": "A young woman in a white shirt and jeans walks a small brown and white dog on a leash along a paved "
    "path between planted beds, then bends down to pet it.",
    "03_blocks": "Two hands move colorful wooden letter blocks around on a black cutting mat, sliding them into "
    "new positions.",
    "04_coffee": "A person in a white t-shirt holds a blue mug and pours coffee into it from a shiny gooseneck "
    "kettle.",
    "bedroom": "A little girl in a blue skirt jumps on a bed in a bedroom while a small boy kneels beside her.",
}
# Settings laid over the tiny profile (unless --as-configured is given; over a --config file too) so a run fits
# in about two minutes on two CPU cores: fewer and smaller frames for the video LLM, the tracker at 1 fps and in
# float32 (bfloat16 autocast is ~3x slower on a CPU without bf16 units), short free-text answers (a random model
# never stops early, so each text request costs its whole max_tokens). Which requests are sent and how they are
# batched does not change; how many there are follows from what survives each agent, which with random weights
# is chance either way.
CPU_OVERLAY = {
    "dtype": "float32",
    "videorefer": {"annotator_frames": 4, "frame_max_side": 224},
    "segmentor": {"track_fps": 1.0},
    "annotator": {"static_max_tokens": 32},
    "reviewer": {"caption_max_tokens": 32},
    "refiner": {"merge_max_tokens": 48},
}
# With the overlay, the grammar also caps every JSON string at this many characters. The tiny profile's own
# `max_string_length` bounds only strings that have no maxLength, and the agents' schemas give theirs 60 to
# 2000 characters: a random model then writes each JSON answer until max_tokens cuts it (invalid, retried twice).
CPU_JSON_STRING_CAP = 24
# Seed of the tiny chat model's random weights. With the profile's seed 0 it never marks a subject, so the
# Analyzer rejects every detailed caption and nothing of that path runs; with 2 it lists nouns.
TINY_CHAT_SEED = 2
SYNTHETIC_CAPTION = (
    "A red person walks from left to right while a white ball circles in the middle and a cyan box slides "
    "down, as the background changes color."
)


# -- the counting proxy ---------------------------------------------------------------------------------------


class CountingChat:
    """A `ChatModel` that forwards to `inner` and records each `chat()` call: role, agent, batch size, seconds.
    With `cap_strings`, the JSON Schema sent for grammar-constrained decoding caps every string at that many
    characters (answers are still validated against the agent's own schema by `engine.chat`)."""

    def __init__(self, inner: Any, role: str, calls: list[dict], *, cap_strings: int | None = None) -> None:
        self.inner, self.role, self.calls, self.cap_strings = inner, role, calls, cap_strings
        self.model_id = getattr(inner, "model_id", "?")
        self._lock = threading.Lock()

    def chat(self, requests: Sequence[Any]) -> list[str]:
        from dataclasses import replace

        agent = _calling_agent()
        if self.cap_strings:
            requests = [
                replace(r, json_schema=cap_strings(r.json_schema, self.cap_strings)) if r.json_schema else r
                for r in requests
            ]
        start = time.perf_counter()
        answers = self.inner.chat(requests)
        seconds = time.perf_counter() - start
        with self._lock:
            self.calls.append({
                "role": self.role, "agent": agent, "batch": len(requests), "seconds": round(seconds, 4),
                "json": sum(r.json_schema is not None for r in requests),
            })
        return answers

    def __getattr__(self, name: str) -> Any:  # anything else a backend offers (e.g. image_size)
        return getattr(self.inner, name)


def cap_strings(schema: Any, limit: int) -> Any:
    """A copy of a JSON Schema whose free strings have maxLength <= `limit` (never below their minLength)."""
    if isinstance(schema, list):
        return [cap_strings(x, limit) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: cap_strings(v, limit) for k, v in schema.items()}
    if out.get("type") == "string" and not any(k in out for k in ("enum", "const", "pattern", "format")):
        out["maxLength"] = max(min(out.get("maxLength", limit), limit), out.get("minLength", 0))
    return out


def _calling_agent() -> str:
    """The `agent` argument of the `engine.chat.ask_text`/`ask_json` call on the stack ('?' when called
    directly)."""
    import engine.chat

    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_filename == engine.chat.__file__ and code.co_name in ("ask_text", "ask_json"):
            return str(frame.f_locals.get("agent", "?"))
        frame = frame.f_back
    return "?"


# -- inputs ---------------------------------------------------------------------------------------------------


def write_manifest(folder: Path, n_videos: int, shared: Path) -> tuple[Path, list[dict]]:
    """A JSONL caption manifest: up to N real videos, then synthetic ones to reach N."""
    from tests.synthetic import long_video

    rows: list[dict] = []
    real = sorted(shared.glob("*.mp4")) if shared.is_dir() else []
    if not real:
        print(f"note: no real videos in {shared}; the manifest holds synthetic videos only", file=sys.stderr)
    for path in real[:n_videos]:
        caption = CAPTIONS.get(path.stem, "A short video of an everyday scene with people and objects moving.")
        rows.append({"video": str(path), "caption": caption, "kind": "real"})
    for k in range(n_videos - len(rows)):
        path = folder / f"synthetic_{k}.mp4"
        print(f"writing synthetic video {path.name} ...", file=sys.stderr)
        long_video(path, 4.0 + k, width=640, height=360, fps=15)  # a distinct length each: a distinct hash
        rows.append({"video": str(path), "caption": SYNTHETIC_CAPTION, "kind": "synthetic"})
    manifest = folder / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"video": r["video"], "caption": r["caption"]}) + "\n" for r in rows))
    return manifest, rows


def write_mevis(root: Path, *, width: int = 128, height: int = 96, frames: int = 12) -> Path:
    """A tiny MeViS layout: two videos of flat backgrounds with moving rectangles (6 fps JPEG frames), masks
    as COCO RLE; video m1 has an expression referring to both of its objects, one to one, and an object absent
    from some frames (null masks)."""
    import numpy as np
    from PIL import Image

    from engine import masks

    def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        mask = np.zeros((height, width), dtype=bool)
        mask[max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)] = True
        return mask

    objects = {  # anno_id -> (video, color, mask per frame or None)
        "10": ("m1", (230, 30, 30), [rect(4 + 6 * i, 20, 28 + 6 * i, 60) for i in range(frames)]),
        "11": ("m1", (30, 60, 230), [rect(80, 8 + 5 * i, 112, 30 + 5 * i) if i >= 3 else None for i in range(frames)]),
        "20": ("m2", (240, 220, 30), [rect(50 - 2 * i, 30, 78 - 2 * i, 70) for i in range(frames)]),
    }
    backgrounds = {"m1": (40, 170, 60), "m2": (90, 40, 120)}
    names = [f"{i:05d}" for i in range(frames)]
    for video, background in backgrounds.items():
        folder = root / "JPEGImages" / video
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            image = np.empty((height, width, 3), dtype=np.uint8)
            image[:] = background
            for obj_video, color, per_frame in objects.values():
                if obj_video == video and per_frame[i] is not None:
                    image[per_frame[i]] = color
            Image.fromarray(image).save(folder / f"{name}.jpg", quality=95)
    meta = {"videos": {
        "m1": {
            "expressions": {
                "0": {"exp": "the two boxes moving apart", "obj_id": [0, 1], "anno_id": [10, 11]},
                "1": {"exp": "the red box moving right", "obj_id": [0], "anno_id": [10]},
                "2": {"exp": "the blue box that appears later", "obj_id": [1], "anno_id": [11]},
            },
            "frames": names,
        },
        "m2": {"expressions": {"0": {"exp": "the yellow block drifting left", "obj_id": [0], "anno_id": [20]}},
               "frames": names},
    }}
    mask_dict = {
        anno_id: [masks.encode(m).model_dump() if m is not None else None for m in per_frame]
        for anno_id, (_, _, per_frame) in objects.items()
    }
    (root / "meta_expressions.json").write_text(json.dumps(meta))
    (root / "mask_dict.json").write_text(json.dumps(mask_dict))
    return root


# -- the run --------------------------------------------------------------------------------------------------


def configure(profile: str, config_file: str | None = None, overlay: dict | None = None,
              chat_seed: int | None = None) -> Any:
    """The profile's `EngineConfig` (with `config_file` merged), `overlay` deep-merged over its pipeline
    settings (validated whole), and `chat_seed` as the seed of every tiny transformers chat role."""
    from flows import pipelines

    config = pipelines.load(profile, config_file)
    if overlay:
        from engine.config import _deep_merge, validate_settings

        settings = _deep_merge(config.pipeline, overlay)
        validate_settings(settings, pipelines.settings_sections())
        config = config.model_copy(update={"pipeline": settings})
    if chat_seed is not None:  # the random weights of every tiny chat role (they stay one shared model)
        roles = {
            role: spec.model_copy(update={"options": {**spec.options, "seed": chat_seed}})
            if spec.is_tiny and spec.backend == "transformers" else spec
            for role, spec in config.roles.items()
        }
        config = config.model_copy(update={"roles": roles})
    return config


def agent_stats(calls: list[dict], counters: dict, agents: Sequence[str], done: int,
                counter_keys: dict[str, tuple[str | None, str | None]] | None = None) -> dict[str, dict]:
    """Per agent (`agents` first, then any other agent `calls` name): requests and backend calls, per video
    (`done` videos) and per call, batch sizes, chat seconds, retries, and the engine's own counters beside
    them. `counter_keys` maps an agent to its (requests, backend calls) counter names where they are not
    `<agent>_requests` / `<agent>_backend_calls`; None: the engine has no such counter (not compared)."""
    out = {}
    for agent in [*agents, *sorted({c["agent"] for c in calls} - set(agents))]:
        mine = [c for c in calls if c["agent"] == agent]
        batches = [c["batch"] for c in mine]
        requests, n_calls = sum(batches), len(batches)
        req_key, calls_key = (counter_keys or {}).get(agent, (f"{agent}_requests", f"{agent}_backend_calls"))
        stats_requests = counters.get(req_key, 0) if req_key else None
        stats_calls = counters.get(calls_key, 0) if calls_key else None
        out[agent] = {
            "roles": sorted({c["role"] for c in mine}),
            "requests": requests,
            "backend_calls": n_calls,
            "requests_per_video": round(requests / max(done, 1), 2),
            "calls_per_video": round(n_calls / max(done, 1), 2),
            "requests_per_call": round(requests / n_calls, 2) if n_calls else None,
            "max_batch": max(batches, default=0),
            "batches": batches,
            "chat_s": round(sum(c["seconds"] for c in mine), 2),
            "retried_requests": counters.get(f"{agent}_retried_requests", 0),
            "stats_requests": stats_requests,
            "stats_backend_calls": stats_calls,
            "agrees": stats_requests in (None, requests) and stats_calls in (None, n_calls),
        }
    return out


def run(profile: str, n_videos: int, out: Path, data_types: Sequence[str], shared: Path,
        config_file: str | None = None, overlay: dict | None = None, cap: int | None = None,
        chat_seed: int | None = None) -> dict:
    from engine.models import factory
    from engine.runner import Runner
    from engine.sources import open_source
    from engine.stats import Stats
    from engine.storage import Dataset
    from flows import videorefer

    dataset_path = out / "videorefer-dataset"
    if dataset_path.exists():  # a fresh dataset: the sample counts are this run's alone
        shutil.rmtree(dataset_path)
    config = configure(profile, config_file, overlay, chat_seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        manifest, rows = write_manifest(tmp_path, n_videos, shared)
        mevis = write_mevis(tmp_path / "mevis")
        items = list(open_source(str(manifest))) + list(open_source(str(mevis)))
        kinds = [r["kind"] for r in rows] + ["mevis"] * (len(items) - len(rows))

        stats = Stats()
        dataset = Dataset(str(dataset_path))
        start = time.perf_counter()
        backends = factory.build(config, videorefer.roles(config), pipeline=videorefer.NAME)
        load_s = time.perf_counter() - start
        calls: list[dict] = []
        chat_roles = [r for r, kind in videorefer.roles(config).items() if kind == "chat"]
        proxied = {r: CountingChat(b, r, calls, cap_strings=cap) if r in chat_roles else b for r, b in backends.items()}
        start = time.perf_counter()
        pipeline = videorefer.build(config, proxied, stats=stats, dataset=dataset, data_types=data_types)
        outcomes = Runner(pipeline, dataset, stats=stats, force=True).run(items)
        wall = time.perf_counter() - start

        samples = dataset.read_table("samples", columns=["data_type", "kept", "video_id"]).to_pylist()
        masklets = dataset.read_table("masklets", columns=["method"]).to_pylist()
        rejections = dataset.read_table("rejections", columns=["stage", "reason"]).to_pylist()
        per_item = []
        for outcome, kind in zip(outcomes, kinds):
            o = outcome.outputs
            per_item.append({
                "source": Path(outcome.source).name, "kind": kind, "status": outcome.status,
                "detail": outcome.detail, "caption": bool(outcome.item.caption),
                "expressions": len(outcome.item.expressions), "masklets": len(o.masklets),
                "samples": dict(Counter(s.data_type for s in o.samples)), "rejections": len(o.rejections),
            })

    done = sum(o.status == "done" for o in outcomes)
    agents = agent_stats(calls, stats.counters, AGENTS, done)
    by_type: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        by_type[s["data_type"]]["kept" if s["kept"] else "dropped"] += 1
    return {
        "profile": profile,
        "config_hash": config.hash,
        "overlay": overlay or {},
        "json_string_cap": cap,
        "chat_seed": chat_seed,
        "data_types": list(data_types),
        "items": len(items),
        "items_done": done,
        "videos": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
        "model_load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "chat_calls": calls,
        "agents": agents,
        "samples": {t: dict(c) for t, c in sorted(by_type.items())},
        "masklets": dict(Counter(m["method"] for m in masklets)),
        "rejections": dict(Counter(f"{r['stage']}: {r['reason']}" for r in rejections).most_common()),
        "per_item": per_item,
        **stats.as_dict(),
    }


# -- the report -----------------------------------------------------------------------------------------------


def _table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _batches(batches: list[int]) -> str:
    if len(batches) <= 8:
        return ", ".join(map(str, batches)) or "-"
    return f"median {statistics.median(batches):g}, max {max(batches)} ({len(batches)} calls)"


def agents_table(agents: dict[str, dict], done: int) -> str:
    """The markdown table of `agent_stats`, with a total row; per-video figures divide by `done`."""
    rows = []
    for agent, a in agents.items():
        stats = " / ".join("-" if v is None else str(v) for v in (a["stats_requests"], a["stats_backend_calls"]))
        rows.append([
            agent, ", ".join(a["roles"]) or "-", a["requests"], a["backend_calls"], a["requests_per_video"],
            a["calls_per_video"], a["requests_per_call"] if a["requests_per_call"] is not None else "-",
            _batches(a["batches"]), a["retried_requests"], a["chat_s"],
            f"{stats} {'ok' if a['agrees'] else 'DIFFERS'}",
        ])
    total_req = sum(a["requests"] for a in agents.values())
    total_calls = sum(a["backend_calls"] for a in agents.values())
    done = max(done, 1)
    rows.append([
        "**all**", "", total_req, total_calls, round(total_req / done, 2), round(total_calls / done, 2),
        round(total_req / total_calls, 2) if total_calls else "-", "", "",
        round(sum(a["chat_s"] for a in agents.values()), 2), "",
    ])
    return _table(rows, [
        "agent", "role", "requests", "backend calls", "requests / video", "calls / video", "requests / call",
        "batch sizes", "of which retries", "chat s", "stats (req / calls)",
    ])


def report(r: dict) -> str:
    videos = ", ".join(f"{n} {k}" for k, n in r["videos"].items())
    lines = [
        f"# VideoRefer benchmark (profile {r['profile']})",
        "",
        f"{r['items']} items ({videos}), {r['items_done']} done; data types: {', '.join(r['data_types'])}. "
        f"Model load {r['model_load_s']} s, pipeline wall {r['wall_s']} s. Per-video figures divide by the "
        f"{r['items_done']} items done.",
        "",
        *([f"Settings laid over the profile for a CPU run (`CPU_OVERLAY`): `{json.dumps(r['overlay'])}`; "
           f"JSON strings capped at {r['json_string_cap']} characters in the grammar; tiny chat seed "
           f"{r['chat_seed']}.", ""]
          if r["overlay"] else []),
        "## Chat requests per agent",
        "",
        "A request is one conversation; a backend call is one `chat()` on the backend (one batch). "
        "`stats` is the engine's own `<agent>_requests / <agent>_backend_calls`, which should agree.",
        "",
    ]
    lines.append(agents_table(r["agents"], r["items_done"]))
    lines += ["", "## Samples written per data type", ""]
    lines.append(_table(
        [[t, c.get("kept", 0), c.get("dropped", 0), c.get("kept", 0) + c.get("dropped", 0)] for t, c in r["samples"].items()]
        or [["(none)", 0, 0, 0]],
        ["data type", "kept", "dropped by the Reviewer", "written"],
    ))
    lines += ["", f"Masklets by method: {r['masklets'] or 'none'}. Rejections: {r['rejections'] or 'none'}.", ""]
    lines += ["## Wall time per stage (s, `stats.seconds`; agent timers nest inside their stage's)", ""]
    seconds = r["seconds"]
    lines.append(_table([[k, v] for k, v in seconds.items()], ["timer", "seconds"]))
    funnel = {k: v for k, v in r["counters"].items() if k.startswith("funnel.")}
    if funnel:
        lines += ["", "## Funnel (`funnel.*` counters)", ""]
        lines.append(_table([[k.removeprefix("funnel."), v] for k, v in funnel.items()], ["agent.step", "n"]))
    lines += ["", "## Per item", ""]
    lines.append(_table(
        [[i["source"], i["kind"], i["status"], i["expressions"], i["masklets"],
          ", ".join(f"{k} {v}" for k, v in i["samples"].items()) or "-", i["rejections"]] for i in r["per_item"]],
        ["item", "kind", "status", "expressions", "masklets", "samples", "rejections"],
    ))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", help="model profile (default: tiny, runs offline on CPU)")
    parser.add_argument("--config", help="YAML deep-merged over the bundled profiles.yaml (as the CLI's --config)")
    parser.add_argument("--as-configured", action="store_true",
                        help="run the tiny profile with its own settings, without the CPU overlay (slow on a CPU)")
    parser.add_argument("--chat-seed", type=int, default=TINY_CHAT_SEED,
                        help=f"seed of the tiny chat model's random weights (default {TINY_CHAT_SEED}; -1: the profile's)")
    parser.add_argument("--videos", type=int, default=6, help="videos in the caption manifest (real first, then synthetic)")
    parser.add_argument("--shared", default=str(SHARED_VIDEOS), help="folder of real .mp4 videos")
    parser.add_argument("--data-types", default="detailed_caption,short_caption,object_qa")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    if args.videos < 0:
        parser.error("--videos must be >= 0")
    data_types = [t.strip() for t in args.data_types.split(",") if t.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    overlay = CPU_OVERLAY if args.profile == "tiny" and not args.as_configured else None
    cap = CPU_JSON_STRING_CAP if overlay else None
    seed = args.chat_seed if args.profile == "tiny" and args.chat_seed >= 0 else None
    result = run(args.profile, args.videos, out, data_types, Path(args.shared), args.config, overlay, cap, seed)
    result["config_file"] = args.config
    result["total_s"] = round(time.perf_counter() - start, 2)
    text = report(result) + f"\nTotal benchmark time {result['total_s']} s.\n"
    print(text)
    (out / "videorefer.md").write_text(text)
    (out / "videorefer.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
