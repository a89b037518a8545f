"""Annotator (VideoRefer §3.1.1): a video LLM describes each object twice, its dynamic actions and movement,
then its static appearance and state.

A subject the model says never moves or acts is dropped (`static_only`): the paper filters out static
subjects to keep the captions about change over time. Non-subject objects are kept even when static (a parked
car is still worth a description). Each step sends every object of the video in one batch, the video first in
each message so a backend with prefix caching encodes it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents.analyzer import Failure, Noun
from engine.chat import ask_json, ask_text
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

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        for name in ("dynamic_max_tokens", "static_max_tokens"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be >= 16, got {getattr(self, name)}")
        if not 16 <= self.max_static_chars <= MAX_DESCRIPTION_CHARS:
            raise ValueError(f"max_static_chars must be in [16, {MAX_DESCRIPTION_CHARS}], got {self.max_static_chars}")


@dataclass(frozen=True)
class _Target:
    name: str
    is_subject: bool
    is_expression: bool


class Annotator:
    """`Annotator(vlm).annotate(video, nouns)` -> one `Annotation` per noun, in order."""

    prompts = ("annotator_dynamic", "annotator_static")  # template names, for provenance (prompts.template_hash)

    def __init__(self, vlm: ChatModel, config: AnnotatorConfig | None = None, stats: Stats | None = None) -> None:
        self.vlm = vlm
        self.config = config or AnnotatorConfig()
        self.stats = stats if stats is not None else Stats()

    def annotate(self, video: ChatVideo, nouns: Sequence[Noun]) -> list[Annotation]:
        """Describe each noun's object in `video`; static-only subjects are dropped."""
        targets = [_Target(n.noun, n.is_subject, is_expression=False) for n in nouns]
        return self._run(video, targets, drop_static_subjects=True)

    def annotate_expressions(self, video: ChatVideo, expressions: Sequence[str]) -> list[Annotation]:
        """Describe the objects that referring expressions name (mask sources: MeViS, Ref-YouTube-VOS).

        Nothing is dropped for being static: these masks and expressions are ground truth chosen by people, who
        picked the object on purpose, so a still object is a valid target for object-level QA, and the
        motion filter (meant to keep auto-mined captions about change) has no job to do here.
        """
        targets = [_Target(" ".join(e.split()), True, is_expression=True) for e in expressions]
        return self._run(video, targets, drop_static_subjects=False)

    def _run(self, video: ChatVideo, targets: list[_Target], *, drop_static_subjects: bool) -> list[Annotation]:
        cfg, stats = self.config, self.stats
        if not targets:
            return []
        if not video.frames:
            raise ValueError("the video has no frames: sample at least one frame before annotating")
        for t in targets:
            if not t.name:
                raise ValueError("an object to annotate has an empty name")
        stats.count(f"{AGENT}_objects", len(targets))

        # Step 1: dynamic actions and movement, every object in one batch.
        dynamic_requests = [
            self._request(video, render("annotator_dynamic", object_name=t.name, is_expression=t.is_expression),
                          cfg.dynamic_max_tokens)
            for t in targets
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
            self._request(
                video,
                render("annotator_static", object_name=targets[i].name, is_expression=targets[i].is_expression),
                cfg.static_max_tokens,
            )
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
