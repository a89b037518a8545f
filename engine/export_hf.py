"""`hf`: a folder `datasets.load_dataset("<out>/hf")` reads, under `<out>/hf/`:
- `data/<pipeline>/train-00000.parquet`, ...: one row per sample, columns `SCHEMA` below (`masks`: one list per
  `<region>` or `[SEG]` token over the whole conversation, in order, of {frame, rle} on the frames `frames`
  picks as for `videorefer`; `labels`: the sample's labels as a JSON object, since `datasets` has no map type);
- `README.md`: the dataset card. Its YAML header declares the configs: `default` (every pipeline) and one per
  pipeline, each a `train` split; its body gives the samples per pipeline and data type, the models per role
  and the prompt template hashes (from the samples' provenance), and the dataset version exported.
`video`, `start`/`end`, frame indexes and mask sizes as engine/export.py describes. Files are written a row
group at a time (a writer per file), to `.partial` names renamed when complete.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from engine.export import (
    ExportOptions,
    ExportRun,
    ExportSummary,
    conversations,
    export_run,
    safe_name,
    tokens,
)
from engine.storage import Dataset

SPLIT = "train"
ROW_GROUP_ROWS = 256  # rows buffered before a row group is written: masks make rows large
ROWS_PER_FILE = 100_000


def schema() -> Any:
    import pyarrow as pa

    rle = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
    return pa.schema([
        ("id", pa.string()),
        ("pipeline", pa.string()),
        ("data_type", pa.string()),
        ("task", pa.string()),
        ("video_id", pa.string()),
        ("video", pa.string()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("fps", pa.float64()),
        ("frames", pa.list_(pa.int32())),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("masklet_ids", pa.list_(pa.string())),
        ("masks", pa.list_(pa.list_(pa.struct([("frame", pa.int32()), ("rle", rle)])))),
        ("labels", pa.string()),
        ("refers_to", pa.list_(pa.string())),
        ("kept", pa.bool_()),
    ])


def export_hf(dataset: Dataset, out: str, options: ExportOptions = ExportOptions()) -> ExportSummary:
    card = _Card()
    with export_run(dataset, out, options) as run:
        with _ParquetFiles(run.fs, f"{run.root}/hf") as files:
            for sample, row in run.entries(lambda s: _row(run, s)):
                files.write(sample["pipeline"], row)
                card.add(sample)
        run.summary.files = files.counts
        run.fs.makedirs(f"{run.root}/hf", exist_ok=True)
        run.fs.pipe(f"{run.root}/hf/README.md", card.text(dataset, options, sorted(files.pipelines)).encode())
    return run.summary


def _row(run: ExportRun, sample: dict[str, Any]) -> dict[str, Any]:
    tokens(sample)
    place = run.place(sample)
    frames = sample["frames"] if run.options.frames == "sample" else None
    masks = [
        [{"frame": i, "rle": rle} for i, rle in run.masks(m, frames, place, hold=run.options.frames == "all").items()]
        for m in sample["masklet_ids"]
    ]
    return {
        "id": sample["sample_id"],
        "pipeline": sample["pipeline"],
        "data_type": sample["data_type"],
        "task": sample["task"],
        "video_id": sample["video_id"],
        "video": place.video,
        "start": place.times().get("start"),
        "end": place.times().get("end"),
        "height": place.target.height,
        "width": place.target.width,
        "fps": place.row["fps"],
        "frames": [i - place.target.first_index for i in sample["frames"] if place.inside(i)],
        "conversations": conversations(sample),
        "masklet_ids": sample["masklet_ids"],
        "masks": masks,
        "labels": json.dumps(sample["labels"], sort_keys=True),
        "refers_to": sample["refers_to"] or [],
        "kept": sample["kept"],
    }


class _ParquetFiles:
    """`data/<pipeline>/train-NNNNN.parquet` under `root`: one writer per open file, rows written a row group at
    a time, a new file every ROWS_PER_FILE rows."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root, self.schema = fs, root, schema()
        self.open: dict[str, tuple[Any, Any, str]] = {}  # pipeline -> (file, writer, path)
        self.buffers: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.parts: Counter = Counter()  # pipeline -> files started
        self.counts: dict[str, int] = {}  # path -> rows
        self.pipelines: set[str] = set()

    def write(self, pipeline: str, row: dict[str, Any]) -> None:
        self.pipelines.add(pipeline)
        self.buffers[pipeline].append(row)
        if len(self.buffers[pipeline]) >= ROW_GROUP_ROWS:
            self._flush(pipeline)

    def _flush(self, pipeline: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows, self.buffers[pipeline] = self.buffers[pipeline], []
        if not rows:
            return
        if pipeline not in self.open:
            path = f"{self.root}/data/{safe_name(pipeline)}/{SPLIT}-{self.parts[pipeline]:05d}.parquet"
            self.parts[pipeline] += 1
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            file = self.fs.open(f"{path}.partial", "wb")
            self.open[pipeline] = (file, pq.ParquetWriter(file, self.schema), path)
            self.counts[path] = 0
        file, writer, path = self.open[pipeline]
        writer.write_table(pa.Table.from_pylist(rows, schema=self.schema), row_group_size=ROW_GROUP_ROWS)
        self.counts[path] += len(rows)
        if self.counts[path] >= ROWS_PER_FILE:
            self._close(pipeline, complete=True)

    def _close(self, pipeline: str, *, complete: bool) -> None:
        file, writer, path = self.open.pop(pipeline)
        writer.close()
        file.close()
        if complete:
            self.fs.mv(f"{path}.partial", path)
        else:
            self.fs.rm(f"{path}.partial")
            del self.counts[path]

    def __enter__(self) -> "_ParquetFiles":
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is None:
            for pipeline in list(self.buffers):
                self._flush(pipeline)
        for pipeline in list(self.open):
            self._close(pipeline, complete=kind is None)


class _Card:
    """What the dataset card reports, gathered while the rows stream by (bounded by the pipelines, data
    types, roles and prompts, not by the samples)."""

    def __init__(self) -> None:
        self.samples: Counter = Counter()  # (pipeline, data type) -> samples
        self.models: dict[tuple[str, str], set[str]] = defaultdict(set)  # (pipeline, role) -> model ids
        self.prompts: dict[tuple[str, str], set[str]] = defaultdict(set)  # (pipeline, template) -> hashes

    def add(self, sample: dict[str, Any]) -> None:
        pipeline, provenance = sample["pipeline"], sample["provenance"]
        self.samples[pipeline, sample["data_type"]] += 1
        for role, model in provenance["models"] or []:  # Arrow maps read back as pairs
            self.models[pipeline, role].add(model)
        for template, digest in provenance["prompt_hashes"] or []:
            self.prompts[pipeline, template].add(digest)

    def text(self, dataset: Dataset, options: ExportOptions, pipelines: list[str]) -> str:
        import yaml

        def config(name: str, folder: str) -> dict[str, Any]:
            return {"config_name": name, "data_files": [{"split": SPLIT, "path": f"data/{folder}/{SPLIT}-*.parquet"}]}

        configs = [{**config("default", "*"), "default": True}] + [config(p, safe_name(p)) for p in pipelines]
        header = yaml.safe_dump({"configs": configs, "pretty_name": "Masklet-grounded video instructions"}, sort_keys=False)
        lines = [f"---\n{header}---", "", "# Masklet-grounded video instruction data", "", _version(dataset, options), ""]
        lines += [
            "Configs: `default` holds every sample; one config per pipeline holds its own. Each row is one sample:",
            "`conversations` with `<region>`/`[SEG]` tokens, `masks` one list per token in order ({frame of `video`,",
            "COCO RLE at `height` x `width`}), `labels` a JSON object, `start`/`end` the seconds of `video` a",
            "clip-level sample is about, `refers_to` what the sample points at (`mask`, `timestamp`, `coarse_time`,",
            "`event`), for mixing data by what it contains.",
            "",
            "## Samples",
            "",
            "| pipeline | data type | samples |",
            "|---|---|---|",
        ]
        lines += [_row_of(p, t, n) for (p, t), n in sorted(self.samples.items())]
        lines += ["", "## Models", "", "| pipeline | role | model |", "|---|---|---|"]
        lines += [_row_of(p, r, m) for (p, r), models in sorted(self.models.items()) for m in sorted(models)]
        lines += ["", "## Prompts", "", "| pipeline | template | hash |", "|---|---|---|"]
        lines += [_row_of(p, t, h) for (p, t), hashes in sorted(self.prompts.items()) for h in sorted(hashes)]
        return "\n".join(lines) + "\n"


def _row_of(*cells: object) -> str:
    """A Markdown table row; a `|` inside a value would end its cell."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _version(dataset: Dataset, options: ExportOptions) -> str:
    if options.version is None:
        return f"Exported from `{dataset.url}`: every committed item (no version published)."
    record = next(v.record for v in dataset.versions() if v.number == options.version)
    return (
        f"Exported from `{dataset.url}`, dataset version {options.version} (published {record.published_at} by "
        f"{record.kind} `{record.run_id}`, engine {record.engine_version})."
    )
