"""Benchmark of the Strefer pipeline (not a test): how well each agent batches its model requests, the
samples it writes per group and task type, and where the time goes. The twin of `benchmarks.videorefer`.

    python -m benchmarks.strefer [--profile tiny] [--config FILE] [--videos 4] [--entities E ...] [--out benchmarks/out]

Inputs: the real videos in ../shared/videos/ (skipped, with a note, where absent), topped up with synthetic
videos from tests/synthetic.py to reach N (default 4), read through the caption-manifest source adapter (the
Strefer pipeline ignores the captions). Two runs over the same items, each into its own fresh dataset:
- `found`: no entities given, so the Entity Recognizer (vlm) and the Referring Parser (llm) find each video's;
- `given`: the `--entities` (EXPRESSION[:NOUN], the same for every video) given, so neither runs.
Then, per video, the clipper, the Referring Masklet Generator (detector, tracker and, where several boxes or
expressions share a noun, the grounder), the Video Transcriber (presence per entity and clip, then behaviour
where present) and the Instruction Generator (templates for types 1-6, the instruction LLM for 7-11).

Every chat role goes through `benchmarks.videorefer.CountingChat`, which records each backend `chat()` call
(its batch size and time) and the agent that sent it. Reports, per run and per agent (recognizer, parser,
grounder, transcriber_presence, transcriber_behavior, instruction_llm): requests and backend calls per video,
requests per backend call (the batching), retries, cross-checked with the engine's own counters
(`<agent>_requests` / `<agent>_backend_calls`; the grounder's `grounder_calls`, it counts no requests);
entities, clips and masklets per video; samples per group and task type (instructions, each written in both
time forms); wall time per timer of `stats.seconds` (`stage.<name>` the runner's per stage, `decode`, `hash`
and `write` the runner's too, the rest the agents', nested inside their stage's). Writes <out>/strefer.md and
<out>/strefer.json; the datasets go to <out>/strefer-dataset/{found,given}.

The `tiny` profile (default) runs a random-weight Qwen2.5-VL through the real transformers chat backend with
grammar-constrained JSON, at the profile's own settings: every request is a real generate call, but the
answers are meaningless, so what survives each agent says nothing about quality, only which paths ran. Two
choices make the paths run (both only for tiny):
- chat seed `TINY_CHAT_SEED`: with the profile's seed 0 the parser finds no entity in the recognizer's
  paragraph, so no agent after it runs in the `found` pass; with 4 it lists one per video;
- `--script-presence` (default): a random model's first word is never "yes", so the Transcriber would find
  every entity absent and neither its behaviour requests nor the instruction LLM would ever run. The counting
  proxy replaces the presence answers, after the real generate call, by "Yes" and "No" in turn within each
  batch; the behaviour and instruction requests are then real generate calls.
What still never happens with tiny models: the found entities' random nouns are outside the tiny detector's
vocabulary (no box, no masklet, no grounder call; the given entities' nouns are in it), and the instruction
LLM's JSON (ten questions) never fits the tiny backend's 512-token answer cap, so each video costs it one
request and two retries and only the template types 1-6 are written. A real profile (`--profile default`, on a
GPU) exercises every path. Both runs take about three minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from benchmarks.videorefer import (
    SHARED_VIDEOS,
    CountingChat,
    _calling_agent,
    _table,
    agent_stats,
    agents_table,
    configure,
    write_manifest,
)

# The agents as `engine.chat.ask_*` name them; the grounder calls `ask_text` without a name (it is "chat"),
# so its calls are told by their role.
AGENTS = ("recognizer", "parser", "grounder", "transcriber_presence", "transcriber_behavior", "instruction_llm")
COUNTER_KEYS = {"grounder": (None, "grounder_calls")}  # (requests, backend calls) counters, where not the usual
RUNS = {"found": "entities found by the Entity Recognizer and the Referring Parser", "given": "entities given"}
# Two expressions share the noun "person" (the grounder picks between their boxes); every noun is in the tiny
# detector's vocabulary, so the tiny profile finds boxes for them.
DEFAULT_ENTITIES = ("person on the left:person", "person on the right:person", "dog:dog")
TINY_CHAT_SEED = 4


class ScriptedPresence(CountingChat):
    """A `CountingChat` whose Transcriber presence answers are replaced, after the real generate call, by
    "Yes" and "No" in turn within each batch (a random model never answers yes)."""

    def chat(self, requests: Sequence[Any]) -> list[str]:
        answers = super().chat(requests)
        if _calling_agent() == "transcriber_presence":
            answers = ["Yes." if k % 2 == 0 else "No." for k in range(len(answers))]
            self.calls[-1]["scripted"] = True
        return answers


def _timer_kind(name: str) -> str:
    if name.startswith("stage."):
        return "runner stage"
    return "runner" if name in ("decode", "hash", "write") else "agent"


def run_once(run: str, config: Any, items: list, kinds: list[str], entities: Sequence[Any], out: Path, *,
             script_presence: bool) -> dict:
    from engine.models import factory
    from engine.runner import Runner
    from engine.stats import Stats
    from engine.storage import Dataset
    from flows import strefer

    dataset_path = out / "strefer-dataset" / run
    if dataset_path.exists():  # a fresh dataset: the counts are this run's alone
        shutil.rmtree(dataset_path)
    stats = Stats()
    dataset = Dataset(str(dataset_path))
    role_kinds = strefer.roles(config, entities=entities)
    start = time.perf_counter()
    backends = factory.build(config, role_kinds, pipeline=strefer.NAME)  # loaded once per process
    load_s = time.perf_counter() - start
    calls: list[dict] = []
    proxy = ScriptedPresence if script_presence else CountingChat
    proxied = {role: proxy(b, role, calls) if role_kinds[role] == "chat" else b for role, b in backends.items()}
    start = time.perf_counter()
    pipeline = strefer.build(config, proxied, stats=stats, dataset=dataset, entities=entities)
    outcomes = Runner(pipeline, dataset, stats=stats, force=True).run(items)
    wall = time.perf_counter() - start
    for c in calls:  # the grounder asks without naming itself
        if c["role"] == "grounder" and c["agent"] in ("chat", "?"):
            c["agent"] = "grounder"

    done = sum(o.status == "done" for o in outcomes)
    agents = agent_stats(calls, stats.counters, AGENTS, done, COUNTER_KEYS)
    first_form = (config.section("strefer").get("time_formats") or ("timestamp",))[0]
    instructions: Counter = Counter()  # (group, task, referring, generator) -> instructions (one time form)
    samples: Counter = Counter()  # the same -> samples (every time form)
    rejections: Counter = Counter()
    per_item = []
    for outcome, kind in zip(outcomes, kinds):
        o = outcome.outputs
        for s in o.samples:
            key = (s.labels["group"], s.task, s.labels["referring"], s.labels["generator"])
            samples[key] += 1
            instructions[key] += s.labels.get("time_format", first_form) == first_form  # time-free: one row
        rejections.update(f"{r.stage}: {r.reason}" for r in o.rejections)
        cost = (dataset.completion(pipeline.name, outcome.item.key) or {}).get("counters", {})  # the item's own
        per_item.append({
            "source": Path(outcome.source).name, "kind": kind, "status": outcome.status, "detail": outcome.detail,
            "entities": len(entities) if entities else cost.get("parser_entities", 0),
            "clips": len(o.clips),
            "masklets": sum(m.method == "strefer" for m in o.masklets),
            "samples": len(o.samples),
            "rejections": dict(Counter(f"{r.stage}: {r.reason}" for r in o.rejections)),
        })
    counters = stats.counters
    by_type = sorted(samples, key=lambda k: (k[0], int(k[1].removeprefix("type")), k[2]))
    return {
        "run": run,
        "entities_given": [e.model_dump() for e in entities],
        "items": len(items),
        "items_done": done,
        "model_load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "chat_calls": calls,
        "agents": agents,
        "instructions": [
            {"group": g, "task": t, "referring": r, "generator": gen, "instructions": instructions[g, t, r, gen],
             "samples": samples[g, t, r, gen]}
            for g, t, r, gen in by_type
        ],
        "samples_written": sum(samples.values()),
        "entities": sum(i["entities"] for i in per_item),
        "clips": sum(i["clips"] for i in per_item),
        "masklets": sum(i["masklets"] for i in per_item),
        "presence": {k: counters.get(f"transcriber_{k}", 0) for k in ("present", "absent", "unclear_presence")},
        "rejections": dict(rejections.most_common()),
        "per_item": per_item,
        **stats.as_dict(),
    }


def run(profile: str, n_videos: int, out: Path, shared: Path, entities: Sequence[str], config_file: str | None = None,
        chat_seed: int | None = None, script_presence: bool = False) -> dict:
    from engine.sources import open_source
    from schemas import EntityRef

    config = configure(profile, config_file, chat_seed=chat_seed)
    given = [EntityRef.parse(e) for e in entities]
    with tempfile.TemporaryDirectory() as tmp:
        manifest, rows = write_manifest(Path(tmp), n_videos, shared)
        items = list(open_source(str(manifest)))
        kinds = [r["kind"] for r in rows]
        runs = {}
        for name, ents in (("found", []), ("given", given)):
            print(f"run {name}: {RUNS[name]} over {len(items)} videos ...", file=sys.stderr)
            runs[name] = run_once(name, config, items, kinds, ents, out, script_presence=script_presence)
    return {
        "profile": profile,
        "config_hash": config.hash,
        "chat_seed": chat_seed,
        "script_presence": script_presence,
        "videos": dict(Counter(kinds)),
        "runs": runs,
    }


# -- the report -----------------------------------------------------------------------------------------------


def _per_video(n: float, done: int) -> float:
    return round(n / max(done, 1), 2)


def report(r: dict) -> str:
    runs = r["runs"]
    videos = ", ".join(f"{n} {k}" for k, n in r["videos"].items())
    given = ", ".join(f"`{e['expression']}:{e['noun']}`" for e in runs["given"]["entities_given"])
    lines = [
        f"# Strefer benchmark (profile {r['profile']})",
        "",
        f"{sum(r['videos'].values())} videos ({videos}), two runs: **found** ({RUNS['found']}) and **given** "
        f"({given}, the same for every video). Per-video figures divide by the videos done in that run.",
        "",
        _table([[name, x["items_done"], x["model_load_s"], x["wall_s"]] for name, x in runs.items()],
               ["run", "videos done", "model load s", "pipeline wall s"]),
        "",
    ]
    if r["chat_seed"] is not None:
        lines += [f"Tiny chat seed {r['chat_seed']}; the profile's settings otherwise.", ""]
    if r.get("config_file"):
        lines += [f"Config file: `{r['config_file']}`.", ""]
    if r["script_presence"]:
        lines += ["Presence answers scripted (`--script-presence`): the Transcriber's presence requests are real "
                  "generate calls, but their answers are replaced by Yes / No in turn, so its behaviour requests and "
                  "the instruction LLM run (a random model never says yes).", ""]
    lines += ["## Batching per agent, both runs", "",
              "A request is one conversation; a backend call is one `chat()` on the backend (one batch).", ""]
    rows = []
    for agent in dict.fromkeys(a for x in runs.values() for a in x["agents"]):
        row = [agent]
        for x in runs.values():
            a = x["agents"].get(agent)
            ran = a is not None and a["backend_calls"]
            row += [a["requests_per_video"], a["calls_per_video"], a["requests_per_call"]] if ran else ["-"] * 3
        rows.append(row)
    lines.append(_table(rows, ["agent", *[f"{name}: {what}" for name in runs
                                          for what in ("requests / video", "calls / video", "requests / call")]]))
    for name, x in runs.items():
        lines += ["", f"## Chat requests per agent: {name} ({RUNS[name]})", "",
                  "`stats` is the engine's own `<agent>_requests / <agent>_backend_calls` (the grounder's "
                  "`grounder_calls`; it counts no requests), which should agree.", "",
                  agents_table(x["agents"], x["items_done"])]

    lines += ["", "## Entities, clips, masklets, transcript", ""]
    rows = []
    for name, x in runs.items():
        d, p = x["items_done"], x["presence"]
        rows.append([name, *[f"{x[k]} ({_per_video(x[k], d)})" for k in ("entities", "clips", "masklets")],
                     f"{p['present']} / {p['absent']} ({p['unclear_presence']} unclear)",
                     f"{x['samples_written']} ({_per_video(x['samples_written'], d)})"])
    lines.append(_table(rows, ["run", "entities (/ video)", "clips (/ video)", "masklets (/ video)",
                               "presence: present / absent", "samples written (/ video)"]))

    lines += ["", "## Instructions per group and task type", "",
              "Instructions per run (each written as one sample per time form), and per video.", ""]
    table: dict[tuple, dict[str, int]] = {}
    for name, x in runs.items():
        for i in x["instructions"]:
            table.setdefault((i["group"], i["task"], i["referring"], i["generator"]), {})[name] = i["instructions"]
    table["**all**", "", "", ""] = {name: sum(i["instructions"] for i in x["instructions"]) for name, x in runs.items()}

    def order(key: tuple) -> tuple:
        return (key[0] == "**all**", key[0], int(key[1].removeprefix("type") or 0), key[2])

    rows = [[*key, *[v for name, x in runs.items() for v in (n.get(name, 0), _per_video(n.get(name, 0), x["items_done"]))]]
            for key, n in sorted(table.items(), key=lambda kv: order(kv[0]))]
    lines.append(_table(rows, ["group", "task", "referring", "generator",
                               *[h for name in runs for h in (name, f"{name} / video")]]))

    lines += ["", "## Wall time per timer (s, `stats.seconds`)", "",
              "`stage.<name>` is the runner's time in a stage (its start and its finish); `decode`, `hash` and "
              "`write` the runner's too; the rest are the agents' own timers, nested inside their stage's.", ""]
    timers = sorted({k for x in runs.values() for k in x["seconds"]},
                    key=lambda k: (_timer_kind(k) != "runner stage", k))
    lines.append(_table([[k, _timer_kind(k), *[x["seconds"].get(k, "-") for x in runs.values()]] for k in timers],
                        ["timer", "kind", *runs]))

    lines += ["", "## Rejections", ""]
    reasons = list(dict.fromkeys(k for x in runs.values() for k in x["rejections"]))
    lines.append(_table([[k, *[x["rejections"].get(k, 0) for x in runs.values()]] for k in reasons]
                        or [["(none)", *[0 for _ in runs]]], ["stage: reason", *runs]))
    lines += ["", "## Per item", ""]
    rows = [[name, i["source"], i["kind"], i["status"], i["entities"], i["clips"], i["masklets"], i["samples"],
             ", ".join(f"{k} {v}" for k, v in i["rejections"].items()) or "-"]
            for name, x in runs.items() for i in x["per_item"]]
    lines.append(_table(rows, ["run", "item", "kind", "status", "entities", "clips", "masklets", "samples",
                               "rejections"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", help="model profile (default: tiny, runs offline on CPU)")
    parser.add_argument("--config", help="YAML deep-merged over the bundled profiles.yaml (as the CLI's --config)")
    parser.add_argument("--chat-seed", type=int, default=TINY_CHAT_SEED,
                        help=f"seed of the tiny chat model's random weights (default {TINY_CHAT_SEED}; "
                        "-1: the profile's)")
    parser.add_argument("--script-presence", action=argparse.BooleanOptionalAction, default=None,
                        help="replace the Transcriber's presence answers by Yes / No in turn (default: on for tiny, "
                        "whose random answers never say yes)")
    parser.add_argument("--videos", type=int, default=4, help="videos (real first, then synthetic)")
    parser.add_argument("--shared", default=str(SHARED_VIDEOS), help="folder of real .mp4 videos")
    parser.add_argument("--entities", nargs="+", default=list(DEFAULT_ENTITIES), metavar="EXPRESSION[:NOUN]",
                        help="entities of the second run, for every video (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    if args.videos < 1:
        parser.error("--videos must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tiny = args.profile == "tiny"
    seed = args.chat_seed if tiny and args.chat_seed >= 0 else None
    script = args.script_presence if args.script_presence is not None else tiny
    result = run(args.profile, args.videos, out, Path(args.shared), args.entities, args.config, seed, script)
    result["config_file"] = args.config
    result["total_s"] = round(time.perf_counter() - start, 2)
    text = report(result) + f"\nTotal benchmark time {result['total_s']} s.\n"
    print(text)
    (out / "strefer.md").write_text(text)
    (out / "strefer.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
