"""The `engine` command. Heavy libraries are imported inside the commands, so `engine --help` stays fast."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Turn raw videos into masklet-grounded instruction data (VideoRefer, Strefer, SAMA, UFVideo pipelines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(help="Look at a dataset folder.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")

console = Console()
err = Console(stderr=True)

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="Model profile: default, paper, tiny (or one from --config).")]
ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML merged over the bundled profiles.yaml.", dir_okay=False)
]


class Baseline(str, Enum):
    grounded_sam2 = "grounded-sam2"


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run_guarded(fn, *args, **kwargs):
    """User-facing errors on one line and a non-zero exit, never a traceback."""
    from engine.errors import EngineError

    try:
        return fn(*args, **kwargs)
    except (EngineError, ValueError, OSError) as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        _fail("interrupted; completed videos are kept, and a rerun resumes with the rest", code=130)


@app.command("clip-and-track")
def clip_and_track(
    videos: Annotated[list[str], typer.Argument(help="Video files or fsspec URLs; several run one after another.")],
    entity: Annotated[
        list[str],
        typer.Option(
            "--entity",
            "-e",
            help="EXPRESSION[:GENERALIZED_NOUN], repeatable, e.g. 'girl in a blue dress:person'. "
            "Without a noun the expression itself prompts the detector.",
        ),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Dataset folder (local path or fsspec URL).")],
    profile: ProfileOpt = "default",
    config: ConfigOpt = None,
    render: Annotated[bool, typer.Option(help="Also write renders/<video_id>.mp4 with the masklets drawn.")] = False,
    baseline: Annotated[
        Optional[Baseline],
        typer.Option(help="Also run a baseline on the same decode, written beside ours (masklets.method)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Redo videos already complete with this config.")] = False,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N (overrides the config).")] = None,
) -> None:
    """Cut videos into clips and track each referring expression as a masklet (Strefer §2.1.3-2.1.4)."""
    _run_guarded(_clip_and_track, videos, entity, out, profile, config, render, baseline, force, device)


def _clip_and_track(videos, entity, out, profile, config_file, render, baseline, force, device) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.config import load_config
    from engine.stats import Stats
    from engine.storage import Dataset
    from flows.clip_and_track import ClipAndTrack, finish_run, run_batch
    from schemas import EntityRef

    if not entity:
        raise ValueError("give at least one --entity EXPRESSION[:NOUN]")
    entities = [EntityRef.parse(e) for e in entity]
    config = load_config(profile, config_file)
    if device:
        config = config.model_copy(update={"pipeline": {**config.pipeline, "device": device}})
    if config.is_tiny:
        err.print(
            "[yellow]profile tiny: random-weight models; the masks and assignments are meaningless "
            "(a wiring check, not data).[/]"
        )
    dataset = Dataset(out)
    dataset.prepare()

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bars:
        tasks: dict[str, int] = {}

        def on_count(name: str, n: int) -> None:
            label = {"frames_detected": "detect frames", "frames_tracked": "track frames"}.get(name)
            if label:
                if label not in tasks:
                    tasks[label] = bars.add_task(label, total=None)
                bars.advance(tasks[label], n)

        def on_decode(source: str, n: int, expected: int) -> None:
            key = f"decode {Path(source).name}"
            if key not in tasks:
                tasks[key] = bars.add_task(key, total=expected or None)
            bars.update(tasks[key], completed=n)

        stats = Stats(listener=on_count)
        with err.status("loading models"):
            pipeline = ClipAndTrack.from_config(config, stats=stats)
        outcomes = run_batch(
            pipeline,
            videos,
            entities,
            dataset,
            force=force,
            baseline=baseline is not None,
            render=render,
            progress=on_decode,
        )
    manifest = finish_run(dataset, stats, config)
    _print_summary(outcomes)
    console.print(
        f"dataset {out}: "
        + ", ".join(f"{t} {i['rows']} rows" for t, i in manifest["tables"].items())
        + f"; frames decoded {stats.counters['frames_decoded']}"
    )
    if not any(o.status in ("done", "skipped") for o in outcomes):
        raise typer.Exit(1)


def _print_summary(outcomes) -> None:
    from rich.table import Table

    for o in outcomes:
        if o.status != "done":
            style = "yellow" if o.status == "skipped" else "red"
            console.print(f"[{style}]{o.status}[/] {o.source}: {o.detail}", highlight=False)
            continue
        methods = ", ".join(f"{m} start frame {f}" for m, f in o.start_frames.items())
        clip_methods = sorted({c.method for c in o.clips})
        console.print(f"[green]done[/] {o.source} (video {o.video_id}): {len(o.clips)} clips ({', '.join(clip_methods)}); {methods}")
        table = Table("method", "expression", "noun", "frames covered", "start frame", "assignment")
        for m in o.masklets:
            table.add_row(
                m.method, m.expression, m.noun, f"{len(m.frames)}/{m.num_frames_tracked}", str(m.start_frame), m.assignment.method
            )
        for r in o.rejections:
            table.add_row("-", r.expression or "-", "-", "rejected", "-", f"{r.stage}: {r.reason}", style="red")
        console.print(table)
        if o.render_path:
            console.print(f"render: {o.render_path}")


@app.command()
def models(
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Only this profile.")] = None,
    config: ConfigOpt = None,
    offline: Annotated[bool, typer.Option(help="Do not probe the hub; report only local weights.")] = False,
) -> None:
    """Each model role, its model id per profile, and whether its weights are available here."""
    _run_guarded(_models, profile, config, offline)


def _models(profile, config_file, offline) -> None:
    from rich.table import Table

    from engine.config import load_config, profile_names
    from engine.models.weights import locate

    names = [profile] if profile else profile_names(config_file)
    table = Table("profile", "role", "backend", "model", "weights")
    for name in names:
        cfg = load_config(name, config_file)
        for role, spec in cfg.roles.items():
            status = locate(spec, check_hub=not offline)
            style = "green" if status.available else "red"
            table.add_row(name, role, spec.backend, spec.model, f"[{style}]{status.where}[/]")
    console.print(table)


@app.command()
def info(videos: Annotated[list[str], typer.Argument(help="Video files or fsspec URLs.")]) -> None:
    """Probe videos: duration, fps, frames, size, rotation, codec."""
    _run_guarded(_info, videos)


def _info(videos) -> None:
    from rich.table import Column, Table

    from engine.decode import DecodeLimits
    from engine.errors import EngineError
    from engine.probe import probe_video

    table = Table("duration s", "fps", "frames", "size", "rotation", "codec", "decoded as")
    table.columns.insert(0, Column("video", overflow="fold"))
    failed = 0
    for video in videos:
        try:
            v = probe_video(video, limits=DecodeLimits())
        except EngineError as exc:
            failed += 1
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            continue
        table.add_row(
            video, f"{v.duration_s:.3f}", f"{v.fps:.3f}", str(v.num_frames), f"{v.width}x{v.height}",
            str(v.rotation), v.codec, f"{v.decode_width}x{v.decode_height}",
        )
    if table.row_count:
        console.print(table)
    if failed:
        raise typer.Exit(2)


@dataset_app.command("show")
def dataset_show(
    path: Annotated[str, typer.Argument(help="Dataset folder or fsspec URL.")],
    table: Annotated[Optional[str], typer.Option("--table", "-t", help="Only this table.")] = None,
    rows: Annotated[int, typer.Option("--rows", "-n", help="Rows to show per table.")] = 3,
) -> None:
    """Tables, row counts and a few rows of a dataset."""
    _run_guarded(_dataset_show, path, table, rows)


def _dataset_show(path, only, n) -> None:
    from rich.table import Table

    from engine.errors import BadInputError
    from engine.storage import Dataset
    from schemas import TABLES

    dataset = Dataset(path)
    if not dataset.exists():
        raise BadInputError(f"{path} does not exist")
    names = [only] if only else list(TABLES)
    summary = Table("table", "shards", "rows")
    loaded = {}
    for name in names:
        data = dataset.read_table(name)
        loaded[name] = data
        summary.add_row(name, str(len(dataset.shards(name))), str(data.num_rows))
    console.print(summary)
    console.print(f"complete videos: {len(dataset.completions())}")
    for name, data in loaded.items():
        if not data.num_rows or n <= 0:
            continue
        shown = Table(*data.column_names, title=name, show_lines=False)
        for row in data.slice(0, n).to_pylist():
            shown.add_row(*(_short(row[c]) for c in data.column_names))
        console.print(shown)


def _short(value, limit: int = 48) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return f"[{len(value)} items]"
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


if __name__ == "__main__":  # pragma: no cover - `python -m flows.cli`
    app(prog_name="engine")
