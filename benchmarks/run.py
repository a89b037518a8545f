"""Benchmark of clip-and-track (not a test): figures side by side with their baselines, in one run.

    python -m benchmarks.run [--profile tiny] [--config FILE] [--real PATH] [--long-seconds 60] [--out benchmarks/out]

Reports, per video (a real 720p one and synthetic 720p ones of 60 s and 10 s):
- frames decoded against frames in the file (target: each frame decoded once for all stages),
- wall time per stage and peak RSS (each video in its own process, so RSS is that video's alone),
- ours (Strefer) beside the grounded-sam2 baseline on the same decode: start frame, frames covered, time;
and across videos: the clipper's wall time against PySceneDetect's own `detect()` on the same file
(target <= 1.1x, both do one decode) and the peak RSS of the 60 s video against the 10 s one (target <= 1.5x).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
ENTITIES = {"synthetic": ["person in red:person", "white ball:ball"], "real": ["dog:dog", "person:person"]}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _methods(outcome, methods: list[str]) -> dict:
    """Per masklet method: its start frame (that of its masklets; None without any), masklets, frames covered,
    entities it rejected."""
    out = {}
    for method in methods:
        mine = [m for m in outcome.outputs.masklets if m.method == method]
        starts = sorted({m.start_frame for m in mine})
        out[method] = {
            "start_frame": (starts[0] if len(starts) == 1 else starts) if starts else None,
            "masklets": len(mine),
            "frames_covered": sum(len(m.frames) for m in mine),
            "rejected": sum(1 for r in outcome.outputs.rejections if r.detail.startswith(f"[{method}]")),
        }
    return out


def _masklet_methods(pipeline) -> list[str]:
    return [s.generator.method for s in pipeline.stages if hasattr(s, "generator")]


def run_one(video: str, entities: list[str], profile: str, out: str, config_file: str | None = None) -> dict:
    """One video through the pipeline with the baseline beside it; runs in its own process."""
    from engine.decode import DecodeLimits
    from engine.models import factory
    from engine.probe import probe_video
    from engine.runner import Runner
    from engine.stats import Stats
    from engine.storage import Dataset
    from flows import clip_and_track, pipelines
    from schemas import EntityRef, WorkItem

    config = pipelines.load(profile, config_file)
    stats = Stats()
    dataset = Dataset(out)
    rss_before = _peak_rss_mib()
    start = time.perf_counter()
    backends = factory.build(config, clip_and_track.roles(config), pipeline=clip_and_track.NAME)
    pipeline = clip_and_track.build(
        config, backends, stats=stats, dataset=dataset, entities=[EntityRef.parse(e) for e in entities], baseline=True
    )
    load_s = time.perf_counter() - start
    rss_models = _peak_rss_mib()
    start = time.perf_counter()
    (outcome,) = Runner(pipeline, dataset, stats=stats, force=True).run([WorkItem(source=video)])
    wall = time.perf_counter() - start
    info = probe_video(video, limits=DecodeLimits(**config.section("decode")))
    return {
        "video": video,
        "status": outcome.status,
        "detail": outcome.detail,
        "frames_in_file": info.num_frames,
        "clips": [(c.start_frame, c.end_frame, c.method) for c in outcome.outputs.clips],
        "model_load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "rss_mib": {"start": round(rss_before), "after_models": round(rss_models), "peak": round(_peak_rss_mib())},
        "methods": _methods(outcome, _masklet_methods(pipeline)),
        **stats.as_dict(),
    }


def clipper_vs_scenedetect(video: str, repeats: int) -> dict:
    """Our clipper's cut pass (decode + ContentDetector, one pass) against scenedetect.detect()."""
    from scenedetect import ContentDetector, detect

    from agents.video_clipper import ClipperConfig, VideoClipper
    from engine.decode import DecodeLimits, decode_video
    from engine.probe import probe_video
    from schemas import Provenance

    prov = Provenance(engine_version="bench", profile="bench", models={}, config_hash="bench")
    ours, theirs, cuts = [], [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        info = probe_video(video, limits=DecodeLimits())
        job = VideoClipper(embedder=None, config=ClipperConfig(threshold=20.0, use_hac=False)).start(
            video_id="bench", fps=info.fps, width=info.width, height=info.height, provenance=prov
        )
        result = decode_video(info, job.consumers)
        clips = job.finish(frames_decoded=result.frames_decoded, end_time=result.end_time)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        scenes = detect(video, ContentDetector(threshold=20.0))
        theirs.append(time.perf_counter() - start)
        cuts = {"ours": [c.start_frame for c in clips[1:]], "scenedetect": [s[0].frame_num for s in scenes[1:]]}
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    return {
        "video": video,
        "ours_s": round(ours_s, 3),
        "scenedetect_s": round(theirs_s, 3),
        "ratio": round(ours_s / theirs_s, 3),
        "same_cuts": cuts["ours"] == cuts["scenedetect"],
        "cuts": cuts,
    }


def _child(video: str, entities: list[str], profile: str, out: Path, config_file: str | None) -> dict:
    report = out / f"{Path(video).stem}.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "--one", video, "--profile", profile, "--json", str(report),
           "--dataset", str(out / "dataset"), *[a for e in entities for a in ("--entity", e)],
           *(["--config", config_file] if config_file else [])]
    subprocess.run(cmd, check=True)
    return json.loads(report.read_text())


def _table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", help="model profile (default: tiny, runs offline on CPU)")
    parser.add_argument("--config", help="YAML deep-merged over the bundled profiles.yaml (as the CLI's --config)")
    parser.add_argument("--real", default=str(SHARED_VIDEOS / "01_dog.mp4"), help="a real 720p video")
    parser.add_argument("--long-seconds", type=float, default=60.0)
    parser.add_argument("--short-seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the clipper comparison (median)")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--entity", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # child process: one video
        report = run_one(args.one, args.entity, args.profile, args.dataset, args.config)
        Path(args.json).write_text(json.dumps(report, indent=1))
        return

    from tests.synthetic import long_video

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    videos: list[tuple[str, str, list[str]]] = []
    if Path(args.real).is_file():
        videos.append(("real 720p", args.real, ENTITIES["real"]))
    else:
        print(f"note: {args.real} not found; the real-video rows are skipped", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        long_label, short_label = f"synthetic long {args.long_seconds:g} s", f"synthetic short {args.short_seconds:g} s"
        for kind, label, seconds in (("long", long_label, args.long_seconds), ("short", short_label, args.short_seconds)):
            path = Path(tmp) / f"synthetic_{kind}_{seconds:g}s.mp4"
            print(f"writing {label} 720p video ...", file=sys.stderr)
            long_video(path, seconds)
            videos.append((label, str(path), ENTITIES["synthetic"]))

        runs = {}
        for label, path, entities in videos:
            print(f"running {label} ...", file=sys.stderr)
            runs[label] = _child(path, entities, args.profile, out, args.config)
        clipper = {label: clipper_vs_scenedetect(path, args.repeats) for label, path, _ in videos}

    stages = sorted({s for r in runs.values() for s in r["seconds"]})
    report = [f"# clip-and-track benchmark (profile {args.profile}{f', config {args.config}' if args.config else ''})", ""]
    report += ["## Per video", ""]
    report.append(
        _table(
            [
                [label, r["status"], r["frames_in_file"], r["counters"].get("frames_decoded", 0),
                 r["counters"].get("frames_decoded_render", 0), r["wall_s"], r["model_load_s"],
                 r["rss_mib"]["after_models"], r["rss_mib"]["peak"]]
                for label, r in runs.items()
            ],
            ["video", "status", "frames in file", "frames decoded", "decoded for render", "wall s", "model load s",
             "RSS after models MiB", "peak RSS MiB"],
        )
    )
    report += ["", "## Wall time per stage (s)", ""]
    report.append(_table([[label, *[r["seconds"].get(s, 0) for s in stages]] for label, r in runs.items()], ["video", *stages]))
    report += ["", "## Ours (strefer) beside grounded-sam2 on the same decode", ""]
    rows = []
    for label, r in runs.items():
        for method, m in r["methods"].items():
            rows.append([label, method, m["start_frame"], m["masklets"], m["frames_covered"], m["rejected"]])
    report.append(_table(rows, ["video", "method", "start frame", "masklets", "frames covered", "rejected entities"]))
    report += ["", "The algorithm alone (oracle fakes, exact ground truth, coverage per entity): `python -m "
               "benchmarks.masklets --skip tracking detection videos`."]
    report += ["", "## Clipper against PySceneDetect detect() (median of repeats)", ""]
    report.append(
        _table(
            [[label, c["ours_s"], c["scenedetect_s"], f"{c['ratio']}x", c["same_cuts"]] for label, c in clipper.items()],
            ["video", "ours s", "detect() s", "ratio (target <= 1.1x)", "same cuts"],
        )
    )
    ratio = runs[long_label]["rss_mib"]["peak"] / runs[short_label]["rss_mib"]["peak"]
    report += [
        "", f"Peak RSS, {args.long_seconds:g} s video / {args.short_seconds:g} s video: {ratio:.2f}x (target <= 1.5x)", ""
    ]
    text = "\n".join(report)
    print(text)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(
        json.dumps({"runs": runs, "clipper": clipper, "rss_ratio": ratio}, indent=1)
    )


if __name__ == "__main__":
    main()
