"""Clip and track: the Video Clipper and the Referring Masklet Generator over one decode per video.

`ClipAndTrack` is plain Python (the CLI calls it directly); `clip_and_track_flow` runs the same work as a
Prefect flow, one task per batch of videos.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

from agents.masklet_generator import MaskletConfig, MaskletResult, ReferringMaskletGenerator
from agents.video_clipper import ClipperConfig, VideoClipper
from engine import __version__
from engine.config import EngineConfig
from engine.decode import DecodeLimits, decode_video
from engine.errors import EngineError
from engine.ids import file_sha256, stable_id
from engine.probe import probe_video
from engine.stats import Stats
from engine.storage import Dataset
from schemas import ClipRecord, EntityRef, MaskletRecord, Provenance, RejectionRecord, VideoRecord

ROLES = ["detector", "tracker", "grounder", "embedder", "box_segmenter"]
DecodeProgress = Callable[[str, int, int], None]  # (video source, frames decoded, frames expected)


@dataclass
class VideoOutcome:
    source: str
    status: str  # done | skipped | rejected
    video_id: str | None = None
    detail: str = ""
    clips: list[ClipRecord] = field(default_factory=list)
    masklets: list[MaskletRecord] = field(default_factory=list)
    rejections: list[RejectionRecord] = field(default_factory=list)
    start_frames: dict[str, int | None] = field(default_factory=dict)
    render_path: str | None = None


def input_rejection(source: str, reason: str, detail: str, stage: str = "input") -> RejectionRecord:
    return RejectionRecord(
        rejection_id=stable_id(source, stage, reason), source=source, stage=stage, reason=reason, detail=detail
    )


class ClipAndTrack:
    """Holds the agents (models load once) and processes videos one by one into a dataset."""

    def __init__(self, config: EngineConfig, *, backends: dict, stats: Stats | None = None) -> None:
        self.config = config
        self.stats = stats or Stats()
        self.limits = DecodeLimits(**config.section("decode"))
        self.clipper = VideoClipper(
            embedder=backends["embedder"], config=ClipperConfig(**config.section("clipper")), stats=self.stats
        )
        masklet_config = MaskletConfig(**config.section("masklets"))
        self.generator = ReferringMaskletGenerator(
            detector=backends["detector"],
            tracker=backends["tracker"],
            grounder=backends["grounder"],
            box_segmenter=backends.get("box_segmenter"),
            config=masklet_config,
            stats=self.stats,
        )
        self.models = {role: getattr(b, "model_id", "?") for role, b in backends.items()}

    @classmethod
    def from_config(cls, config: EngineConfig, *, stats: Stats | None = None) -> "ClipAndTrack":
        from engine.models import factory

        roles = [r for r in ROLES if r != "box_segmenter" or config.section("masklets").get("prompt") == "mask"]
        return cls(config, backends=factory.build(config, roles), stats=stats)

    def provenance(self) -> Provenance:
        from prompts import template_hash

        return Provenance(
            engine_version=__version__,
            profile=self.config.profile,
            models=self.models,
            prompt_hashes={"grounder": template_hash("grounder")},
            config_hash=self.config.hash,
        )

    def process(
        self,
        source: str,
        entities: Sequence[EntityRef],
        dataset: Dataset,
        *,
        force: bool = False,
        baseline: bool = False,
        render: bool = False,
        progress: DecodeProgress | None = None,
    ) -> VideoOutcome:
        """One video, end to end. Bad input becomes a rejection row; it never raises for the batch."""
        try:
            info = probe_video(source, limits=self.limits)
        except EngineError as exc:
            self.stats.count("videos_rejected")
            rejection = input_rejection(source, "unreadable_video", str(exc))
            dataset.write_rejections(stable_id(source), [rejection])
            return VideoOutcome(source, "rejected", detail=str(exc), rejections=[rejection])

        with self.stats.timer("hash"):
            sha = file_sha256(source)
        video_id = sha[:16]
        if not force and dataset.is_complete(video_id, self.config.hash):
            self.stats.count("videos_skipped_complete")
            return VideoOutcome(source, "skipped", video_id, "already complete with this config (use --force)")

        provenance = self.provenance()
        counted_before = dict(self.stats.counters)
        clip_pass = self.clipper.start(
            video_id=video_id, fps=info.fps, width=info.width, height=info.height, provenance=provenance
        )
        methods = ["strefer", "grounded-sam2"] if baseline else ["strefer"]
        masklet_pass = self.generator.start(
            video_id=video_id,
            source=source,
            width=info.decode_width,
            height=info.decode_height,
            entities=entities,
            provenance=provenance,
            methods=methods,
        )
        try:
            with self.stats.timer("decode"):
                decoded = decode_video(
                    info,
                    [*clip_pass.consumers, *masklet_pass.consumers],
                    progress=(lambda n, t: progress(source, n, info.num_frames)) if progress else None,
                )
        except EngineError as exc:
            self.stats.count("videos_rejected")
            rejection = input_rejection(source, "undecodable_video", str(exc), stage="decode")
            dataset.write_rejections(stable_id(source), [rejection])
            return VideoOutcome(source, "rejected", video_id, detail=str(exc), rejections=[rejection])
        self.stats.count("frames_decoded", decoded.frames_decoded)
        rejections: list[RejectionRecord] = []
        if decoded.error:
            # Keep what decoded before the damage, and say so.
            rejections.append(input_rejection(source, "truncated_stream", decoded.error, stage="decode"))

        with self.stats.timer("clip"):
            clips = clip_pass.finish(frames_decoded=decoded.frames_decoded, end_time=decoded.end_time)
        with self.stats.timer("masklets"):
            results: dict[str, MaskletResult] = masklet_pass.finish()
        masklets = [m for r in results.values() for m in r.masklets]
        rejections += [x for r in results.values() for x in r.rejections]

        video = VideoRecord(
            video_id=video_id,
            source=source,
            content_sha256=sha,
            duration_s=round(decoded.end_time, 6) if decoded.frames_decoded else 0.0,
            fps=info.fps,
            num_frames=decoded.frames_decoded,
            width=info.width,
            height=info.height,
            rotation=info.rotation,
            codec=info.codec,
            decode_width=info.decode_width,
            decode_height=info.decode_height,
        )
        render_path = None
        if render:
            from engine.render import render_overlay

            with self.stats.timer("render"), tempfile.TemporaryDirectory() as tmp:
                local = f"{tmp}/{video_id}.mp4"
                frames = render_overlay(info, local, masklets=masklets, clips=clips)
                render_path = dataset.put_file(local, f"renders/{video_id}.mp4")
            self.stats.count("frames_decoded_render", frames)
        with self.stats.timer("write"):
            dataset.write_video(
                video_id,
                {"videos": [video], "clips": clips, "masklets": masklets, "rejections": rejections},
                completion={
                    "source": source,
                    "config_hash": self.config.hash,
                    "engine_version": __version__,
                    # what this video cost: frames decoded, model calls, tracker passes
                    "counters": {k: v - counted_before.get(k, 0) for k, v in self.stats.counters.items()},
                },
            )
        self.stats.count("videos_done")
        return VideoOutcome(
            source,
            "done",
            video_id,
            clips=clips,
            masklets=masklets,
            rejections=rejections,
            start_frames={m: r.start_frame for m, r in results.items()},
            render_path=render_path,
        )


def run_batch(
    pipeline: ClipAndTrack,
    videos: Sequence[str],
    entities: Sequence[EntityRef],
    dataset: Dataset,
    *,
    transient: tuple[type[BaseException], ...] = (),
    **options,
) -> list[VideoOutcome]:
    """Process videos one after another; one failing video never stops the others. Exceptions of the
    `transient` types propagate, so an orchestrator can retry the batch (completed videos are skipped)."""
    import logging

    outcomes = []
    for source in videos:
        try:
            outcomes.append(pipeline.process(source, entities, dataset, **options))
        except transient:
            raise
        except Exception as exc:  # a model fault on one video must not lose the batch
            logging.getLogger(__name__).exception("video %s failed", source)
            pipeline.stats.count("videos_failed")
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            rejection = input_rejection(source, "internal_error", detail, stage="track")
            dataset.write_rejections(stable_id(source), [rejection])
            outcomes.append(VideoOutcome(source, "rejected", detail=detail, rejections=[rejection]))
    return outcomes


def finish_run(dataset: Dataset, stats: Stats, config: EngineConfig) -> dict:
    """Manifest, stats and dataset card after a run."""
    from engine.card import dataset_card

    manifest = dataset.write_manifest(engine_version=__version__)
    dataset.write_json("stats.json", {"config_hash": config.hash, "profile": config.profile, **stats.as_dict()})
    dataset.write_text("README.md", dataset_card(manifest, config))
    return manifest
