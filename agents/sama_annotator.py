"""SAMA's annotator (SAMA §3.1 and Appendix A.3): a VLM shown frames on which every object is boxed in its own
color with its tag (Set-of-Mark) writes a fine-grained description per object and a multi-turn dialogue that
goes from basic observations to relations and reasoning, whose answers ground the objects they mention by tag.

The answer is JSON validated against a schema, then checked against the job: every object described exactly
once, no tag that is not one of the job's, every answer grounding at least one object as `<p>phrase</p> [objN]`.
A refused answer is asked again with its error (all of a round in one batch); after `retries` it becomes a
`Failure` keeping every raw answer (`unknown_tag` where the last one named a tag that does not exist).

`to_tokens` turns a checked turn into the training format: `[objN]` in a question -> `<region>`, a grounded
mention in an answer -> `<p> phrase </p> [SEG]`, with the tag of each token in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agents.common import Failure
from engine.chat import ask_json, fit_pixels
from engine.models.interfaces import ChatImage, ChatMessage, ChatModel, ChatRequest
from engine.stats import Stats
from prompts import render

AGENT = "sama_annotator"
TAG = re.compile(r"\[(obj\d+)\]")
GROUNDED = re.compile(r"<p>\s*([^<>]+?)\s*</p>\s*\[(obj\d+)\]")
# A tag written some other way: <obj0>, obj 0, [obj_0], (obj0)
_LOOSE_TAG = re.compile(r"(?i)<\s*obj\s*_?\d+\s*>|\bobj\s*_?\d+\b")
MAX_TEXT_CHARS = 4000


class Description(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tag: str = Field(pattern=r"^obj\d+$")
    description: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class DialogueTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    answer: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class SamaAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    descriptions: list[Description] = Field(min_length=1)
    dialogue: list[DialogueTurn] = Field(min_length=1)


@dataclass(frozen=True)
class MarkedObject:
    tag: str  # obj0, obj1, ... (its index in the job)
    color: str  # the name of its box's color, said in the prompt
    name: str  # its referring expression, or its category where the source has none
    category: str | None = None


@dataclass(frozen=True)
class SamaJob:
    frames: tuple[np.ndarray, ...]  # the sampled frames with the boxes drawn, in time order
    objects: tuple[MarkedObject, ...]

    def __post_init__(self) -> None:
        if not self.frames or not self.objects:
            raise ValueError("a SamaJob needs frames and objects")
        if [o.tag for o in self.objects] != [f"obj{i}" for i in range(len(self.objects))]:
            raise ValueError("a SamaJob's objects must be tagged obj0, obj1, ... in order")


@dataclass(frozen=True)
class SamaResult:
    descriptions: dict[str, str]  # tag -> description, every object of the job
    dialogue: tuple[DialogueTurn, ...]


@dataclass(frozen=True)
class SamaConfig:
    turns: int = 4  # question-answer turns of a dialogue
    max_pixels: int = 448 * 448  # per frame sent (16 frames per request)
    max_description_chars: int = 1200
    max_answer_chars: int = 1200
    max_tokens: int = 2048
    retries: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.turns <= 16:
            raise ValueError(f"turns must be in [1, 16], got {self.turns}")
        for name in ("max_description_chars", "max_answer_chars"):
            if not 16 <= getattr(self, name) <= MAX_TEXT_CHARS:
                raise ValueError(f"{name} must be in [16, {MAX_TEXT_CHARS}], got {getattr(self, name)}")
        if self.max_pixels < 28 * 28 or self.max_tokens < 64 or self.retries < 0:
            raise ValueError("max_pixels must be >= 784, max_tokens >= 64, retries >= 0")


class SamaAnnotator:
    prompts = ("sama_annotator",)

    def __init__(self, model: ChatModel, config: SamaConfig = SamaConfig(), stats: Stats | None = None) -> None:
        self.model, self.config, self.stats = model, config, stats

    def annotate(self, jobs: Sequence[SamaJob]) -> list[SamaResult | Failure]:
        """One request per job, all in one batch per round."""
        if not jobs:
            return []
        cfg = self.config
        answers = ask_json(
            self.model, [self._request(job) for job in jobs], SamaAnswer, retries=cfg.retries, stats=self.stats,
            agent=AGENT, check=lambda i, value: check_answer(jobs[i], value, cfg),
        )
        out: list[SamaResult | Failure] = []
        for answer in answers:
            if answer.ok:
                value = answer.value
                out.append(SamaResult({d.tag: " ".join(d.description.split()) for d in value.descriptions},
                                      tuple(value.dialogue)))
                continue
            reason = "unknown_tag" if (answer.error or "").startswith("unknown tag") else "invalid_answer"
            out.append(Failure(reason, answer.error or "no valid answer", tuple(answer.raw)))
        return out

    def _request(self, job: SamaJob) -> ChatRequest:
        prompt = render("sama_annotator", n_frames=len(job.frames), objects=job.objects, turns=self.config.turns)
        images = [ChatImage(fit_pixels(frame, self.config.max_pixels)) for frame in job.frames]
        return ChatRequest(messages=(ChatMessage.user(*images, prompt),), max_tokens=self.config.max_tokens)


def check_answer(job: SamaJob, answer: SamaAnswer, config: SamaConfig) -> str | None:
    """Why `answer` does not fit `job`, or None. An unknown tag is reported first (its error starts with
    "unknown tag"), as the caller rejects it under its own reason."""
    tags = [o.tag for o in job.objects]
    known = ", ".join(f"[{t}]" for t in tags)
    texts = [("descriptions", d.description) for d in answer.descriptions]
    texts += [(f"dialogue.{n}.{f}", getattr(t, f)) for n, t in enumerate(answer.dialogue) for f in ("question", "answer")]
    described = [d.tag for d in answer.descriptions]
    for where, text in [("descriptions", " ".join(f"[{t}]" for t in described)), *texts]:
        unknown = sorted(set(TAG.findall(text)) - set(tags))
        if unknown:
            return f"unknown tag {', '.join(unknown)} in {where}: the objects are {known}"
    if sorted(described) != sorted(tags):
        return f"descriptions must describe each of {known} exactly once, got tags {described}"
    if len(answer.dialogue) != config.turns:
        return f"the dialogue must have exactly {config.turns} turns, got {len(answer.dialogue)}"
    for d in answer.descriptions:
        if len(d.description) > config.max_description_chars:
            return f"the description of [{d.tag}] is {len(d.description)} characters: keep it under {config.max_description_chars}"
    for n, turn in enumerate(answer.dialogue):
        loose = _LOOSE_TAG.search(TAG.sub(" ", turn.question))
        if loose:
            return f"dialogue.{n}.question writes a tag as {loose.group(0)!r}: write it exactly as [objN]"
        if len(turn.answer) > config.max_answer_chars:
            return f"dialogue.{n}.answer is {len(turn.answer)} characters: keep it under {config.max_answer_chars}"
        rest = GROUNDED.sub(" ", turn.answer)
        if not GROUNDED.search(turn.answer):
            return (f"dialogue.{n}.answer grounds no object: write each object it mentions as <p>phrase</p> [objN], "
                    "e.g. <p>the man in the red jacket</p> [obj0]")
        stray = TAG.search(rest) or _LOOSE_TAG.search(rest)
        if stray:
            return (f"dialogue.{n}.answer has {stray.group(0)!r} outside a grounded mention: write it as "
                    "<p>phrase</p> [objN]")
    return None


def to_tokens(question: str, answer: str) -> tuple[str, str, list[str]]:
    """A checked turn in the training format: `[objN]` in the question -> `<region>`; `<p>phrase</p> [objN]`
    in the answer -> `<p> phrase </p> [SEG]`. Also the tag of every token, in order (question first)."""
    tags = TAG.findall(question)
    question = TAG.sub("<region>", question)
    answer_tags = [m.group(2) for m in GROUNDED.finditer(answer)]
    answer = GROUNDED.sub(lambda m: f"<p> {m.group(1)} </p> [SEG]", answer)
    return question, answer, tags + answer_tags


def plain(text: str) -> str:
    """A description with any grounding marks taken out (a description is about one object, in words)."""
    text = GROUNDED.sub(lambda m: m.group(1), text)
    return " ".join(TAG.sub("", text).split())
