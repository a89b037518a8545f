"""Refiner (VideoRefer §3.1.1-3.1.2): an LLM merges an object's two descriptions into one, and writes
region-referring QA pairs for object-level QA data.

`merge` turns (noun or expression, dynamic description, static description) into one detailed description:
plain text, third person, starting with the object, each fact once, nothing that is not in the inputs.
`write_qa` writes basic, reasoning and future-prediction questions about the regions of one video; questions
and answers refer to regions only as `<region0>`, `<region1>`, ... placeholders, which `to_region_tokens`
turns into the `<region>` tokens of the training formats, with the region of each token in order.

A region may hold several objects (a MeViS expression such as "the two boxes" refers to two masks, and its
placeholder becomes "<region> and <region>"): the prompt says how many each region holds, and `check_qa`
rejects a verb of the wrong number beside a placeholder ("What is <region0> doing?" about two boxes).

Every answer is validated; an invalid one is asked again with its error (all of a round in one batch), and
after `retries` it becomes a `Failure` that keeps every raw answer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, NamedTuple, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.common import Failure
from engine.chat import REPAIR_PROMPT, ask_checked, ask_json, ask_text, schema_of
from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest
from engine.stats import Stats
from prompts import render

AGENT = "refiner"
KINDS = ("basic", "reasoning", "future")
Kind = Literal["basic", "reasoning", "future"]
MAX_QUESTION_CHARS = 1000  # hard bounds of the schema; the config's limits are tighter
MAX_ANSWER_CHARS = 2000
MAX_DESCRIPTION_CHARS = 4000
MAX_REGIONS = 32
MAX_PAIRS = 24

PLACEHOLDER = re.compile(r"<region(0|[1-9][0-9]*)>")
# Anything that looks like a region reference but is not exactly <regionN>: <region>, <Region 1>, <region_1>,
# </region0>, region1, region 2.
_MALFORMED = re.compile(r"(?i)<\s*/?\s*region[^>]*>|\bregion\s*_?\d+\b")
_META = re.compile(
    r"(?i)\b(?:the|this|that|these|both|two)\s+(?:videos?|clips?|footage|captions?|descriptions?|annotations?)\b"
)
_REFUSAL = re.compile(r"(?i)\bas an ai\b|\bi'?m sorry\b|\bi am sorry\b|\bi can ?not\b|\bi can'?t\b")
_LIST_LINE = re.compile(r"(?m)^\s*(?:[-*\u2022#]|\d+[.)])\s")
_ARTICLE = r"(?:(?:the|a|an)\s+)?"
# Placeholders joined into one noun phrase ("<region0>, <region1> and <region2>"): its grammatical number.
_JOINED = re.compile(r"<region\d+>(?:(?:\s*,\s*(?:and\s+)?|\s+and\s+)<region\d+>)*")
_SINGULAR_VERBS = frozenset("is was does has isn't wasn't doesn't hasn't what's where's who's how's".split())
_PLURAL_VERBS = frozenset("are were do have aren't weren't don't haven't".split())
# After a subject "do" and "have" are as often a bare infinitive ("What will the dog <region0> do?"): only
# these forms are plural for sure there.
_PLURAL_AFTER = frozenset("are were aren't weren't".split())
# Auxiliaries whose number does not change ("Where will <region0> go?"): before a placeholder they are the
# verb of its question, and the word after it is a bare infinitive ("do", "have") of either number.
_NUMBERLESS_AUX = frozenset("did will would can could should may might must shall had".split())
# Before these a joined phrase is not the subject ("Which of <region0> and <region1> is faster?"), or not
# the whole subject ("the man and <region0> are").
_NOT_SUBJECT = frozenset("of between among from than with to and or nor".split())
_WORD = re.compile(r"[A-Za-z']+")


def placeholders(text: str) -> list[int]:
    """The region index of every `<regionN>` placeholder in `text`, in order, repeats included."""
    return [int(m) for m in PLACEHOLDER.findall(text)]


def to_region_tokens(text: str) -> tuple[str, list[int]]:
    """Replace each `<regionN>` placeholder with `<region>`; also return N for each token in order (repeats
    included), so the caller lists the matching masklet id per `<region>` token (`SampleRecord.masklet_ids`).

    >>> to_region_tokens("Is <region2> closer to <region0> than <region2> is?")
    ('Is <region> closer to <region> than <region> is?', [2, 0, 2])
    """
    return PLACEHOLDER.sub("<region>", text), placeholders(text)


class QAPair(BaseModel):
    """One question-answer pair about marked regions.

    `regions` is the ordered list of distinct placeholders of the question (the order `<region>` tokens first
    appear in it). An answer may point back at a region its question shows, by the same placeholder; it may
    not introduce another one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    answer: str = Field(min_length=1, max_length=MAX_ANSWER_CHARS)
    regions: list[int] = Field(min_length=1, max_length=MAX_REGIONS)

    @model_validator(mode="after")
    def _placeholders(self) -> "QAPair":
        for name, text in (("question", self.question), ("answer", self.answer)):
            if not text.strip():
                raise ValueError(f"{name} is blank")
            bad = _MALFORMED.search(PLACEHOLDER.sub(" ", text))
            if bad:
                raise ValueError(
                    f"{name} writes a region as {bad.group(0)!r}: write it exactly as <regionN>, e.g. <region0>"
                )
        used = list(dict.fromkeys(placeholders(self.question)))
        if not used:
            raise ValueError("the question must refer to at least one region by its placeholder, e.g. <region0>")
        if self.regions != used:
            raise ValueError(
                f"regions must list the question's placeholders in order of first appearance, {used}, "
                f"got {self.regions}"
            )
        extra = sorted(set(placeholders(self.answer)) - set(used))
        if extra:
            listed = ", ".join(f"<region{i}>" for i in extra)
            raise ValueError(f"the answer refers to {listed}, which its question does not show")
        return self


class QARegion(NamedTuple):
    index: int  # the N of <regionN>
    name: str  # noun or referring expression
    description: str  # the object's detailed description
    count: int = 1  # objects the region holds (a referring expression can name several)


@dataclass(frozen=True)
class QAJob:
    """The regions of one video to write questions about; plain (index, name, description[, count]) tuples work
    too."""

    regions: tuple[QARegion, ...]

    def __post_init__(self) -> None:
        regions = tuple(QARegion(*r) for r in self.regions)
        object.__setattr__(self, "regions", regions)
        if not regions:
            raise ValueError("a QAJob needs at least one region")
        indexes = [r.index for r in regions]
        if any(not isinstance(i, int) or i < 0 for i in indexes) or len(set(indexes)) != len(indexes):
            raise ValueError(f"QAJob region indexes must be distinct ints >= 0, got {indexes}")
        if any(not r.name.strip() for r in regions):
            raise ValueError("every QAJob region needs a non-empty name")
        if any(not isinstance(r.count, int) or r.count < 1 for r in regions):
            raise ValueError(f"QAJob region counts must be ints >= 1, got {[r.count for r in regions]}")


@dataclass(frozen=True)
class RefinerConfig:
    basic_questions: int = 1  # per video (QAJob)
    reasoning_questions: int = 1
    future_questions: int = 1
    max_description_chars: int = 1500  # of a merged description
    max_question_chars: int = 300
    max_answer_chars: int = 600
    max_input_chars: int = 2000  # each input description is cut to this in the prompt
    max_regions: int = 8  # a QAJob with more regions is a failure (too_many_regions), not asked
    retries: int = 2
    merge_max_tokens: int = 512
    qa_max_tokens: int = 1024

    def __post_init__(self) -> None:
        counts = self.counts
        if any(n < 0 for n in counts) or not 1 <= sum(counts) <= MAX_PAIRS:
            raise ValueError(
                f"questions per kind (basic, reasoning, future) must be >= 0 with a total in [1, {MAX_PAIRS}], "
                f"got {counts}"
            )
        for name, cap in (("max_description_chars", MAX_DESCRIPTION_CHARS), ("max_question_chars", MAX_QUESTION_CHARS),
                          ("max_answer_chars", MAX_ANSWER_CHARS), ("max_input_chars", MAX_DESCRIPTION_CHARS)):
            if not 16 <= getattr(self, name) <= cap:
                raise ValueError(f"{name} must be in [16, {cap}], got {getattr(self, name)}")
        if not 1 <= self.max_regions <= MAX_REGIONS:
            raise ValueError(f"max_regions must be in [1, {MAX_REGIONS}], got {self.max_regions}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        for name in ("merge_max_tokens", "qa_max_tokens"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be >= 16, got {getattr(self, name)}")

    @property
    def counts(self) -> tuple[int, int, int]:
        return (self.basic_questions, self.reasoning_questions, self.future_questions)


@lru_cache(maxsize=16)
def qa_schema(counts: tuple[int, int, int], max_question_chars: int, max_answer_chars: int) -> type[BaseModel]:
    """The JSON answer of `write_qa` for one config: `{"pairs": [QAPair, ...]}` with exactly `counts`
    (basic, reasoning, future) pairs of each kind and the config's length limits."""
    want = dict(zip(KINDS, counts))
    total = sum(counts)

    class Pair(QAPair):
        question: str = Field(min_length=1, max_length=max_question_chars)
        answer: str = Field(min_length=1, max_length=max_answer_chars)

    class QAAnswer(BaseModel):
        model_config = ConfigDict(extra="forbid")

        pairs: list[Pair] = Field(min_length=total, max_length=total)

        @model_validator(mode="after")
        def _kinds(self) -> "QAAnswer":
            got = Counter(p.kind for p in self.pairs)
            if any(got[k] != want[k] for k in KINDS):
                asked = ", ".join(f"{n} {k}" for k, n in want.items())
                have = ", ".join(f"{got[k]} {k}" for k in KINDS)
                raise ValueError(f"write exactly {asked} pairs, got {have}")
            return self

    return QAAnswer


def check_merged(text: str, max_chars: int) -> str | None:
    """Why a merged description breaks the rules, or None when it is fine."""
    if not text:
        return "the answer is empty"
    if _REFUSAL.search(text):
        return "the answer is not a description of the object"
    if _LIST_LINE.search(text):
        return "write one paragraph of prose, with no lists or headings"
    flat = " ".join(text.split())
    if len(flat) > max_chars:
        return f"the description is {len(flat)} characters long: keep it under {max_chars}"
    meta = _META.search(flat)
    if meta:
        return f"do not mention {meta.group(0)!r}: describe only the object itself"
    return None


def check_qa(job: QAJob, pairs: Sequence[QAPair]) -> str | None:
    """Why `pairs` do not fit `job` (a placeholder names no region of the job, a question names an object
    right beside its placeholder, e.g. "the dog <region0>", or a verb beside a placeholder has the wrong number
    for the objects it stands for), or None."""
    names = {r.index: r.name for r in job.regions}
    counts = {r.index: r.count for r in job.regions}
    known = ", ".join(f"<region{i}>" for i in names)
    for n, pair in enumerate(pairs):
        for field in ("question", "answer"):
            unknown = sorted(set(placeholders(getattr(pair, field))) - set(names))
            if unknown:
                listed = ", ".join(f"<region{i}>" for i in unknown)
                return f"pairs.{n}.{field} refers to {listed}, which does not exist; use only {known}"
        for index in pair.regions:
            if _names_beside(pair.question, index, names[index]):
                return (
                    f"pairs.{n}.question names {names[index]!r} beside <region{index}>: refer to that object "
                    "only by its placeholder"
                )
        for field in ("question", "answer"):
            error = _number_error(getattr(pair, field), counts, names)
            if error:
                return f"pairs.{n}.{field}: {error}"
    return None


def _number_error(text: str, counts: dict[int, int], names: dict[int, str]) -> str | None:
    """A verb right before or after a placeholder (or placeholders joined by "and") whose number does not fit
    the objects they stand for, or None. Only auxiliaries are checked (is/are, was/were, does/do, has/have):
    they are where the singular slips in ("What is <region0> doing?"), and a plain verb ending in -s could as
    well be a noun."""
    for match in _JOINED.finditer(text):
        indexes = placeholders(match.group(0))
        objects = sum(counts[i] for i in indexes)
        before = (_WORD.findall(text[: match.start()])[-1:] or [""])[0]
        after = (_WORD.findall(text[match.end():])[:1] or [""])[0]
        if before.lower() in _NOT_SUBJECT:
            continue
        # A question puts its auxiliary before the subject ("What is <region0> doing?"); a statement puts the
        # verb after it ("<region0> is running").
        if before.lower() in _SINGULAR_VERBS | _PLURAL_VERBS | _NUMBERLESS_AUX:
            verb, wrong = before, _SINGULAR_VERBS if objects > 1 else _PLURAL_VERBS
        else:
            verb, wrong = after, _SINGULAR_VERBS if objects > 1 else _PLURAL_AFTER
        if verb.lower() not in wrong:
            continue
        phrase = match.group(0)
        if objects == 1:
            return f"{phrase} is one object ({names[indexes[0]]!r}): use a singular verb, not {verb!r}"
        held = ", ".join(f"<region{i}> {counts[i]}" for i in indexes if counts[i] > 1)
        why = f" (objects per region: {held})" if held and len(indexes) > 1 else ""
        return (f"{phrase} stands for {objects} objects{why}: use a plural verb, not {verb!r}, e.g. "
                f"'What are {phrase} doing?'")
    return None


def _names_beside(question: str, index: int, name: str) -> bool:
    # Deliberately narrow: only the object's full name right next to its own placeholder ("the dog <region0>",
    # "<region0> (the dog)"). A name elsewhere in the question may be another object of the same kind.
    name = re.sub(r"^(?:the|a|an)\s+", "", " ".join(name.split()), flags=re.IGNORECASE)
    if len(name) < 2:
        return False
    word = re.escape(name)
    tag = f"<region{index}>"
    pattern = rf"(?i)\b{word}\W{{0,3}}{re.escape(tag)}|{re.escape(tag)}\W{{0,3}}{_ARTICLE}{word}\b"
    return re.search(pattern, question) is not None


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Refiner:
    """`Refiner(llm).merge(jobs)` and `.write_qa(jobs)`: one result (or `Failure`) per job, in order."""

    prompts = ("refiner_caption", "refiner_qa")  # template names, for provenance (prompts.template_hash)

    def __init__(self, llm: ChatModel, config: RefinerConfig | None = None, stats: Stats | None = None) -> None:
        self.llm = llm
        self.config = config or RefinerConfig()
        self.stats = stats if stats is not None else Stats()

    def merge(self, jobs: Sequence[tuple[str, str, str]]) -> list[str | Failure]:
        """(noun or expression, dynamic description, static description) -> one detailed description."""
        cfg, stats, agent = self.config, self.stats, f"{AGENT}_merge"
        results: list[str | Failure | None] = [None] * len(jobs)
        asked: list[int] = []
        requests: list[ChatRequest] = []
        stats.count(f"{agent}_jobs", len(jobs))
        for i, (name, dynamic, static) in enumerate(jobs):
            name = " ".join(name.split())
            if not name:
                raise ValueError(f"merge job {i} has an empty noun or expression")
            if not dynamic.strip() and not static.strip():
                results[i] = Failure("empty_input", "both descriptions are empty")
                stats.count(f"{agent}_failed")
                continue
            prompt = render(
                "refiner_caption",
                object_name=name,
                dynamic=_clip(dynamic, cfg.max_input_chars),
                static=_clip(static, cfg.max_input_chars),
                max_words=max(20, cfg.max_description_chars // 7),
            )
            asked.append(i)
            requests.append(ChatRequest(messages=(ChatMessage.user(prompt),), max_tokens=cfg.merge_max_tokens))

        def ask_round(batch: list[ChatRequest]) -> list[tuple[Any, str, str | None]]:
            return [(_unquote(t), t, None) for t in ask_text(self.llm, batch, stats=stats, agent=agent)]

        def repair(error: str) -> str:
            return f"Your answer was not valid: {error}\nWrite the description again, as one paragraph of plain text."

        with stats.timer(agent):
            outcomes = ask_checked(
                requests, ask_round, check=lambda _, text: check_merged(text, cfg.max_description_chars), repair=repair,
                retries=cfg.retries, stats=stats, agent=agent,
            )
        for i, out in zip(asked, outcomes):
            if out.error is None:
                results[i] = " ".join(out.value.split())
                stats.count(f"{agent}_ok")
            else:
                results[i] = Failure("invalid_answer", out.error, tuple(out.raw))
                stats.count(f"{agent}_failed")
        return results  # type: ignore[return-value]

    def write_qa(self, jobs: Sequence[QAJob]) -> list[list[QAPair] | Failure]:
        """Questions and answers about the regions of each job (one video), in one batch per round."""
        cfg, stats, agent = self.config, self.stats, f"{AGENT}_qa"
        schema = qa_schema(cfg.counts, cfg.max_question_chars, cfg.max_answer_chars)
        schema_text = json.dumps(schema_of(schema), separators=(",", ":"))
        results: list[list[QAPair] | Failure | None] = [None] * len(jobs)
        asked: list[int] = []
        requests: list[ChatRequest] = []
        stats.count(f"{agent}_jobs", len(jobs))
        for i, job in enumerate(jobs):
            if len(job.regions) > cfg.max_regions:
                detail = f"{len(job.regions)} regions, max_regions is {cfg.max_regions}"
                results[i] = Failure("too_many_regions", detail)
                stats.count(f"{agent}_failed")
                continue
            regions = [
                QARegion(r.index, " ".join(r.name.split()), _clip(r.description, cfg.max_input_chars), r.count)
                for r in job.regions
            ]
            prompt = render(
                "refiner_qa",
                regions=regions,
                n_basic=cfg.basic_questions,
                n_reasoning=cfg.reasoning_questions,
                n_future=cfg.future_questions,
            )
            asked.append(i)
            requests.append(ChatRequest(messages=(ChatMessage.user(prompt),), max_tokens=cfg.qa_max_tokens))

        def ask_round(batch: list[ChatRequest]) -> list[tuple[Any, str, str | None]]:
            answers = ask_json(self.llm, batch, schema, retries=0, stats=stats, agent=agent)
            return [(a.value, a.raw[-1], a.error) for a in answers]

        def repair(error: str) -> str:
            return REPAIR_PROMPT.format(error=error, schema=schema_text)

        with stats.timer(agent):
            outcomes = ask_checked(
                requests, ask_round, check=lambda k, value: check_qa(jobs[asked[k]], value.pairs), repair=repair,
                retries=cfg.retries, stats=stats, agent=agent,
            )
        for i, out in zip(asked, outcomes):
            if out.error is None:
                pairs = [QAPair.model_validate(p.model_dump()) for p in out.value.pairs]
                results[i] = pairs
                stats.count(f"{agent}_pairs", len(pairs))
                for p in pairs:
                    stats.count(f"{agent}_{p.kind}")
            else:
                results[i] = Failure("invalid_answer", out.error, tuple(out.raw))
                stats.count(f"{agent}_failed")
        return results  # type: ignore[return-value]


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
