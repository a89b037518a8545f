"""The VideoRefer engine (VideoRefer §3.1.1-3.1.2) as runner stages over one decode per video.

Data types, chosen per run with `data_types`:
- detailed_caption (caption items): Analyzer (nouns, each with how many the caption counts) -> Annotator
  (dynamic, then static, per noun; static-only subjects dropped) -> Segmentor (box, mask, masklet) -> Reviewer
  (region caption, same-object verdict) -> Refiner (one detailed description). A counted plural ("two dogs")
  is segmented first, one masklet per instance, and each instance is then described with its contour drawn on
  the frames (a name alone cannot tell two dogs apart); a plural without a number is rejected (see
  `AnalyzerConfig.max_instances`). Every sample is written with the Reviewer's verdict and reason; `kept` is
  false for those it dropped, and exporters skip them.
- short_caption (caption items): Analyzer (singular subject only; a plural one is rejected, `plural_subject`)
  -> Segmentor; the raw caption is the answer.
- object_qa (mask datasets: MeViS, Ref-YouTube-VOS): the source's masks are the masklets (ground truth,
  never re-segmented); Annotator on each referring expression -> Refiner writes basic, reasoning and future
  questions. An expression that refers to several objects (MeViS) is one region of the Refiner's prompt, which
  is told how many objects it holds so questions about it are in the plural, and becomes one `<region>` token
  per object in the question, joined with "and", each with its own masklet.

Samples of an item with a window (a caption manifest row with start/end) carry that window.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from agents.analyzer import Analyzer, AnalyzerConfig, Noun, NounsResult
from agents.annotator import Annotation, Annotator, AnnotatorConfig, InstanceJob
from agents.common import Failure
from agents.refiner import QAJob, QARegion, Refiner, RefinerConfig
from agents.reviewer import INVALID_JUDGE, Reviewer, ReviewerConfig, ReviewJob
from agents.segmentor import Segmentor, SegmentorConfig
from engine import masks
from engine.config import EngineConfig
from engine.decode import DecodeLimits, DecodeResult
from engine.errors import transient_faults
from engine.frame_store import TrackFrames
from engine.ids import stable_id
from engine.models.interfaces import ChatVideo
from engine.runner import FunctionPass, Outputs, Pipeline, VideoContext
from engine.stats import Stats
from engine.storage import Dataset
from flows.pipelines import funnel, item_window
from flows.registry import Deployment, Option, PipelineSpec
from flows.source_objects import keyed_rejection, source_masklets
from schemas import MaskletRecord, Review, SampleRecord, Turn, Window, WorkItem

NAME = "videorefer"
DATA_TYPES = ("detailed_caption", "short_caption", "object_qa")
# Faults of the model server, not of an item: never retried item by item (the orchestrator retries the batch).
REVIEWER_DROP_CODES = (INVALID_JUDGE, "empty_mask", "empty_region_caption")  # see agents/reviewer.py

# Human turns of the caption samples; one is picked per sample by its id, so reruns agree.
DETAILED_QUESTIONS = (
    "Please give a detailed description of the <region> in the video.",
    "Describe the <region> in the video in detail, covering its appearance and what it does.",
    "What does the <region> look like, and what does it do over the course of the video?",
)
SHORT_QUESTIONS = (
    "Briefly describe the <region> in the video.",
    "What is the <region> doing in the video? Answer in one sentence.",
)


@dataclass(frozen=True)
class VideoReferConfig:
    annotator_frames: int = 16  # frames of the item shown to the video LLM
    frame_max_side: int = 768  # long side of those frames
    sample_frames: int = 16  # mask frames per region a sample (and its export) carries
    refine_dropped: bool = False  # also refine captions the Reviewer dropped (costs an LLM call each)

    def __post_init__(self) -> None:
        if self.annotator_frames < 1 or self.sample_frames < 1:
            raise ValueError("annotator_frames and sample_frames must be >= 1")
        if self.frame_max_side < 28:
            raise ValueError(f"frame_max_side must be >= 28, got {self.frame_max_side}")


SETTINGS = {
    "decode": DecodeLimits,
    "analyzer": AnalyzerConfig,
    "annotator": AnnotatorConfig,
    "segmentor": SegmentorConfig,
    "reviewer": ReviewerConfig,
    "refiner": RefinerConfig,
    "videorefer": VideoReferConfig,
}

SPEC = PipelineSpec(
    name=NAME,
    flow="build-videorefer-700k",
    entrypoint="build_videorefer_flow",
    summary="VideoRefer's multi-agent engine (§3.1: Analyzer, Annotator, Segmentor, Reviewer, Refiner) over caption "
    "manifests (detailed and short captions) and mask datasets in the MeViS or Ref-YouTube-VOS layout (object-level QA).",
    roles={"llm": "chat", "vlm": "chat", "region_captioner": "chat", "refiner": "chat", "detector": "detector",
           "box_segmenter": "box_segmenter", "tracker": "tracker"},
    settings=SETTINGS,
    options=(
        Option("data_types", str, DATA_TYPES, "Data types to make, repeatable; default: all three.", repeatable=True,
               choices=DATA_TYPES, flag="--data-type", short="-t"),
    ),
    data_types=DATA_TYPES,
    export_formats=("videorefer", "hf"),
    deployments=(
        Deployment("default", "default", "gpu", 8, "VideoRefer's multi-agent engine (Analyzer, Annotator, Segmentor, "
                   "Reviewer, Refiner) on GPU workers.", 4),
        Deployment("tiny", "tiny", "cpu", 4, "The VideoRefer flow with random tiny models on CPU; outputs are meaningless."),
    ),
    funnel=("analyzer", "annotator", "segmentor", "reviewer", "refiner"),
)


def roles(config: EngineConfig, **_: Any) -> dict[str, str]:
    return {
        "llm": "chat",  # Analyzer, Reviewer's judge
        "vlm": "chat",  # Annotator
        "region_captioner": "chat",  # Reviewer's region captions
        "refiner": "chat",
        "detector": "detector",
        "box_segmenter": "box_segmenter",
        "tracker": "tracker",
    }


def prompt_names(config: EngineConfig, **_: Any) -> list[str]:
    """Prompt templates this pipeline renders (their hashes are in its run hash)."""
    return [*Analyzer.prompts, *Annotator.prompts, *Reviewer.prompts, *Refiner.prompts]


def check_data_types(data_types: Sequence[str]) -> None:
    unknown = sorted(set(data_types) - set(DATA_TYPES))
    if unknown or not data_types:
        raise ValueError(f"data types must be among {', '.join(DATA_TYPES)}; got {list(data_types)}")


@dataclass
class _Work:
    """What one video carries from stage to stage. Caption objects are keyed by name: the noun, or an
    instance's "dog 1 of 2" (`agents.segmentor.instance_name`)."""

    nouns: NounsResult | None = None  # detailed captions
    subject: NounsResult | None = None  # short captions
    object_qa: bool = False  # object-level QA from the source's masks and expressions
    video: ChatVideo | None = None
    frames_shown: list[int] = field(default_factory=list)
    annotations: dict[str, Annotation] = field(default_factory=dict)  # name -> the Annotator's descriptions
    expression_annotations: list[Annotation] = field(default_factory=list)
    track: TrackFrames | None = None
    masklets: dict[str, MaskletRecord] = field(default_factory=dict)  # name -> masklet (Segmentor)
    instances: dict[str, Noun] = field(default_factory=dict)  # instance name -> its plural noun
    instance_frames: dict[str, list[int]] = field(default_factory=dict)  # instance name -> frames shown
    source_masklets: dict[str, MaskletRecord] = field(default_factory=dict)  # object id -> masklet (ground truth)
    reviews: dict[str, Review] = field(default_factory=dict)  # name -> verdict

    @property
    def singular_nouns(self) -> list[Noun]:
        return [n for n in self.nouns.nouns if not n.plural] if self.nouns and self.nouns.ok else []

    @property
    def plural_nouns(self) -> list[Noun]:
        return [n for n in self.nouns.nouns if n.plural] if self.nouns and self.nouns.ok else []

    @property
    def short_subjects(self) -> list[Noun]:
        return list(self.subject.subjects) if self.subject and self.subject.ok else []


def _work(ctx: VideoContext) -> _Work:
    return ctx.state.setdefault(NAME, _Work())


class AnalyzerStage:
    """Nouns of every caption of the batch in one LLM call per mode (`prepare`)."""

    name = "analyzer"

    def __init__(self, analyzer: Analyzer, data_types: Sequence[str], stats: Stats) -> None:
        self.analyzer, self.data_types, self.stats = analyzer, set(data_types), stats
        # Keyed by item (its key includes the caption: two rows of a manifest can caption one video differently).
        self._detailed: dict[str, NounsResult] = {}
        self._short: dict[str, NounsResult] = {}
        self._faults: dict[str, Exception] = {}  # the model fault a caption caused, raised when its item starts

    def prepare(self, items: Sequence[WorkItem]) -> None:
        captioned = [i for i in items if i.caption]
        if "detailed_caption" in self.data_types:
            self._analyze(captioned, self._detailed, short=False)
        if "short_caption" in self.data_types:
            self._analyze(captioned, self._short, short=True)

    def _analyze(self, items: list[WorkItem], results: dict[str, NounsResult], *, short: bool) -> None:
        """One call for every caption. A fault of that call is asked again caption by caption, so one bad item
        cannot lose the batch: an item that still fails keeps its own fault, raised when the runner starts it
        (an `internal_error` row for that item only). Faults of the model server are not retried here."""
        items = [i for i in items if i.key not in self._faults]
        if not items:
            return
        try:
            results.update(zip((i.key for i in items), self.analyzer.analyze([i.caption or "" for i in items], short=short)))
            return
        except transient_faults():
            raise  # the orchestrator retries the batch; committed items are skipped then
        except Exception as exc:
            if len(items) == 1:
                self._faults[items[0].key] = exc
                return
            self.stats.count(f"{self.name}_batch_faults")
        for item in items:
            try:
                (results[item.key],) = self.analyzer.analyze([item.caption or ""], short=short)
            except transient_faults():
                raise
            except Exception as exc:
                self._faults[item.key] = exc

    def start(self, ctx: VideoContext) -> FunctionPass | None:
        work = _work(ctx)
        key = ctx.item.key
        work.nouns = self._detailed.pop(key, None)
        work.subject = _singular_in_both(self._short.pop(key, None), work.nouns)
        fault = self._faults.pop(key, None)
        if fault is not None:
            raise fault
        results = [r for r in (work.nouns, work.subject) if r is not None]
        work.object_qa = "object_qa" in self.data_types and bool(ctx.item.objects and ctx.item.expressions)
        if not results and not work.object_qa:
            wanted = ", ".join(sorted(self.data_types))
            detail = f"nothing in the item for the data types {wanted}: "
            detail += (
                "captions give detailed_caption and short_caption samples; objects with masks and referring "
                "expressions give object_qa samples"
            )
            rejection = ctx.rejection(self.name, "nothing_to_annotate", detail)
            return FunctionPass(lambda decoded, so_far: Outputs(rejections=[rejection]))
        dropped = Counter(r.failure.reason for r in results if r.failure)
        funnel(self.stats, self.name, len(results), len(results) - sum(dropped.values()), dropped)
        modes = [m for m, r in (("detailed", work.nouns), ("short", work.subject)) if r is not None]
        rejections = [
            keyed_rejection(ctx, self.name, r.failure.reason, f"{mode} caption {r.caption[:200]!r}: {r.failure.detail}",
                       key=mode, raw=r.failure.raw_answer)
            for mode, r in zip(modes, results)
            if r.failure
        ]
        rejections += [
            ctx.rejection(self.name, failure.reason, f"detailed caption {work.nouns.caption[:200]!r}: {failure.detail}",
                          expression=noun.noun, raw=failure.raw_answer)
            for noun, failure in (work.nouns.rejected if work.nouns else ())
        ]
        return FunctionPass(lambda decoded, so_far: Outputs(rejections=rejections)) if rejections else None


def _singular_in_both(short: NounsResult | None, detailed: NounsResult | None) -> NounsResult | None:
    """The short analysis, or a `plural_subject` failure where the detailed analysis of the same caption counts
    its subject as several (two answers of the model that disagree: the short sample would be about one of
    them while its caption is about all)."""
    if short is None or not short.ok or detailed is None:
        return short
    counted = {n.noun: n.count for n in detailed.nouns} | {n.noun: n.count for n, _ in detailed.rejected}
    plural = [n.noun for n in short.subjects if counted.get(n.noun, 1) != 1]
    if not plural:
        return short
    detail = (f"the detailed analysis of the caption counts {counted[plural[0]] or 'several'} {plural[0]!r}: a short "
              "caption is reused as the answer about one object's masklet (VideoRefer §3.1.2)")
    return NounsResult(short.caption, failure=Failure("plural_subject", detail))


class AnnotatorStage:
    """Dynamic then static descriptions of each noun (or each referring expression of a mask source)."""

    name = "annotator"

    def __init__(self, annotator: Annotator, config: VideoReferConfig, stats: Stats) -> None:
        self.annotator, self.config, self.stats = annotator, config, stats

    def start(self, ctx: VideoContext) -> FunctionPass | None:
        work = _work(ctx)
        nouns = work.singular_nouns  # instances of plural nouns are described after the Segmentor tells them apart
        expressions = [e.expression for e in ctx.item.expressions] if work.object_qa else []
        if not nouns and not expressions:
            return None
        keyframes = ctx.keyframes(count=self.config.annotator_frames, max_side=self.config.frame_max_side)

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            work.video = keyframes.chat_video()
            if work.video is None:
                return Outputs(rejections=[ctx.rejection(self.name, "no_frames", "no frames were decoded")])
            work.frames_shown = sorted(keyframes.frames)
            rejections = []
            if nouns:
                annotations = self.annotator.annotate(work.video, nouns)
                work.annotations.update((a.noun, a) for a in annotations)
                rejections += self._rejections(ctx, annotations)
            if expressions:
                work.expression_annotations = self.annotator.annotate_expressions(work.video, expressions)
                rejections += self._rejections(ctx, work.expression_annotations)
            return Outputs(rejections=rejections)

        return FunctionPass(finish)

    def _rejections(self, ctx: VideoContext, annotations: list[Annotation]) -> list:
        return annotation_rejections(ctx, self.stats, annotations, [a.noun for a in annotations])


def annotation_rejections(ctx: VideoContext, stats: Stats, annotations: list[Annotation], names: list[str]) -> list:
    """The Annotator's funnel and a rejection row per failed annotation, under its object's name (the noun,
    the expression, or an instance's name)."""
    dropped = Counter(a.failure.reason for a in annotations if a.failure)
    funnel(stats, "annotator", len(annotations), len(annotations) - sum(dropped.values()), dropped)
    return [
        ctx.rejection("annotator", a.failure.reason, a.failure.detail, expression=name, raw=a.failure.raw_answer)
        for name, a in zip(names, annotations)
        if a.failure
    ]


class SegmentorStage:
    """Masklets: the Segmentor's for caption nouns; the source's own masks for mask datasets."""

    name = "segmentor"

    def __init__(self, segmentor: Segmentor, stats: Stats) -> None:
        self.segmentor, self.stats = segmentor, stats

    def start(self, ctx: VideoContext) -> FunctionPass | None:
        work = _work(ctx)
        candidates = work.singular_nouns + work.plural_nouns + work.short_subjects
        if not candidates and not work.object_qa:
            return None
        cfg = self.segmentor.config
        if candidates:
            work.track = ctx.track_frames(
                size=self.segmentor.tracker.image_size, fps=cfg.track_fps, quality=cfg.frame_jpeg_quality,
                memory_mb=cfg.frame_memory_mb,
            )

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            out = Outputs()
            if work.object_qa:
                out.extend(self._source_masklets(ctx, work))
            # Singular nouns the Annotator kept, the short-caption subject, and every counted plural (its
            # instances are described once the Segmentor has told them apart).
            plural = {n.noun: n for n in work.plural_nouns}
            wanted = [a.noun for a in work.annotations.values() if a.ok]
            wanted += [n.noun for n in work.short_subjects] + list(plural)
            wanted = list(dict.fromkeys(wanted))
            if wanted and work.track is not None:
                results = self.segmentor.segment(
                    work.track, wanted, video_id=ctx.video_id, width=ctx.info.decode_width,
                    height=ctx.info.decode_height, provenance=ctx.provenance,
                    counts={noun: n.count for noun, n in plural.items()},
                )
                dropped = Counter(r.reason for r in results if r.masklet is None)
                funnel(self.stats, self.name, len(results), len(results) - sum(dropped.values()), dropped)
                for r in results:
                    if r.masklet is None:
                        out.rejections.append(ctx.rejection(self.name, r.reason or "no_masklet", r.detail, expression=r.name))
                        continue
                    work.masklets[r.name] = r.masklet
                    out.masklets.append(r.masklet)
                    if r.instance is not None:
                        work.instances[r.name] = plural[r.noun]
            return out

        return FunctionPass(finish)

    def _source_masklets(self, ctx: VideoContext, work: _Work) -> Outputs:
        """The source's masks as masklets, copied as they are (ground truth; see flows/source_objects.py)."""
        made = source_masklets(ctx, self.name, self.stats)
        work.source_masklets = made.masklets
        return made.outputs


class InstanceAnnotatorStage:
    """The Annotator on each instance of a counted plural noun, shown with its contour on frames where its
    masklet has a mask: the name alone ("dog") would not say which of the two dogs to describe."""

    name = "annotator"

    def __init__(self, annotator: Annotator, config: VideoReferConfig, stats: Stats) -> None:
        self.annotator, self.config, self.stats = annotator, config, stats

    def start(self, ctx: VideoContext) -> FunctionPass | None:
        work = _work(ctx)
        if not work.plural_nouns:
            return None

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            if not work.instances or work.track is None:
                return Outputs()
            names = list(work.instances)
            jobs = [self._job(ctx, work, name) for name in names]
            annotations = self.annotator.annotate_instances(jobs)
            work.annotations.update(zip(names, annotations))
            return Outputs(rejections=annotation_rejections(ctx, self.stats, annotations, names))

        return FunctionPass(finish)

    def _job(self, ctx: VideoContext, work: _Work, name: str) -> InstanceJob:
        """Up to `annotator_frames` tracked frames spread over those where the instance has a mask, with its
        mask, at most `frame_max_side` on the long side."""
        import cv2

        track, masklet, noun = work.track, work.masklets[name], work.instances[name]
        position = {index: p for p, index in enumerate(track.frame_index)}
        tracked = [f for f in masklet.frames if f.frame_index in position]
        picks = np.linspace(0, len(tracked) - 1, num=min(self.config.annotator_frames, len(tracked)))
        chosen = [tracked[i] for i in sorted({int(round(x)) for x in picks})]
        width, height = ctx.info.decode_width, ctx.info.decode_height
        scale = min(1.0, self.config.frame_max_side / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        frames, shown_masks = [], []
        for f in chosen:
            frames.append(cv2.resize(track.store.resized(position[f.frame_index], width, height), size,
                                     interpolation=cv2.INTER_AREA))
            mask = masks.decode(f.rle).astype(np.uint8)
            shown_masks.append(cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST) > 0)
        span = max(chosen[-1].timestamp - chosen[0].timestamp, 1e-6)
        work.instance_frames[name] = [f.frame_index for f in chosen]
        return InstanceJob(noun.noun, noun.is_subject, tuple(frames), tuple(shown_masks),
                           fps=max(len(chosen) - 1, 1) / span)


class ReviewerStage:
    """Is the masklet the object the Annotator described? One region caption and one verdict per noun."""

    name = "reviewer"

    def __init__(self, reviewer: Reviewer, stats: Stats) -> None:
        self.reviewer, self.stats = reviewer, stats

    def start(self, ctx: VideoContext) -> FunctionPass | None:
        work = _work(ctx)
        if not (work.nouns and work.nouns.ok):
            return None

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            jobs, names = [], []
            for name, a in work.annotations.items():
                masklet = work.masklets.get(name)
                if not a.ok or masklet is None or work.track is None:
                    continue
                jobs.append(self._job(ctx, work.track, masklet, a))
                names.append(name)
            if jobs:
                reviews = self.reviewer.review(jobs)
                work.reviews.update(zip(names, reviews))
                dropped = Counter(_drop_reason(r) for r in reviews if not r.verdict)
                funnel(self.stats, self.name, len(reviews), len(reviews) - sum(dropped.values()), dropped)
            return Outputs()

        return FunctionPass(finish)

    @staticmethod
    def _job(ctx: VideoContext, track: TrackFrames, masklet: MaskletRecord, annotation: Annotation) -> ReviewJob:
        """The frame where the region is largest, so the captioner sees the object best."""
        best = max(masklet.frames, key=lambda f: masks.area(f.rle))
        position = track.frame_index.index(best.frame_index)
        image = track.store.resized(position, ctx.info.decode_width, ctx.info.decode_height)
        description = f"{annotation.static} {annotation.dynamic}".strip()
        return ReviewJob(image, masks.decode(best.rle), best.frame_index, annotation.noun, description)


def _drop_reason(review: Review) -> str:
    """The Reviewer's own reason code where it dropped without a verdict (`invalid_judge_answer: ...`,
    `empty_mask: ...`, `empty_region_caption: ...`), else `not_same_object` (the judge's verdict)."""
    code = review.reason.split(":", 1)[0]
    return code if code in REVIEWER_DROP_CODES else "not_same_object"


class RefinerStage:
    """Samples: refined detailed captions, short captions, and object-level QA."""

    name = "refiner"

    def __init__(self, refiner: Refiner, config: VideoReferConfig, data_types: Sequence[str], stats: Stats) -> None:
        self.refiner, self.config, self.data_types, self.stats = refiner, config, set(data_types), stats

    def start(self, ctx: VideoContext) -> FunctionPass:
        work = _work(ctx)

        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            out = Outputs()
            window = item_window(ctx, decoded)
            out.extend(self._detailed(ctx, work, window))
            out.extend(self._short(ctx, work, window))
            out.extend(self._qa(ctx, work, window))
            for sample in out.samples:
                self.stats.count(f"samples.{sample.data_type}.{'kept' if sample.kept else 'dropped'}")
            return out

        return FunctionPass(finish)

    def _sample(self, ctx: VideoContext, data_type: str, key: Any, question: str, answer: str,
                masklets: list[MaskletRecord], *, window: Window | None, task: str | None = None, kept: bool = True,
                review: Review | None = None, questions: Sequence[str] = (),
                shown: Sequence[int] | None = None) -> SampleRecord:
        # The caption is part of the id: two captions of one video give two samples, never one id twice.
        sample_id = stable_id(ctx.video_id, ctx.provenance.config_hash, data_type, task, key, ctx.item.caption)
        if questions:  # a phrasing picked by the sample's id: deterministic, varied across samples
            question = questions[int(sample_id, 16) % len(questions)]
        return SampleRecord(
            sample_id=sample_id,
            video_id=ctx.video_id,
            source=ctx.item.source,
            pipeline=NAME,
            data_type=data_type,
            task=task,
            labels={"frames_shown": ",".join(map(str, work_frames(ctx) if shown is None else shown))},
            conversation=[Turn(role="human", value=f"<video>\n{question}"), Turn(role="gpt", value=answer)],
            masklet_ids=[m.masklet_id for m in masklets],
            frames=self._frames(masklets),
            window=window,
            refers_to=["mask"] if "<region>" in question else [],
            kept=kept,
            review=review,
            provenance=ctx.provenance,
        )

    def _frames(self, masklets: list[MaskletRecord]) -> list[int]:
        """Up to `sample_frames` mask frames spread over the regions' masklets."""
        indexes = sorted({f.frame_index for m in masklets for f in m.frames})
        if len(indexes) <= self.config.sample_frames:
            return indexes
        picks = np.linspace(0, len(indexes) - 1, num=self.config.sample_frames)
        return sorted({indexes[int(round(p))] for p in picks})

    def _detailed(self, ctx: VideoContext, work: _Work, window: Window | None) -> Outputs:
        reviewed = [(name, a) for name, a in work.annotations.items() if a.ok and name in work.reviews]
        to_refine = [(name, a) for name, a in reviewed if work.reviews[name].verdict or self.config.refine_dropped]
        texts = self.refiner.merge([(a.noun, a.dynamic, a.static) for _, a in to_refine]) if to_refine else []
        merged = dict(zip((name for name, _ in to_refine), texts))
        out = Outputs()
        failed = Counter()
        for name, a in reviewed:
            review = work.reviews[name]
            text = merged.get(name)
            if text is not None and not isinstance(text, str):  # a Failure
                failed[text.reason] += 1
                out.rejections.append(ctx.rejection(self.name, text.reason, text.detail, expression=name, raw=text.raw_answer))
                continue
            # A dropped caption that was not refined keeps the Annotator's two descriptions, as evidence.
            answer = text if text is not None else f"{a.static} {a.dynamic}".strip()
            out.samples.append(
                self._sample(ctx, "detailed_caption", name, "", answer, [work.masklets[name]], window=window,
                             kept=review.verdict, review=review, questions=DETAILED_QUESTIONS,
                             shown=work.instance_frames.get(name))
            )
        if to_refine:
            funnel(self.stats, self.name, len(to_refine), len(to_refine) - sum(failed.values()), failed)
        return out

    def _short(self, ctx: VideoContext, work: _Work, window: Window | None) -> Outputs:
        out = Outputs()
        for noun in work.short_subjects:
            masklet = work.masklets.get(noun.noun)
            if masklet is not None:
                out.samples.append(self._sample(ctx, "short_caption", noun.noun, "", work.subject.caption, [masklet],
                                                window=window, questions=SHORT_QUESTIONS))
        return out

    def _qa(self, ctx: VideoContext, work: _Work, window: Window | None) -> Outputs:
        out = Outputs()
        if "object_qa" not in self.data_types or not work.expression_annotations:
            return out
        regions, objects = [], []  # region index -> (expression, masklets of its objects)
        for expression, annotation in zip(ctx.item.expressions, work.expression_annotations):
            region_masklets = [work.source_masklets[o] for o in expression.object_ids if o in work.source_masklets]
            if not annotation.ok or not region_masklets:
                continue
            index = len(regions)
            description = f"{annotation.static} {annotation.dynamic}".strip()
            regions.append(QARegion(index, expression.expression, description, len(region_masklets)))
            objects.append(region_masklets)
        if not regions:
            return out
        (result,) = self.refiner.write_qa([QAJob(tuple(regions[: self.refiner.config.max_regions]))])
        if not isinstance(result, list):
            funnel(self.stats, self.name, 1, 0, Counter({result.reason: 1}))
            out.rejections.append(ctx.rejection(self.name, result.reason, result.detail, raw=result.raw_answer))
            return out
        funnel(self.stats, self.name, 1, 1)
        for n, pair in enumerate(result):
            question, used = _with_region_tokens(pair.question, objects)
            answer = _named(pair.answer, regions)
            out.samples.append(self._sample(ctx, "object_qa", n, question, answer, used, window=window, task=pair.kind))
        return out


def work_frames(ctx: VideoContext) -> list[int]:
    return _work(ctx).frames_shown


def _with_region_tokens(text: str, objects: list[list[MaskletRecord]]) -> tuple[str, list[MaskletRecord]]:
    """`<regionN>` -> one `<region>` per object of region N ("<region> and <region>"), and the masklets in
    token order."""
    import re

    used: list[MaskletRecord] = []

    def swap(match: "re.Match[str]") -> str:
        region = objects[int(match.group(1))]
        used.extend(region)
        return " and ".join(["<region>"] * len(region))

    return re.sub(r"<region(\d+)>", swap, text), used


# Words a noun phrase can start with that take no "the" before them ("both shapes", not "the both shapes").
_DETERMINER = (
    r"(?i)^(?:the|a|an|this|that|these|those|his|her|its|their|my|your|our|both|all|each|every|either|neither"
    r"|some|any|no|several|many|few|one|another)\b"
)


def _named(text: str, regions: list[QARegion]) -> str:
    """Answers carry no `<region>` tokens (training code reads regions from the question): name them by their
    expression, with "the" unless it starts with a determiner already ("the two boxes", not "the the two
    boxes"; "both shapes", not "the both shapes"), capitalised where it starts a sentence."""
    import re

    def name(match: "re.Match[str]") -> str:
        n = int(match.group(1))
        expression = regions[n].name if n < len(regions) else ""
        phrase = (expression if re.match(_DETERMINER, expression) else f"the {expression}") if expression else "it"
        before = text[: match.start()].rstrip()
        first = phrase[0].upper() if not before or before[-1] in ".!?" else phrase[0].lower()
        return first + phrase[1:]

    return re.sub(r"<region(\d+)>", name, text)


def build(
    config: EngineConfig,
    backends: dict[str, Any],
    *,
    stats: Stats,
    dataset: Dataset,
    data_types: Sequence[str] = DATA_TYPES,
) -> Pipeline:
    from prompts import template_hash

    check_data_types(data_types)
    section = config.section
    cfg = VideoReferConfig(**section("videorefer"))
    analyzer = Analyzer(backends["llm"], AnalyzerConfig(**section("analyzer")), stats)
    annotator = Annotator(backends["vlm"], AnnotatorConfig(**section("annotator")), stats)
    segmentor = Segmentor(
        detector=backends["detector"], box_segmenter=backends["box_segmenter"], tracker=backends["tracker"],
        config=SegmentorConfig(**section("segmentor")), stats=stats,
    )
    reviewer = Reviewer(backends["region_captioner"], backends["llm"], ReviewerConfig(**section("reviewer")), stats)
    refiner = Refiner(backends["refiner"], RefinerConfig(**section("refiner")), stats)
    return Pipeline(
        name=NAME,
        stages=[
            AnalyzerStage(analyzer, data_types, stats),
            AnnotatorStage(annotator, cfg, stats),
            SegmentorStage(segmentor, stats),
            InstanceAnnotatorStage(annotator, cfg, stats),
            ReviewerStage(reviewer, stats),
            RefinerStage(refiner, cfg, data_types, stats),
        ],
        config=config,
        models={role: getattr(b, "model_id", "?") for role, b in backends.items()},
        prompt_hashes={p: template_hash(p) for p in prompt_names(config)},
        options={"data_types": sorted(data_types)},
    )
