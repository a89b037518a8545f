"""Analyzer (VideoRefer §3.1.1): an LLM extracts the object nouns from a video's scene-level caption.

Detailed mode lists the subjects and the other concrete objects (things a detector can box), each with how
many of it the caption says there are, so the Segmentor can track every instance of "two dogs"; short mode
(§3.1.2, object-level short captions) keeps only the single singular subject noun, and a plural subject is a
failure (`plural_subject`): the raw caption becomes the answer about one masklet, which is only true of a
caption about one object. All captions of a call go to the model in one batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.common import Failure
from engine.chat import ask_json
from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest
from engine.stats import Stats
from prompts import render

AGENT = "analyzer"
MAX_NOUN_CHARS = 60
MAX_NOUN_WORDS = 5
MAX_LISTED_NOUNS = 32  # hard bound of the JSON answer; `AnalyzerConfig.max_nouns` keeps fewer
MAX_COUNT = 99  # hard bound of a noun's count in the JSON answer; `AnalyzerConfig.max_instances` keeps fewer

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
class Noun:
    noun: str  # a short singular noun phrase, lowercase, no article: "man", "red car"
    is_subject: bool
    count: int = 1  # how many of it the caption says there are: "two dogs" is ("dog", 2); 0: a plural without a number

    @property
    def plural(self) -> bool:
        return self.count != 1


@dataclass(frozen=True)
class NounsResult:
    caption: str
    nouns: tuple[Noun, ...] = ()
    failure: Failure | None = None
    # Nouns the caption names that cannot be segmented soundly (see `AnalyzerConfig.max_instances`), each with
    # why; the caption's other nouns go on.
    rejected: tuple[tuple[Noun, Failure], ...] = ()

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def subjects(self) -> tuple[Noun, ...]:
        return tuple(n for n in self.nouns if n.is_subject)


@dataclass(frozen=True)
class AnalyzerConfig:
    max_nouns: int = 8  # per caption, subjects kept first
    # Instances of one plural noun tracked and described one by one ("three dogs": three masklets). A plural
    # with more, or without a number ("dogs", "a crowd"), is rejected: the Segmentor takes as many boxes as the
    # caption counts, so without a count a missed or a spurious instance could not be told from a real one.
    max_instances: int = 4
    max_caption_chars: int = 2000  # longer captions are cut before they reach the prompt
    retries: int = 2  # re-asks of an invalid answer, each shown its error
    max_tokens: int = 384

    def __post_init__(self) -> None:
        if not 1 <= self.max_nouns <= MAX_LISTED_NOUNS:
            raise ValueError(f"max_nouns must be in [1, {MAX_LISTED_NOUNS}], got {self.max_nouns}")
        if not 1 <= self.max_instances <= MAX_COUNT:
            raise ValueError(f"max_instances must be in [1, {MAX_COUNT}], got {self.max_instances}")
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
    count: int = Field(ge=0, le=MAX_COUNT)

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
    """The short-mode answer: `{"subject": "dog", "plural": false}`, or `{"subject": "", "plural": false}` when
    there is none; "Two dogs run" is `{"subject": "dog", "plural": true}`."""

    model_config = ConfigDict(extra="forbid")

    subject: str = Field(max_length=MAX_NOUN_CHARS)
    plural: bool

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
                subject = answer.value.subject
                if subject and answer.value.plural:
                    detail = (f"the subject {subject!r} is plural: a short caption is reused as the answer about one "
                              "object's masklet, so only singular subjects are kept (VideoRefer §3.1.2)")
                    results[i] = NounsResult(caption, failure=Failure("plural_subject", detail, raw))
                    stats.count(f"{AGENT}_failed_plural_subject")
                    continue
                listed = [Noun(subject, True)] if subject else []
            else:
                listed = [Noun(n.noun, n.is_subject, n.count) for n in answer.value.nouns]
            nouns = self._clean(listed)
            if not nouns:
                results[i] = NounsResult(
                    caption, failure=Failure("no_nouns", "the model found no concrete object in the caption", raw)
                )
                stats.count(f"{AGENT}_failed_no_nouns")
                continue
            kept, rejected = [], []
            for noun in nouns:
                failure = self._uncountable(noun, raw)
                if failure is None:
                    kept.append(noun)
                else:
                    rejected.append((noun, failure))
            results[i] = NounsResult(caption, tuple(kept), rejected=tuple(rejected))
            stats.count(f"{AGENT}_nouns", len(kept))
            stats.count(f"{AGENT}_subjects", sum(n.is_subject for n in kept))
            stats.count(f"{AGENT}_instances", sum(n.count for n in kept))
        return results  # type: ignore[return-value]

    def _uncountable(self, noun: Noun, raw: tuple[str, ...]) -> Failure | None:
        """Why a plural noun cannot be segmented instance by instance, or None."""
        if noun.count == 0:
            self.stats.count(f"{AGENT}_rejected_uncounted_plural")
            return Failure(
                "uncounted_plural",
                f"the caption names several {noun.noun!r} without saying how many: the Segmentor tracks as many "
                "instances as the caption counts",
                raw,
            )
        if noun.count > self.config.max_instances:
            self.stats.count(f"{AGENT}_rejected_too_many_instances")
            return Failure(
                "too_many_instances",
                f"{noun.count} {noun.noun!r}: more than max_instances={self.config.max_instances} instances",
                raw,
            )
        return None

    def _clean(self, nouns: list[Noun]) -> list[Noun]:
        """Drop scene words, merge case-insensitive duplicates (a subject wins; the larger count wins, and
        "several without a number" wins over any number), keep at most `max_nouns` with the subjects first;
        every removal is counted."""
        merged: dict[str, Noun] = {}
        for n in nouns:
            if n.noun in SCENE_WORDS:
                self.stats.count(f"{AGENT}_dropped_scene_word")
                continue
            seen = merged.get(n.noun)
            if seen is not None:
                self.stats.count(f"{AGENT}_duplicates_removed")
                count = 0 if 0 in (seen.count, n.count) else max(seen.count, n.count)
                n = Noun(n.noun, seen.is_subject or n.is_subject, count)
            merged[n.noun] = n
        ordered = [n for n in merged.values() if n.is_subject] + [n for n in merged.values() if not n.is_subject]
        if len(ordered) > self.config.max_nouns:
            self.stats.count(f"{AGENT}_truncated_nouns", len(ordered) - self.config.max_nouns)
        return ordered[: self.config.max_nouns]
