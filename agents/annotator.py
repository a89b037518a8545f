"""Annotator (VideoRefer §3.1.1): a video LLM describes each object twice, its dynamic actions and movement,
then its static appearance and state.

A subject the model says never moves or acts is dropped (`static_only`): the paper filters out static
subjects to keep the captions about change over time. Non-subject objects are kept even when static (a parked
car is still worth a description). Each step sends every object of the video in one batch, the video first in
each message so a backend with prefix caching encodes it once.

An instance of a counted plural noun ("dog 1 of 2") cannot be told from its look-alikes by name, so it is
shown with its mask's contour drawn on every frame where it has one (`annotate_instances`), as VideoRefer
shows generalist models a region: frames "with mask contours" (§4, VideoRefer-Bench multi-frame mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents.analyzer import Noun
from agents.common import Failure
from engine.chat import ask_json, ask_text
from engine.draw import draw_region
from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest, ChatVideo
from engine.stats import Stats
from prompts import render

AGENT = "annotator"
MAX_DESCRIPTION_CHARS = 2000


class DynamicAnswer(BaseModel):
    """`{"moves_or_acts": true, "description": "..."}`."""

    model_config = ConfigDict(extra="forbid")

    moves_or_acts: bool
    description: str = Field(min_length=1, max_length=MAX_DESCRIPTION_CHARS)

    @field_validator("description")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("description is blank: describe what the object does")
        return value


@dataclass(frozen=True)
class Annotation:
    """The two descriptions of one object. `failure` is set when the object produced nothing usable: the
    dynamic answer never validated (`invalid_dynamic_answer`), the static answer was empty
    (`empty_static_answer`), or a subject was dropped for not moving (`static_only`, its dynamic description
    kept here and the model's answer in `failure.raw`)."""

    noun: str  # the noun, or the referring expression for mask sources
    is_subject: bool
    dynamic: str = ""
    static: str = ""
    moves: bool | None = None  # the model's verdict, None when it gave none
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class AnnotatorConfig:
    retries: int = 2
    dynamic_max_tokens: int = 384
    static_max_tokens: int = 256
    max_static_chars: int = 1500  # longer static answers are cut (counted)
    outline_color: tuple[int, int, int] = (255, 0, 0)  # an instance's contour (`annotate_instances`)
    outline_color_name: str = "red"  # said in the prompt; must name `outline_color`

    def __post_init__(self) -> None:
        if len(self.outline_color) != 3 or any(not 0 <= int(c) <= 255 for c in self.outline_color):
            raise ValueError(f"outline_color must be three ints in [0, 255], got {self.outline_color!r}")
        if not self.outline_color_name.strip():
            raise ValueError("outline_color_name must name the outline color for the prompt, e.g. 'red'")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        for name in ("dynamic_max_tokens", "static_max_tokens"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be >= 16, got {getattr(self, name)}")
        if not 16 <= self.max_static_chars <= MAX_DESCRIPTION_CHARS:
            raise ValueError(f"max_static_chars must be in [16, {MAX_DESCRIPTION_CHARS}], got {self.max_static_chars}")


@dataclass(frozen=True)
class InstanceJob:
    """One instance of a counted plural noun: frames of its video in time order, each with the instance's mask
    (bool, the frame's height and width; empty where it is not seen)."""

    noun: str  # the singular noun, "dog"
    is_subject: bool
    frames: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]
    fps: float  # the rate the frames were sampled at

    def __post_init__(self) -> None:
        if not self.frames or len(self.frames) != len(self.masks):
            raise ValueError(f"an InstanceJob needs frames and one mask per frame, got {len(self.frames)} and {len(self.masks)}")
        for frame, mask in zip(self.frames, self.masks):
            if np.asarray(mask).dtype != bool or np.asarray(mask).shape != frame.shape[:2]:
                raise ValueError("each InstanceJob mask must be boolean with its frame's height and width")
        if not any(np.asarray(m).any() for m in self.masks):
            raise ValueError("an InstanceJob's masks are all empty: nothing would show which object is meant")


@dataclass(frozen=True)
class _Target:
    name: str
    is_subject: bool
    is_expression: bool
    video: ChatVideo
    outline: str | None = None  # the color name of the contour that marks the object, where one does


class Annotator:
    """`Annotator(vlm).annotate(video, nouns)` -> one `Annotation` per noun, in order."""

    prompts = ("annotator_dynamic", "annotator_static")  # template names, for provenance (prompts.template_hash)

    def __init__(self, vlm: ChatModel, config: AnnotatorConfig | None = None, stats: Stats | None = None) -> None:
        self.vlm = vlm
        self.config = config or AnnotatorConfig()
        self.stats = stats if stats is not None else Stats()

    def annotate(self, video: ChatVideo, nouns: Sequence[Noun]) -> list[Annotation]:
        """Describe each noun's object in `video`; static-only subjects are dropped."""
        targets = [_Target(n.noun, n.is_subject, is_expression=False, video=video) for n in nouns]
        return self._run(targets, drop_static_subjects=True)

    def annotate_instances(self, jobs: Sequence[InstanceJob]) -> list[Annotation]:
        """Describe each instance shown by its contour; static-only subjects are dropped, as in `annotate`."""
        cfg = self.config
        targets = []
        for job in jobs:
            marked = tuple(
                draw_region(frame, mask, cfg.outline_color, fill_alpha=0.0) if mask.any() else frame
                for frame, mask in zip(job.frames, job.masks)
            )
            video = ChatVideo(marked, fps=job.fps)
            targets.append(_Target(job.noun, job.is_subject, is_expression=False, video=video,
                                   outline=cfg.outline_color_name))
        return self._run(targets, drop_static_subjects=True)

    def annotate_expressions(self, video: ChatVideo, expressions: Sequence[str]) -> list[Annotation]:
        """Describe the objects that referring expressions name (mask sources: MeViS, Ref-YouTube-VOS).

        Nothing is dropped for being static: these masks and expressions are ground truth chosen by people, who
        picked the object on purpose, so a still object is a valid target for object-level QA, and the
        motion filter (meant to keep auto-mined captions about change) has no job to do here.
        """
        targets = [_Target(" ".join(e.split()), True, is_expression=True, video=video) for e in expressions]
        return self._run(targets, drop_static_subjects=False)

    def _prompt(self, template: str, t: _Target) -> str:
        return render(template, object_name=t.name, is_expression=t.is_expression, outline=t.outline)

    def _run(self, targets: list[_Target], *, drop_static_subjects: bool) -> list[Annotation]:
        cfg, stats = self.config, self.stats
        if not targets:
            return []
        for t in targets:
            if not t.video.frames:
                raise ValueError("the video has no frames: sample at least one frame before annotating")
            if not t.name:
                raise ValueError("an object to annotate has an empty name")
        stats.count(f"{AGENT}_objects", len(targets))

        # Step 1: dynamic actions and movement, every object in one batch.
        dynamic_requests = [
            self._request(t.video, self._prompt("annotator_dynamic", t), cfg.dynamic_max_tokens) for t in targets
        ]
        with stats.timer(f"{AGENT}_dynamic"):
            dynamic = ask_json(self.vlm, dynamic_requests, DynamicAnswer, retries=cfg.retries, stats=stats,
                               agent=f"{AGENT}_dynamic")

        results: list[Annotation | None] = [None] * len(targets)
        survivors: list[int] = []
        for i, (t, answer) in enumerate(zip(targets, dynamic)):
            if not answer.ok:
                failure = Failure("invalid_dynamic_answer", answer.error or "", tuple(answer.raw))
                results[i] = Annotation(t.name, t.is_subject, failure=failure)
                stats.count(f"{AGENT}_failed_invalid")
                continue
            value = answer.value
            if not value.moves_or_acts:
                if t.is_subject and drop_static_subjects:
                    failure = Failure(
                        "static_only", f"the model says the subject {t.name!r} never moves or acts",
                        tuple(answer.raw),
                    )
                    results[i] = Annotation(t.name, True, dynamic=value.description, moves=False, failure=failure)
                    stats.count(f"{AGENT}_dropped_static")
                    continue
                stats.count(f"{AGENT}_kept_static")
            survivors.append(i)

        # Step 2: static appearance and state, only for the objects still kept, in one batch.
        static_requests = [
            self._request(targets[i].video, self._prompt("annotator_static", targets[i]), cfg.static_max_tokens)
            for i in survivors
        ]
        with stats.timer(f"{AGENT}_static"):
            statics = ask_text(self.vlm, static_requests, stats=stats, agent=f"{AGENT}_static")
        for i, raw in zip(survivors, statics):
            t, value = targets[i], dynamic[i].value
            text = " ".join(raw.split())
            if not text:
                failure = Failure("empty_static_answer", "the static description came back empty", (raw,))
                results[i] = Annotation(t.name, t.is_subject, dynamic=value.description,
                                        moves=value.moves_or_acts, failure=failure)
                stats.count(f"{AGENT}_failed_empty")
                continue
            if len(text) > cfg.max_static_chars:
                text = text[: cfg.max_static_chars]
                stats.count(f"{AGENT}_static_truncated")
            results[i] = Annotation(t.name, t.is_subject, dynamic=value.description, static=text,
                                    moves=value.moves_or_acts)
            stats.count(f"{AGENT}_kept")
        return results  # type: ignore[return-value]

    @staticmethod
    def _request(video: ChatVideo, prompt: str, max_tokens: int) -> ChatRequest:
        return ChatRequest(messages=(ChatMessage.user(video, prompt),), max_tokens=max_tokens)
