"""The `engine` command. Heavy libraries are imported inside the commands, so `engine --help` stays fast."""

from __future__ import annotations

from collections import Counter
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Turn raw videos into masklet-grounded instruction data (`engine run --help` lists the pipelines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(help="Look at a dataset folder.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")

console = Console()
err = Console(stderr=True)


def _profiles_help() -> str:
    from engine.config import profile_names

    return f"Model profile: {', '.join(profile_names())} (or one from --config)."


ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help=_profiles_help())]
ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML merged over the bundled profiles.yaml.", dir_okay=False)
]


VersionOpt = Annotated[
    Optional[int], typer.Option("--version", "-V", help="A published version (default: every committed item, now).")
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
    out: Annotated[str, typer.Option("--out", "-o", help="Dataset folder (local path or fsspec URL).")],
    entity: Annotated[
        Optional[list[str]],
        typer.Option(
            "--entity",
            "-e",
            help="EXPRESSION[:GENERALIZED_NOUN], repeatable, e.g. 'girl in a blue dress:person'. "
            "Without a noun the expression itself prompts the detector. Without --entity, the engine finds "
            "each video's entities (Strefer's Entity Recognizer and Referring Parser).",
        ),
    ] = None,
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


def _progress_bars():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err)


def _warn_tiny(config) -> None:
    if config.is_tiny:
        err.print(
            f"[yellow]profile {config.profile}: random-weight models; masks, assignments and texts are "
            "meaningless (a wiring check, not data).[/]"
        )


def _clip_and_track(videos, entity, out, profile, config_file, render, baseline, force, device) -> None:
    import uuid

    from engine.stats import Stats
    from engine.storage import Dataset
    from engine.writer import TableWriter
    from flows.pipelines import finish_run, load, run_items, run_settings
    from schemas import EntityRef, WorkItem

    entities = [EntityRef.parse(e) for e in entity or []]
    config = load(profile, str(config_file) if config_file else None, device=device)
    _warn_tiny(config)
    if not entities:
        err.print("no --entity: the Entity Recognizer and Referring Parser find each video's entities")
    Dataset(out).check_writable()

    with _progress_bars() as bars:
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
        options = {"entities": entities, "baseline": baseline is not None, "render": render}
        run_id = uuid.uuid4().hex[:16]
        with TableWriter(Dataset(out), run_id) as writer:
            outcomes = run_items(
                "clip-and-track", [WorkItem(source=v) for v in videos], out, config=config, stats=stats, force=force,
                progress=on_decode, writer=writer, **options,
            )
    settings = run_settings("clip-and-track", config, options, sources=list(videos))
    version = finish_run(
        out, stats, config, run_id=run_id, kind="run", settings=[settings], counts=dict(Counter(o.status for o in outcomes))
    )
    _print_summary(outcomes, out if render else None)
    tables = Dataset(out).summary(version)["tables"]
    console.print(
        f"dataset {out} (version {version or 'unchanged'}): "
        + ", ".join(f"{t} {i['rows']} rows" for t, i in tables.items())
        + f"; frames decoded {stats.counters['frames_decoded']}"
    )
    if not any(o.status in ("done", "skipped") for o in outcomes):
        raise typer.Exit(1)


def _print_summary(outcomes, render_root: str | None = None) -> None:
    from rich.table import Table

    for o in outcomes:
        if o.status != "done":
            style = "yellow" if o.status == "skipped" else "red"
            console.print(f"[{style}]{o.status}[/] {o.source}: {o.detail}", highlight=False)
            continue
        clips = o.outputs.clips
        clip_methods = ", ".join(sorted({c.method for c in clips}))
        console.print(f"[green]done[/] {o.source} (video {o.video_id}): {len(clips)} clips ({clip_methods})")
        table = Table("method", "expression", "noun", "frames covered", "prompted at (frame: why)", "assignment")
        for m in o.outputs.masklets:
            # merged duplicates keep every prompt (with its box); one line per frame and reason is enough here
            prompts = ", ".join(dict.fromkeys(f"{p.frame_index}: {p.reason}" for p in m.prompts)) or str(m.start_frame)
            table.add_row(
                m.method, m.expression, m.noun, f"{len(m.frames)}/{m.num_frames_tracked}", prompts, m.assignment.method
            )
        for r in o.outputs.rejections:
            table.add_row("-", r.expression or "-", "-", "rejected", "-", f"{r.stage}: {r.reason}", style="red")
        console.print(table)
        if render_root:
            console.print(f"render: {render_root.rstrip('/')}/renders/{o.video_id}.mp4")


run_app = typer.Typer(
    help="Run a pipeline's Prefect flow here, on Prefect's ephemeral API (nothing to start by hand). Items already "
    "complete with the same settings are skipped; a finished run publishes a dataset version.",
    no_args_is_help=True,
)
app.add_typer(run_app, name="run")


def _run_command(spec) -> Any:
    """`engine run <pipeline>`: the common options, then the pipeline's own, from its registry entry."""
    import inspect
    from inspect import Parameter

    def option(name: str, annotation: Any, default: Any, *flags: str, help: str) -> Parameter:
        return Parameter(name, Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, typer.Option(*flags, help=help)])

    from flows.runners import RunnerSettings

    params = [
        option("source", list[str], ..., "--source", "-s", help=(
            "Repeatable. Video files, each taken as it is." if spec.sources_are_videos else
            "Repeatable. A caption manifest (.jsonl/.csv/.parquet: video, caption, optional start/end), a dataset "
            "release as it unpacks (MeViS, Ref-YouTube-VOS, ReVOS, LV-VIS, SA-V, VidSTG, A2D-Sentences), an objects "
            "JSONL, a dataset the engine wrote, a video file, a folder of videos or a folder of frames.")),
        option("out", str, ..., "--out", "-o", help="Dataset folder (local path or object-store URL)."),
        option("profile", str, "default", "--profile", "-p", help="Model profile (engine models lists them)."),
        option("config", Optional[Path], None, "--config", "-c", help="YAML merged over the bundled profiles.yaml."),
        option("batch_size", int, 8, "--batch-size", help="Items per Prefect task."),
    ]
    if spec.batched_sources:
        params += [
            option("limit", Optional[int], None, "--limit", help="Process at most this many items."),
            option("frame_rate", Optional[float], None, "--frame-rate", help="Frames per second of frame folders (MeViS, Ref-YouTube-VOS and ReVOS: 6)."),
            option("split", Optional[str], None, "--split", help="Split of a dataset release with several (MeViS: train, valid_u, valid)."),
        ]
    params.append(option("runner", Optional[str], None, "--runner", help=(
        "Where batches run: local (threads here; the default), ray (a Ray cluster: pipeline.orchestration.ray_address) "
        f"or deployment (shards as child flow runs of {RunnerSettings().shard_deployment} on the GPU pool's workers).")))
    params.append(option("force", bool, False, "--force", help=(
        "Redo items already complete with these settings; where an input holds outputs made with other options, "
        "replace them instead of adding beside them.")))
    for o in spec.options:
        kind = Optional[list[o.kind]] if o.repeatable else o.kind
        flags = (o.cli_flag, o.short) if o.short else (o.cli_flag,)
        if o.kind is bool:
            flags = (f"{o.cli_flag}/--no-{o.cli_flag[2:]}",)
        choices = f" Choices: {', '.join(o.choices)}." if o.choices else ""
        params.append(option(o.name, kind, None if o.repeatable else o.default, *flags, help=o.help + choices))

    def command(**values: Any) -> None:
        _run_guarded(_run, spec, values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = spec.name.replace("-", "_")
    command.__doc__ = spec.summary
    return command


def _register_run_commands() -> None:
    from flows.registry import specs

    for spec in specs():
        run_app.command(spec.name)(_run_command(spec))


def _run(spec, values: dict[str, Any]) -> None:
    import logging
    import os

    from engine.storage import Dataset
    from flows.pipelines import iter_items, load

    config_file = str(values["config"]) if values["config"] else None
    config = load(values["profile"], config_file)  # fail fast, before Prefect starts
    if values.get("limit") is not None and values["limit"] < 1:
        raise ValueError("--limit must be >= 1")
    sources = list(values["source"])
    # every source opened and checked: one line if bad
    iter_items(sources, frame_rate=values.get("frame_rate"), split=values.get("split"), videos=spec.sources_are_videos,
               engine_samples=spec.engine_samples)
    Dataset(values["out"]).check_layout()
    from flows.runners import settings as runner_settings

    runner_settings(config.section("orchestration"), values["runner"])  # a bad runner: one line, now
    options = {o.name: (values[o.name] or list(o.default)) if o.repeatable else values[o.name] for o in spec.options}
    for o in spec.options:
        wrong = [v for v in (options[o.name] if o.repeatable else [options[o.name]]) if o.choices and v not in o.choices]
        if wrong:
            raise ValueError(f"{o.cli_flag} must be among {', '.join(o.choices)}; got {', '.join(map(str, wrong))}")
    _warn_tiny(config)
    # Prefect's ephemeral API can take tens of seconds to come up on a busy machine (its default wait is 20 s).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from a data run
    with err.status("starting Prefect (ephemeral API) and the flow"):
        import flows.prefect_flows as prefect_flows
    logging.getLogger("prefect.events").setLevel(logging.CRITICAL)  # shutdown noise of the ephemeral server
    batching = {k: values[k] for k in ("limit", "frame_rate", "split") if spec.batched_sources}
    try:
        result = getattr(prefect_flows, spec.entrypoint)(
            **{spec.source_param: sources}, out=values["out"], profile=values["profile"], config_file=config_file,
            batch_size=values["batch_size"], force=values["force"], runner=values["runner"], **batching, **options,
        )
    except RuntimeError as exc:  # a failed batch or an API that did not start: one line, not a traceback
        _fail(f"the flow failed: {str(exc).splitlines()[0]}", code=1)
    _print_funnel(result["stats"]["counters"], spec.funnel)
    statuses = result["items"]
    beside = result["stats"]["counters"].get("items_beside_other_options")
    if beside:
        how = "replaced them (--force)" if values["force"] else "added this run's beside them (--force replaces them)"
        console.print(f"{beside} inputs already held outputs made with other options: {how}")
    console.print(
        f"dataset {values['out']} (version {result['version'] or 'unchanged: nothing new'}): items "
        + (", ".join(f"{s} {n}" for s, n in sorted(statuses.items())) or "none")
        + "; " + ", ".join(f"{t} {i['rows']} rows" for t, i in result["tables"].items())
    )
    if not statuses.get("done") and not statuses.get("skipped"):
        raise typer.Exit(1)


def _print_funnel(counters: dict[str, int], funnel: tuple[str, ...] = ()) -> None:
    """Per agent of the pipeline's funnel: items in, out, and why the others left; then samples per data type,
    and per group and task type where the pipeline counts them so (Strefer's Table 1)."""
    from rich.table import Table

    agents: dict[str, dict[str, Any]] = {}
    for name, n in counters.items():
        parts = name.split(".")
        if parts[0] != "funnel":
            continue
        row = agents.setdefault(parts[1], {"in": 0, "out": 0, "dropped": {}})
        if parts[2] == "dropped":
            row["dropped"][".".join(parts[3:])] = n
        else:
            row[parts[2]] = n
    table = Table("agent", "in", "out", "kept", "why items left")
    for agent in funnel:
        row = agents.get(agent)
        if row:
            share = f"{row['out'] / row['in']:.0%}" if row["in"] else "-"
            why = ", ".join(f"{r} {n}" for r, n in sorted(row["dropped"].items()) if n)
            table.add_row(agent, str(row["in"]), str(row["out"]), share, why or "-")
    if table.row_count:
        console.print(table)
    samples = Table("data type", "samples kept", "dropped by the reviewer")
    types = sorted({k.split(".")[1] for k in counters if k.startswith("samples.") and k.count(".") == 2})
    for data_type in types:
        samples.add_row(data_type, str(counters.get(f"samples.{data_type}.kept", 0)), str(counters.get(f"samples.{data_type}.dropped", 0)))
    if samples.row_count:
        console.print(samples)
    groups = Table("data type", "group", "task type", "samples")
    for name, n in sorted(counters.items()):
        if name.startswith("samples.") and name.count(".") == 3:
            _, data_type, group, task = name.split(".")
            groups.add_row(data_type, group, task, str(n))
    if groups.row_count:
        console.print(groups)


def _export_formats() -> type[Enum]:
    from flows.registry import export_formats

    return Enum("ExportFormat", {f: f for f in export_formats()}, type=str)


ExportFormat = _export_formats()


def _default_export_format() -> Enum:
    from flows.registry import default_export_format

    return ExportFormat(default_export_format())


def _formats_help() -> str:
    """Every format a pipeline declares, with what it writes."""
    from engine.export import FORMAT_HELP

    described = (f"{f.value} ({FORMAT_HELP.get(f.value, 'see engine/export.py')})" for f in ExportFormat)
    return "Training format: " + "; ".join(described) + "."


def _pipelines_help() -> str:
    from flows.registry import specs

    return f"Only this pipeline ({', '.join(s.name for s in specs())})."


class FrameChoice(str, Enum):
    sample = "sample"
    tracked = "tracked"
    all = "all"


class TimeFormat(str, Enum):
    timestamp = "timestamp"
    tokens = "tokens"


@app.command("export")
def export(
    path: Annotated[str, typer.Argument(help="Dataset folder or fsspec URL.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the exported files.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help=_formats_help())] = _default_export_format(),
    include_dropped: Annotated[bool, typer.Option(help="Also export samples the Reviewer dropped.")] = False,
    frames: Annotated[
        FrameChoice,
        typer.Option(
            help="Frames each region is annotated on (videorefer, hf): sample (the sample's keyframes, as VideoRefer-700K), tracked "
            "(every frame with a mask) or all (every frame; one the tracker skipped at track_fps holds the nearest "
            "tracked mask, within half a tracking interval)."
        ),
    ] = FrameChoice.sample,
    cut_clips: Annotated[
        bool,
        typer.Option(
            help="Write each clip or window a sample is about as its own file under OUT/clips (frame folders under "
            "OUT/frames, also any whose frames the trainer's loader would list in another order), point `video` at "
            "it and count annotation frames from its first frame. Without it, such samples carry start/end seconds."
        ),
    ] = False,
    video_root: Annotated[
        Optional[str],
        typer.Option(help="Write `video` paths relative to this folder (the trainer joins them to its data folder)."),
    ] = None,
    time_format: Annotated[
        TimeFormat,
        typer.Option(help="Which form of the samples written in both to export; samples without a time are kept."),
    ] = TimeFormat.timestamp,
    version: Annotated[
        Optional[int], typer.Option("--version", "-V", help="The dataset version to export (default: the latest published).")
    ] = None,
) -> None:
    """Write a dataset's samples in a training format, one of those the pipelines declare (--format)."""
    _run_guarded(
        _export, path, out, fmt.value, include_dropped, frames.value, cut_clips, video_root, time_format.value, version
    )


def _export(path, out, fmt, include_dropped, frames, cut_clips, video_root, time_format, version) -> None:
    from engine.export import HINTS
    from engine.export import export as run_export

    summary = run_export(
        path, out, fmt=fmt, include_dropped=include_dropped, frames=frames, cut_clips=cut_clips,
        video_root=video_root, time_format=time_format, version=version,
    )
    for file, n in summary.files.items():
        console.print(f"{file}: {n} samples")
    if summary.clips:
        console.print(f"clips written: {summary.clips}")
    if summary.skipped:
        console.print("left out: " + ", ".join(f"{r} {n}" for r, n in sorted(summary.skipped.items())))
        for reason in sorted(set(summary.skipped) & set(HINTS)):
            console.print(f"  {reason}: {HINTS[reason]}")
    if not summary.files:
        console.print("[yellow]no samples to export[/]")


@app.command("view")
def view(
    path: Annotated[str, typer.Argument(help="Dataset folder or fsspec URL.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Local folder for the pages (open OUT/index.html).")],
    sample: Annotated[Optional[str], typer.Option("--sample", "-s", help="Only this sample id.")] = None,
    limit: Annotated[int, typer.Option(help="Write at most this many samples (the first that match).")] = 200,
    pipeline: Annotated[Optional[str], typer.Option(help="Only samples of this pipeline.")] = None,
    data_type: Annotated[Optional[str], typer.Option(help="Only samples of this data type.")] = None,
    version: Annotated[
        Optional[int], typer.Option("--version", "-V", help="The dataset version to show (default: the latest published).")
    ] = None,
) -> None:
    """Write static HTML pages of samples: frames with each region's mask, and the conversation beside them."""
    _run_guarded(_view, path, out, sample, limit, pipeline, data_type, version)


def _view(path, out, sample, limit, pipeline, data_type, version) -> None:
    from engine.view import view as write_view

    with _progress_bars() as bars:
        tasks: dict[str, int] = {}

        def on_progress(description: str, done: int, total: int | None) -> None:
            if description not in tasks:
                tasks[description] = bars.add_task(description, total=total)
            bars.update(tasks[description], completed=done, total=total)

        summary = write_view(
            path, out, sample_id=sample, limit=limit, pipeline=pipeline, data_type=data_type, version=version,
            progress=on_progress,
        )
    if not summary.pages:
        console.print("[yellow]no samples match[/]")
    console.print(f"{summary.pages} sample pages, {summary.frames} frames: open {summary.index}")
    if summary.limited:
        console.print(f"more samples match: the first {limit} were written (raise --limit for more)")
    if summary.notes:
        console.print("pages with notes: " + ", ".join(f"{k} {n}" for k, n in sorted(summary.notes.items())))


@app.command()
def models(
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Only this profile.")] = None,
    config: ConfigOpt = None,
    offline: Annotated[bool, typer.Option(help="Do not probe the hub; report only local weights.")] = False,
    pipeline: Annotated[Optional[str], typer.Option(help=_pipelines_help())] = None,
) -> None:
    """Per profile and pipeline: each model role, its backend and model, and whether its weights are here."""
    _run_guarded(_models, profile, config, offline, pipeline)


def _models(profile, config_file, offline, pipeline=None) -> None:
    from rich.table import Table

    from engine.config import profile_names
    from engine.models.weights import locate
    from flows.pipelines import load, pipeline_module, pipeline_names

    names = [profile] if profile else profile_names(config_file)
    pipelines = [pipeline] if pipeline else pipeline_names()
    table = Table("profile", "pipeline", "role", "backend", "model", "weights")
    for name in names:
        cfg = load(name, config_file)
        for pipe in pipelines:
            for role in pipeline_module(pipe).roles(cfg):
                spec = cfg.roles.get(role)
                if spec is None:
                    table.add_row(name, pipe, role, "-", "-", "[red]not in this profile[/]")
                    continue
                status = locate(spec, check_hub=not offline)
                style = "green" if status.available else "red"
                table.add_row(name, pipe, role, spec.backend, spec.model, f"[{style}]{status.where}[/]")
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
    path: Annotated[str, typer.Argument(help="Dataset folder or URL.")],
    table: Annotated[Optional[str], typer.Option("--table", "-t", help="Only this table.")] = None,
    rows: Annotated[int, typer.Option("--rows", "-n", help="Rows to show per table.")] = 3,
    version: VersionOpt = None,
) -> None:
    """Tables, committed row counts, items per pipeline and status, and a few rows of a dataset."""
    _run_guarded(_dataset_show, path, table, rows, version)


def _dataset_show(path, only, n, version) -> None:
    from rich.table import Table

    from engine.storage import Dataset
    from schemas import TABLES

    dataset = Dataset(path)
    dataset.require()
    summary = dataset.summary(version)
    names = [only] if only else list(TABLES)
    counts = Table("table", "rows")
    for name in names:
        if name not in summary["tables"]:
            raise ValueError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
        counts.add_row(name, str(summary["tables"][name]["rows"]))
    console.print(counts)
    items = summary["items"]
    console.print("items: " + (", ".join(f"{p} {s} {c}" for p, st in items.items() for s, c in sorted(st.items())) or "none"))
    latest = dataset.latest_version()
    console.print(f"versions: {latest or 'none published'}" + ("" if version else " (showing every committed item)"))
    for name in names:
        if n <= 0:
            break
        data = next(dataset.scan(name, version=version, batch_rows=n), None)
        if data is None:
            continue
        shown = Table(*data.schema.names, title=name, show_lines=False)
        for row in data.slice(0, n).to_pylist():
            shown.add_row(*(_short(row[c]) for c in data.schema.names))
        console.print(shown)


@dataset_app.command("versions")
def dataset_versions(
    path: Annotated[str, typer.Argument(help="Dataset folder or URL.")],
    version: Annotated[
        Optional[int], typer.Option("--version", "-V", help="Show this version's run: its counters and each agent's funnel.")
    ] = None,
) -> None:
    """Every published version: when, what ran (pipeline, kind) and what it did (items per status); with
    --version, that run's counters and funnel, kept with its version."""
    _run_guarded(_dataset_versions, path, version)


def _dataset_versions(path, number: int | None = None) -> None:
    from rich.table import Table

    from engine.storage import Dataset

    dataset = Dataset(path)
    dataset.require()
    if number is not None:
        _version_run(dataset, number)
        return
    table = Table("version", "published", "kind", "pipelines", "items")
    for v in dataset.versions():
        pipelines = ", ".join(sorted({s.pipeline for s in v.record.settings})) or "-"
        counts = ", ".join(f"{k} {c}" for k, c in sorted(v.record.counts.items()) if c) or "-"
        table.add_row(str(v.number), v.record.published_at[:19], v.record.kind, pipelines, counts)
    if not table.row_count:
        console.print("no published version yet")
        return
    console.print(table)


def _version_run(dataset: Any, number: int) -> None:
    """One version's run: what it did per status, its counters, and each recorded pipeline's funnel."""
    import json

    from rich.table import Table

    from flows import registry

    found = next((v for v in dataset.versions() if v.number == number), None)
    if found is None:
        dataset.table_versions(number)  # the one-line error that names the published versions
    record = found.record
    counters = json.loads(record.stats or "{}").get("counters", {})
    console.print(f"version {number}: {record.kind}, published {record.published_at[:19]}; items "
                  + (", ".join(f"{k} {c}" for k, c in sorted(record.counts.items()) if c) or "-"))
    table = Table("counter", "value")
    for name, value in sorted(counters.items()):
        if not name.startswith(("funnel.", "samples.")):
            table.add_row(name, str(value))
    if table.row_count:
        console.print(table)
    for pipeline in sorted({s.pipeline for s in record.settings}):
        spec = registry.known(pipeline)
        _print_funnel(counters, spec.funnel if spec else ())


@dataset_app.command("diff")
def dataset_diff(
    path: Annotated[str, typer.Argument(help="Dataset folder or URL.")],
    first: Annotated[int, typer.Argument(help="The older version.")],
    second: Annotated[int, typer.Argument(help="The newer version.")],
) -> None:
    """Items added, changed and removed between two versions (per pipeline), and rows per table in each."""
    _run_guarded(_dataset_diff, path, first, second)


def _dataset_diff(path, first, second) -> None:
    from rich.table import Table

    from engine.storage import Dataset

    dataset = Dataset(path)
    dataset.require()
    diff = dataset.diff(first, second)
    items = Table("items", *sorted({*diff.added, *diff.changed, *diff.removed}) or ["-"], "for example")
    for name in ("added", "changed", "removed"):
        per = getattr(diff, name)
        pipelines = sorted({*diff.added, *diff.changed, *diff.removed}) or ["-"]
        items.add_row(name, *(str(per.get(p, 0)) for p in pipelines), ", ".join(diff.examples[name][:3]) or "-")
    console.print(items)
    rows = Table("table", f"rows in {first}", f"rows in {second}", "change")
    for table, (a, b) in diff.rows.items():
        rows.add_row(table, str(a), str(b), f"{b - a:+d}")
    console.print(rows)


@dataset_app.command("compact")
def dataset_compact(
    path: Annotated[str, typer.Argument(help="Dataset folder or URL.")],
    retention_hours: Annotated[
        int,
        typer.Option(help="Keep files an older version needs for this long (0: only the newest version stays readable)."),
    ] = 168,
) -> None:
    """Delete superseded and orphaned rows, merge small files and vacuum old ones; publishes a version whose
    plain Delta snapshot is exactly the committed data. Run it while no run writes the dataset."""
    _run_guarded(_dataset_compact, path, retention_hours)


def _dataset_compact(path, retention_hours) -> None:
    import json
    import uuid

    from engine import __version__
    from engine.storage import Dataset
    from schemas import VersionRecord

    if retention_hours < 0:
        raise ValueError("--retention-hours must be >= 0")
    dataset = Dataset(path)
    counts = dataset.compact(retention_hours=retention_hours)
    latest = dataset.versions()
    settings = latest[-1].record.settings if latest else []
    record = VersionRecord(
        run_id=uuid.uuid4().hex[:16], kind="compact", published_at="", engine_version=__version__, tables={},
        settings=settings, counts={}, stats=json.dumps({"rows": counts}),
    )
    number = dataset.publish(record)
    for table, (before, after) in counts.items():
        console.print(f"{table}: {before} rows -> {after}")
    console.print(f"version {number}: the plain Delta snapshot of every table is the committed data")


@dataset_app.command("audit")
def dataset_audit(
    path: Annotated[str, typer.Argument(help="Dataset folder or URL.")],
    source: Annotated[list[str], typer.Option("--source", "-s", help="Repeatable: the sources the dataset was built from.")],
    frame_rate: Annotated[Optional[float], typer.Option(help="Frames per second of frame folders.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a dataset release with several.")] = None,
) -> None:
    """Check that every input of the sources is done, rejected (with a reason) or removed, for every pipeline
    and options the dataset recorded; exits 1 naming what is unaccounted for."""
    _run_guarded(_dataset_audit, path, source, frame_rate, split)


def _dataset_audit(path, source, frame_rate, split) -> None:
    from flows.audit import audit

    report = audit(path, list(source), frame_rate=frame_rate, split=split)
    console.print(", ".join(f"{status} {n}" for status, n in sorted(report.counts.items())) or "no inputs")
    if report.missing:
        for pipeline, item_source in report.examples:
            err.print(f"unaccounted for ({pipeline}): {item_source}", highlight=False, soft_wrap=True)
        _fail(f"{report.missing} inputs are neither done, rejected nor removed", code=1)
    console.print(f"all {report.inputs} inputs accounted for")


@app.command("refresh")
def refresh(
    path: Annotated[str, typer.Argument(help="Dataset folder or URL, built by a pipeline run.")],
    source: Annotated[
        Optional[list[str]],
        typer.Option("--source", "-s", help="Repeatable; default: the sources the dataset recorded."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Items per Prefect task.")] = 8,
) -> None:
    """The nightly refresh, here: rerun every recorded pipeline (same options and settings) over only new or
    changed inputs, retry transient rejections, mark vanished inputs removed, publish a version (none if
    nothing changed)."""
    _run_guarded(_refresh, path, source, batch_size)


def _refresh(path, source, batch_size) -> None:
    import logging
    import os

    from engine.storage import Dataset
    from flows.pipelines import iter_items

    Dataset(path).require()
    if source:
        iter_items(list(source))  # checked before Prefect starts
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with err.status("starting Prefect (ephemeral API) and the flow"):
        from flows.prefect_flows import refresh_dataset_flow
    logging.getLogger("prefect.events").setLevel(logging.CRITICAL)
    try:
        result = refresh_dataset_flow(out=path, source=list(source) if source else None, batch_size=batch_size)
    except RuntimeError as exc:
        _fail(f"the refresh failed: {str(exc).splitlines()[0]}", code=1)
    items = ", ".join(f"{s} {n}" for s, n in sorted(result["items"].items()) if n) or "nothing"
    console.print(f"refresh of {path}: {items}; version {result['version'] or 'unchanged: nothing new'}")


def _short(value, limit: int = 48) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return f"[{len(value)} items]"
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_register_run_commands()

if __name__ == "__main__":  # pragma: no cover - `python -m flows.cli`
    app(prog_name="engine")
