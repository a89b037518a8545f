"""Benchmark of the dataset at scale (not a test): commits, files on disk, planning a refresh, export memory.

    python -m benchmarks.scale [--sizes 10000,100000,700000] [--out benchmarks/out] [--keep DIR]

For each N, in a temporary folder (or DIR with --keep):
- a caption manifest of N rows over N/8 small video files (eight captioned windows per video, as Panda-70M);
- N committed items of the videorefer pipeline written through the real writer (`engine.writer.TableWriter`,
  default flush size) with realistic rows per item: one video row, 3 clips, a masklet of 32 frames of COCO
  RLE (a 640x360 mask each), 3 samples that point at it; their `items` rows carry the real item ids, run
  hash and fingerprints of the manifest's inputs, as a run would have left them;
- a refresh planned over the whole manifest with nothing changed (`engine.planning.Planner` streaming the
  manifest in chunks, as the flow does): it must find nothing to do;
- `engine export` of the latest version (VideoRefer JSON).
Each phase runs in its own process, so its peak RSS is its own. Reports items committed per second, files and
bytes on disk, planning time and peak RSS, export time and peak RSS, and writes <out>/scale.md and .json.
Targets on a 2-core machine: an unchanged 700K refresh planned in under 2 minutes and 2 GB; files growing with
bytes, not items; export peak RSS flat in N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PIPELINE = "videorefer"
OPTIONS = {"data_types": ["detailed_caption", "object_qa", "short_caption"]}
CAPTIONS_PER_VIDEO = 8


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _identity() -> tuple[str, str]:
    from engine.config import load_config
    from flows.pipelines import run_identity

    return run_identity(PIPELINE, load_config("tiny"), OPTIONS)


def write_inputs(root: Path, n: int) -> Path:
    """N/8 tiny "video" files (their bytes are never decoded here) and a JSONL manifest of N windows."""
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.jsonl"
    with open(manifest, "w") as f:
        for v in range((n + CAPTIONS_PER_VIDEO - 1) // CAPTIONS_PER_VIDEO):
            (videos / f"{v}.mp4").write_bytes(v.to_bytes(4, "little"))
            for c in range(CAPTIONS_PER_VIDEO):
                if v * CAPTIONS_PER_VIDEO + c >= n:
                    break
                row = {"video": f"videos/{v}.mp4", "caption": f"A dog runs, take {c}.", "start": 2.0 * c, "end": 2.0 * c + 2}
                f.write(json.dumps(row) + "\n")
    return manifest


# Distinct masklets (shifted, resized masks) the items cycle through: more than a row group's 8192 rows, so no
# row group holds a mask twice and Parquet's dictionary cannot collapse them, as with real masks.
MASK_VARIANTS = 8200


def _templates() -> dict[str, Any]:
    """An item's rows, made once; each item copies them with its own ids (as cheap as a model_copy)."""
    import numpy as np

    from engine import masks
    from schemas import ClipRecord, FrameMask, Provenance, SampleRecord, Turn

    run_hash, _ = _identity()
    prov = Provenance(engine_version="bench", profile="tiny", models={"detector": "d"}, config_hash=run_hash)
    masklets = []
    for v in range(MASK_VARIANTS):
        frames = []
        for i in range(32):
            mask = np.zeros((360, 640), dtype=bool)
            y, x, dh, dw = 60 + i + v % 50, 100 + 3 * i + (v // 50) % 165, v % 37, v % 29
            mask[y : y + 120 - dh, x : x + 180 + dw] = True
            mask[y + 40 : y + 60, x + 50 : x + 70] = False  # a hole: more than one run per column
            frames.append(FrameMask(frame_index=i * 3, timestamp=i * 0.1, rle=masks.encode(mask), box=[x, y, x + 180 + dw, y + 120 - dh]))
        masklets.append(_masklet(frames, prov))
    clip = ClipRecord(clip_id="c", video_id="v", clip_index=0, start_frame=0, end_frame=30, start_time=0.0, end_time=1.0, method="content", provenance=prov)
    sample = SampleRecord(
        sample_id="s", video_id="v", source="x", pipeline=PIPELINE, data_type="object_qa", task="basic",
        conversation=[Turn(role="human", value="<video>\nWhat is <region> doing in this video?"),
                      Turn(role="gpt", value="The dog runs across the grass toward the camera, then stops and sits down.")],
        masklet_ids=["m"], frames=[0, 30, 60, 90], kept=True, refers_to=["mask"], provenance=prov,
    )
    return {"masklets": masklets, "clip": clip, "sample": sample}


def _masklet(frames: list[Any], prov: Any) -> Any:
    from schemas import Assignment, MaskletRecord

    return MaskletRecord(
        masklet_id="m", video_id="v", expression="the dog", noun="dog", method="videorefer", start_frame=0, start_time=0.0,
        detector_score=0.6, detector_box=[150, 100, 330, 220],
        assignment=Assignment(method="sole-candidate", candidate_index=0, num_candidates=1, score=1.0),
        num_frames_tracked=32, track_fps=10.0, frames=frames, provenance=prov,
    )


def phase_synth(root: Path, n: int) -> dict[str, Any]:
    from engine.ids import stable_id
    from engine.planning import Fingerprints, chunked, item_id
    from engine.storage import Dataset
    from engine.writer import TableWriter
    from flows.pipelines import iter_items
    from schemas import ItemRecord, VideoRecord

    run_hash, variant = _identity()
    t = _templates()
    before = _peak_rss_mb()  # the synthetic rows' templates (8,200 masklets of 32 frames), not the writer's
    dataset = Dataset(str(root / "dataset"))
    prints = Fingerprints()
    start = time.perf_counter()
    with TableWriter(dataset, "bench") as writer:
        for chunk in chunked(iter_items([str(root / "manifest.jsonl")]), 4096):
            for k, item in enumerate(chunk):
                video_id = stable_id(item.source)
                iid = item_id(PIPELINE, item, variant)
                video = VideoRecord(
                    video_id=video_id, source=item.source, content_sha256=video_id * 4, start_s=item.start_s, end_s=item.end_s,
                    duration_s=2.0, fps=30.0, num_frames=60, width=640, height=360, rotation=0, codec="h264",
                    decode_width=640, decode_height=360,
                )
                masklet_id = stable_id(iid, "m")
                rows = {
                    "videos": [video],
                    "clips": [t["clip"].model_copy(update={"clip_id": stable_id(iid, k), "video_id": video_id, "clip_index": k}) for k in range(3)],
                    "masklets": [t["masklets"][k % MASK_VARIANTS].model_copy(update={"masklet_id": masklet_id, "video_id": video_id})],
                    "samples": [
                        t["sample"].model_copy(update={"sample_id": stable_id(iid, k), "video_id": video_id, "source": item.source, "masklet_ids": [masklet_id]})
                        for k in range(3)
                    ],
                }
                record = ItemRecord(
                    item_id=iid, pipeline=PIPELINE, item_key=item.key, variant=variant, source=item.source, start_s=item.start_s,
                    end_s=item.end_s, status="done", video_id=video_id, content_sha256=video_id * 4,
                    fingerprint=prints.of(item.source), run_hash=run_hash, write_id="", run_id="", engine_version="", committed_at="",
                )
                writer.add(record, rows)
    seconds = time.perf_counter() - start
    files = [p for p in (root / "dataset").rglob("*") if p.is_file()]
    return {
        "seconds": seconds,
        "items_per_s": n / seconds,
        "commits": writer.commits,
        "files": len(files),
        "parquet_files": sum(p.suffix == ".parquet" for p in files),
        "mb_on_disk": sum(p.stat().st_size for p in files) / 2**20,
        "peak_rss_mb": _peak_rss_mb() - before,
    }


def phase_publish(root: Path, n: int) -> dict[str, Any]:
    from engine.config import load_config
    from engine.stats import Stats
    from flows.pipelines import finish_run, run_settings

    stats = Stats()
    stats.count("items_done", n)
    config = load_config("tiny")
    settings = run_settings(PIPELINE, config, OPTIONS, sources=[str(root / "manifest.jsonl")])
    version = finish_run(str(root / "dataset"), stats, config, run_id="bench", kind="run", settings=[settings], counts={"done": n})
    return {"version": version}


def phase_plan(root: Path, n: int) -> dict[str, Any]:
    from engine.planning import Planner, chunked
    from engine.storage import Dataset
    from flows.pipelines import iter_items
    from flows.prefect_flows import PLAN_CHUNK

    run_hash, variant = _identity()
    start = time.perf_counter()
    planner = Planner(Dataset(str(root / "dataset")), pipeline=PIPELINE, variant=variant, run_hash=run_hash)
    loaded = time.perf_counter() - start
    todo = skipped = 0
    for chunk in chunked(iter_items([str(root / "manifest.jsonl")]), PLAN_CHUNK):
        plan = planner.split(chunk)
        todo += len(plan.todo)
        skipped += plan.skipped
    return {
        "seconds": time.perf_counter() - start,
        "read_items_s": loaded,
        "todo": todo,
        "skipped": skipped,
        "folder_listings": planner.fingerprints.listings,
        "peak_rss_mb": _peak_rss_mb(),
    }


def phase_export(root: Path, n: int) -> dict[str, Any]:
    from engine.export import export

    start = time.perf_counter()
    summary = export(str(root / "dataset"), str(root / "export"))
    return {"seconds": time.perf_counter() - start, "samples": sum(summary.files.values()), "peak_rss_mb": _peak_rss_mb()}


PHASES = {"synth": phase_synth, "publish": phase_publish, "plan": phase_plan, "export": phase_export}


def _child(phase: str, root: Path, n: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--phase", phase, "--root", str(root), "--n", str(n)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"phase {phase} at N={n} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(sizes: list[int], out: Path, keep: Path | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"scale-{n}-", dir=keep))
        try:
            start = time.perf_counter()
            write_inputs(root, n)
            row = {"inputs_s": time.perf_counter() - start}
            for phase in PHASES:
                row[phase] = _child(phase, root, n)
                print(f"N={n} {phase}: {json.dumps(row[phase])}", flush=True)
            assert row["plan"]["todo"] == 0, "an unchanged refresh found work"
            results[str(n)] = row
        finally:
            if keep is None:
                shutil.rmtree(root, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=1))
    (out / "scale.md").write_text(report(results))
    print(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        f"# Dataset at scale ({os.cpu_count()} cores)",
        "",
        "| N items | commit items/s | commits | files | Parquet files | MB on disk | writer RSS MB (above the templates) | plan unchanged s | plan RSS MB | export s | export RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in results.items():
        s, p, e = r["synth"], r["plan"], r["export"]
        lines.append(
            f"| {int(n):,} | {s['items_per_s']:.0f} | {s['commits']} | {s['files']} | {s['parquet_files']} | {s['mb_on_disk']:.0f} | "
            f"{s['peak_rss_mb']:.0f} | {p['seconds']:.1f} | {p['peak_rss_mb']:.0f} | {e['seconds']:.1f} | {e['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,700000", help="comma-separated item counts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--keep", type=Path, default=None, help="build the datasets under this folder and keep them")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args.root, args.n)))
        return
    run([int(s) for s in args.sizes.split(",")], args.out, args.keep)


if __name__ == "__main__":
    main()
