"""Analyzer (VideoRefer §3.1.1): an LLM extracts the object nouns from a video's scene-level caption.

Detailed mode lists the subjects and the other concrete objects (things a detector can box); short mode
(§3.1.2, object-level short captions) keeps only the single singular subject noun. All captions of a call go
to the model in one batch.

`Failure` lives here because the Analyzer is the first VideoRefer agent; the Annotator, Reviewer and Refiner
use the same type, so a caller turns any of them into a `rejections` row the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.chat import ask_json
from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest
from engine.stats import Stats
from prompts import render

AGENT = "analyzer"
MAX_NOUN_CHARS = 60
MAX_NOUN_WORDS = 5
MAX_LISTED_NOUNS = 32  # hard bound of the JSON answer; `AnalyzerConfig.max_nouns` keeps fewer

# Words for the scene or the medium, never an object a detector can box; dropped (and counted) if the model
# lists them anyway.
SCENE_WORDS = frozenset(
    {
        "area", "atmosphere", "background", "camera view", "clip", "distance", "environment", "footage",
        "foreground", "frame", "image", "landscape", "location", "moment", "picture", "place", "scene",
        "scenery", "setting", "shot", "surroundings", "time", "video", "view",
    }
)
_ARTICLE = re.compile(r"^(a|an|the|some|one)\s+", re.IGNORECASE)


@dataclass(frozen=True)
class Failure:
    """Why an item produced nothing, with every model answer kept as evidence (first to last).

    `reason` is short and machine-friendly (`invalid_answer`, `no_nouns`, `static_only`, ...); the caller
    writes it, `detail` and `raw_answer` into a `rejections` row.
    """

    reason: str
    detail: str = ""
    raw: tuple[str, ...] = ()

    @property
    def raw_answer(self) -> str | None:
        return self.raw[-1] if self.raw else None


@dataclass(frozen=True)
class Noun:
    noun: str  # a short singular noun phrase, lowercase, no article: "man", "red car"
    is_subject: bool


@dataclass(frozen=True)
class NounsResult:
    caption: str
    nouns: tuple[Noun, ...] = ()
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def subjects(self) -> tuple[Noun, ...]:
        return tuple(n for n in self.nouns if n.is_subject)


@dataclass(frozen=True)
class AnalyzerConfig:
    max_nouns: int = 8  # per caption, subjects kept first
    max_caption_chars: int = 2000  # longer captions are cut before they reach the prompt
    retries: int = 2  # re-asks of an invalid answer, each shown its error
    max_tokens: int = 384

    def __post_init__(self) -> None:
        if not 1 <= self.max_nouns <= MAX_LISTED_NOUNS:
            raise ValueError(f"max_nouns must be in [1, {MAX_LISTED_NOUNS}], got {self.max_nouns}")
        if self.max_caption_chars < 16:
            raise ValueError(f"max_caption_chars must be >= 16, got {self.max_caption_chars}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {self.max_tokens}")


def normalize_noun(text: str) -> str:
    """Lowercase, single spaces, no leading article: "  The Red  car" -> "red car"."""
    text = " ".join(text.split()).lower().strip(" .,;:!?\"'")
    while _ARTICLE.match(text):
        text = _ARTICLE.sub("", text, count=1)
    return text


def _check_noun(value: str) -> str:
    value = normalize_noun(value)
    if not value:
        raise ValueError("a noun is empty")
    if len(value.split()) > MAX_NOUN_WORDS:
        raise ValueError(f"{value!r} is not a short noun phrase: use at most {MAX_NOUN_WORDS} words")
    return value


class NounItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    noun: str = Field(min_length=1, max_length=MAX_NOUN_CHARS)
    is_subject: bool

    @field_validator("noun")
    @classmethod
    def _noun(cls, value: str) -> str:
        return _check_noun(value)


class NounsAnswer(BaseModel):
    """The detailed-mode answer: `{"nouns": [{"noun": "man", "is_subject": true}, ...]}`; may be empty."""

    model_config = ConfigDict(extra="forbid")

    nouns: list[NounItem] = Field(max_length=MAX_LISTED_NOUNS)

    @model_validator(mode="after")
    def _has_subject(self) -> "NounsAnswer":
        if self.nouns and not any(n.is_subject for n in self.nouns):
            raise ValueError("mark the caption's subject (the main actor) with \"is_subject\": true")
        return self


class SubjectAnswer(BaseModel):
    """The short-mode answer: `{"subject": "dog"}`, or `{"subject": ""}` when there is none."""

    model_config = ConfigDict(extra="forbid")

    subject: str = Field(max_length=MAX_NOUN_CHARS)

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        return _check_noun(value) if value.strip() else ""


class Analyzer:
    """`Analyzer(llm).analyze(captions)` -> one `NounsResult` per caption, in order."""

    prompts = ("analyzer", "analyzer_short")  # template names, for provenance (prompts.template_hash)

    def __init__(self, llm: ChatModel, config: AnalyzerConfig | None = None, stats: Stats | None = None) -> None:
        self.llm = llm
        self.config = config or AnalyzerConfig()
        self.stats = stats if stats is not None else Stats()

    def analyze(self, captions: Sequence[str], *, short: bool = False) -> list[NounsResult]:
        cfg, stats = self.config, self.stats
        results: list[NounsResult | None] = [None] * len(captions)
        asked: list[int] = []
        requests: list[ChatRequest] = []
        for i, caption in enumerate(captions):
            stats.count(f"{AGENT}_captions")
            text = " ".join(str(caption).split())
            if not text:
                results[i] = NounsResult(caption, failure=Failure("empty_caption", "the caption is blank"))
                stats.count(f"{AGENT}_failed_empty_caption")
                continue
            if len(text) > cfg.max_caption_chars:
                text = text[: cfg.max_caption_chars]
                stats.count(f"{AGENT}_captions_truncated")
            prompt = (
                render("analyzer_short", caption=text)
                if short
                else render("analyzer", caption=text, max_nouns=cfg.max_nouns)
            )
            asked.append(i)
            requests.append(ChatRequest(messages=(ChatMessage.user(prompt),), max_tokens=cfg.max_tokens))

        schema = SubjectAnswer if short else NounsAnswer
        with stats.timer(AGENT):
            answers = ask_json(self.llm, requests, schema, retries=cfg.retries, stats=stats, agent=AGENT)
        for i, answer in zip(asked, answers):
            caption = captions[i]
            raw = tuple(answer.raw)
            if not answer.ok:
                results[i] = NounsResult(caption, failure=Failure("invalid_answer", answer.error or "", raw))
                stats.count(f"{AGENT}_failed_invalid")
                continue
            if short:
                listed = [Noun(answer.value.subject, True)] if answer.value.subject else []
            else:
                listed = [Noun(n.noun, n.is_subject) for n in answer.value.nouns]
            nouns = self._clean(listed)
            if not nouns:
                results[i] = NounsResult(
                    caption, failure=Failure("no_nouns", "the model found no concrete object in the caption", raw)
                )
                stats.count(f"{AGENT}_failed_no_nouns")
                continue
            results[i] = NounsResult(caption, tuple(nouns))
            stats.count(f"{AGENT}_nouns", len(nouns))
            stats.count(f"{AGENT}_subjects", sum(n.is_subject for n in nouns))
        return results  # type: ignore[return-value]

    def _clean(self, nouns: list[Noun]) -> list[Noun]:
        """Drop scene words, merge case-insensitive duplicates (a subject wins), keep at most `max_nouns`
        with the subjects first; every removal is counted."""
        merged: dict[str, bool] = {}
        for n in nouns:
            if n.noun in SCENE_WORDS:
                self.stats.count(f"{AGENT}_dropped_scene_word")
                continue
            if n.noun in merged:
                self.stats.count(f"{AGENT}_duplicates_removed")
            merged[n.noun] = merged.get(n.noun, False) or n.is_subject
        ordered = [Noun(k, v) for k, v in merged.items() if v] + [Noun(k, v) for k, v in merged.items() if not v]
        if len(ordered) > self.config.max_nouns:
            self.stats.count(f"{AGENT}_truncated_nouns", len(ordered) - self.config.max_nouns)
        return ordered[: self.config.max_nouns]
