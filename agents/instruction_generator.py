"""Instruction Generator (Strefer §2.1.6, Table 7, Table 1): a video's transcript and masklets in, instruction
question-answer pairs of the 11 task types out.

Types 1-6 come from templates (`agents.instruction_templates`), deterministic for a seed; types 7-11 from an
LLM shown the transcript with HH:MM:SS.xxx timestamps, the task definitions and Table 7's examples, one
request per video and every video of a call in one batch. Each type has, where Table 7 gives one, a
mask-referring version: the question starts with `MASK_PREFIX`, the entity's words give way to a pronoun or a
generic term, and `masklet_ids` lists the entity's masklet for the `<region>` token.

Every question and answer keeps its times as HH:MM:SS.xxx and carries a `temporal_tokens` copy with the times
as `<k>` tokens (A.3.4); `agents.instruction_records.to_samples` turns an `Instruction` into `samples` rows
(one per time format where a time appears, else one). The records and helpers both halves share live in
`agents.instruction_records`. An LLM answer still invalid after `retries` re-asks (each shown its error) is a `Failure`
that keeps every raw answer.

Counters: `instructions_type{n}`, `instructions_group_{G}`, `instruction_llm_failed`,
`instruction_llm_skipped_empty`, and ask_json's `instruction_llm_requests` / `_backend_calls`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.common import Failure
from agents.instruction_records import (
    COARSE_RANGES,
    LETTERS,
    MASK_PREFIX,
    MAX_ANSWER_CHARS,
    MAX_OPTIONS,
    MAX_QUESTION_CHARS,
    REGION,
    Form,
    Instruction,
    InstructionConfig,
    TranscriptInput,
    clean_text,
    entity_key,
    make_instruction,
    rng_for,
    with_options,
)
from agents.instruction_templates import template_instructions
from agents.timecodes import END_TOLERANCE_S, TIMESTAMP, find_timestamps, format_timestamp, normalize_timestamps
from engine.chat import REPAIR_PROMPT, ask_checked, ask_json, schema_of
from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest
from engine.stats import Stats
from prompts import render

AGENT = "instruction_llm"


# -- types 7-11: the LLM's answer -------------------------------------------------------------------------------


def _option_key(text: str) -> str:
    return clean_text(text).lower().strip(" .,;:!?\"'")


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?i)\b{re.escape(word)}\b", text) is not None


class LLMQuestion(BaseModel):
    """One question of types 7-11, in its language-referring form and, where it is about one entity with a
    mask, its mask-referring form."""

    model_config = ConfigDict(extra="forbid")

    task_type: Literal[7, 8, 9, 10, 11]
    form: Form
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    answer: str = Field(min_length=1, max_length=MAX_ANSWER_CHARS)
    options: list[str] = Field(default_factory=list, max_length=MAX_OPTIONS)
    coarse_range: Optional[Literal["beginning", "middle", "end", "throughout"]] = None
    relation: Optional[Literal["before", "during", "after"]] = None
    entities: list[str] = Field(default_factory=list, max_length=8)
    mask_entity: Optional[str] = None
    mask_question: Optional[str] = Field(default=None, max_length=MAX_QUESTION_CHARS)

    @field_validator("question", "mask_question")
    @classmethod
    def _strip_video(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = clean_text(value)
        return value[len("<video>"):].strip() if value.startswith("<video>") else value

    @field_validator("answer")
    @classmethod
    def _answer(cls, value: str) -> str:
        return clean_text(value)

    @field_validator("options")
    @classmethod
    def _options(cls, value: list[str]) -> list[str]:
        return [clean_text(o) for o in value]

    @model_validator(mode="after")
    def _rules(self) -> "LLMQuestion":
        for name in ("question", "answer"):
            if not getattr(self, name):
                raise ValueError(f"{name} is blank")
        if REGION in self.question or "<region" in self.question.lower():
            raise ValueError("the language-referring question must not contain <region>: name the entity")
        if self.form == "multiple_choice":
            if not 2 <= len(self.options) <= MAX_OPTIONS:
                raise ValueError(
                    f"a multiple-choice question needs 2 to {MAX_OPTIONS} options, got {len(self.options)}"
                )
            keys = [_option_key(o) for o in self.options]
            if not all(keys):
                raise ValueError("an option is blank")
            if len(set(keys)) != len(keys):
                raise ValueError(f"options must be distinct, got {self.options}")
            if _option_key(self.answer) not in keys:
                raise ValueError(f"the answer {self.answer!r} must be exactly one of the options {self.options}")
        elif self.options:
            raise ValueError('an open-ended question has no options: write "options": []')
        if self.task_type in (8, 9) and self.coarse_range is None:
            raise ValueError(f"type {self.task_type} needs coarse_range: one of {', '.join(COARSE_RANGES)}")
        if self.task_type == 8 and not _mentions(self.question, self.coarse_range):
            raise ValueError(f"a type 8 question must name its coarse range {self.coarse_range!r}")
        if self.task_type == 9:
            if not _mentions(self.answer, self.coarse_range):
                raise ValueError(f"a type 9 answer must be the coarse range {self.coarse_range!r}")
            for option in self.options:
                if not any(_mentions(option, r) for r in COARSE_RANGES):
                    ranges = ", ".join(COARSE_RANGES)
                    raise ValueError(f"a type 9 option must be a coarse range ({ranges}), got {option!r}")
        if self.task_type in (10, 11):
            if self.relation is None:
                raise ValueError(f"type {self.task_type} needs relation: before, during or after")
            if not self.entities:
                raise ValueError(f"type {self.task_type} is about entities: list them in entities")
        if (self.mask_entity is None) != (self.mask_question is None):
            raise ValueError("give mask_entity and mask_question together, or both null")
        if self.mask_question is not None:
            if not self.mask_question.startswith(MASK_PREFIX):
                raise ValueError(f"mask_question must start with {MASK_PREFIX!r}")
            if self.mask_question.count(REGION) != 1 or self.mask_question.lower().count("<region") != 1:
                raise ValueError("mask_question must contain <region> exactly once, in its first sentence")
            if entity_key(self.mask_entity) not in {entity_key(e) for e in self.entities}:
                raise ValueError("mask_entity must be one of entities")
        return self


@lru_cache(maxsize=16)
def llm_schema(types: tuple[int, ...], n_open: int, n_choice: int, max_question_chars: int,
               max_answer_chars: int) -> type[BaseModel]:
    """The JSON answer for one video: `{"questions": [LLMQuestion, ...]}` with exactly `n_open` open-ended and
    `n_choice` multiple-choice questions of each type in `types`."""
    total = len(types) * (n_open + n_choice)

    class Question(LLMQuestion):
        question: str = Field(min_length=1, max_length=max_question_chars)
        answer: str = Field(min_length=1, max_length=max_answer_chars)
        mask_question: Optional[str] = Field(default=None, max_length=max_question_chars)

    class LLMAnswer(BaseModel):
        model_config = ConfigDict(extra="forbid")

        questions: list[Question] = Field(min_length=total, max_length=total)

        @model_validator(mode="after")
        def _counts(self) -> "LLMAnswer":
            got = Counter((q.task_type, q.form) for q in self.questions)
            for t in types:
                for form, n in (("open", n_open), ("multiple_choice", n_choice)):
                    if got[(t, form)] != n:
                        raise ValueError(
                            f"write exactly {n_open} open and {n_choice} multiple_choice question(s) of each type "
                            f"{list(types)}; type {t} has {got[(t, form)]} {form}"
                        )
            return self

    return LLMAnswer


_LOOSE_TIME = re.compile(r"\d+:\d{2}(?::\d{2})?(?:\.\d+)?")


def check_llm_answer(transcript: TranscriptInput, questions: Sequence[LLMQuestion]) -> str | None:
    """Why the questions do not fit this video (a time outside it, an unknown entity, a mask on an entity
    without a masklet, the masked entity named in its mask question), or None."""
    duration = transcript.duration_s
    known = ", ".join(f'"{e.expression}"' for e in transcript.entities) or "none"
    for n, q in enumerate(questions):
        where = f"questions.{n}"
        texts = {"question": q.question, "answer": q.answer, "mask_question": q.mask_question or ""}
        texts.update({f"options.{i}": o for i, o in enumerate(q.options)})
        for name, text in texts.items():
            loose = [s for s in _LOOSE_TIME.findall(TIMESTAMP.sub(" ", text))]
            if loose:
                return f"{where}.{name} writes {loose[0]!r}: write every time as HH:MM:SS.xxx, e.g. 00:00:07.007"
            for t in find_timestamps(text):
                if t > duration + END_TOLERANCE_S:
                    return (
                        f"{where}.{name} refers to {format_timestamp(t)}, after the video ends at "
                        f"{format_timestamp(duration)}: use times from 00:00:00.000 to {format_timestamp(duration)}"
                    )
        if q.task_type == 7:
            times = find_timestamps(q.question)
            if len(times) < 2 or not times[0] < times[1]:
                return f"{where}.question (type 7) must give a time range: a start and a later end, as HH:MM:SS.xxx"
            if q.mask_question is not None and find_timestamps(q.mask_question) != times:
                return f"{where}.mask_question must keep the question's time range"
        for name in q.entities:
            if transcript.entity(name) is None:
                return f"{where}.entities names {name!r}, which is not an entity of this video; use only {known}"
        if q.mask_entity is not None:
            entity = transcript.entity(q.mask_entity)
            if entity is None:
                return (
                    f"{where}.mask_entity names {q.mask_entity!r}, which is not an entity of this video; use only "
                    f"{known}"
                )
            if entity.masklet_id is None:
                return (
                    f"{where}.mask_entity {entity.expression!r} has no mask: set mask_entity and mask_question to "
                    "null"
                )
            if entity_key(entity.expression) in q.mask_question.lower():
                return (
                    f"{where}.mask_question names {entity.expression!r}: replace its words with a pronoun or a "
                    'generic term such as "she", "he", "this person"'
                )
    return None


# -- the agent --------------------------------------------------------------------------------------------------

@dataclass
class InstructionResult:
    """One video's instructions; `failure` is set when its LLM types failed (its template types still count)."""

    video_id: str
    instructions: list[Instruction] = field(default_factory=list)
    failure: Failure | None = None


class InstructionGenerator:
    """`InstructionGenerator(llm).generate(transcripts)`: template types 1-6 and LLM types 7-11 per video.

    `from_templates(transcript)` needs no model; `from_llm(transcripts)` sends one request per video, all in
    one batch per round."""

    prompts = ("instruction_llm",)  # template names, for provenance (prompts.template_hash)

    def __init__(self, llm: ChatModel | None = None, config: InstructionConfig | None = None,
                 stats: Stats | None = None) -> None:
        self.llm = llm
        self.config = config or InstructionConfig()
        self.stats = stats if stats is not None else Stats()

    def generate(self, transcripts: Sequence[TranscriptInput]) -> list[InstructionResult]:
        results = [InstructionResult(t.video_id, self.from_templates(t)) for t in transcripts]
        if self.llm is not None and self.config.llm_types:
            for result, answer in zip(results, self.from_llm(transcripts)):
                if isinstance(answer, Failure):
                    result.failure = answer
                else:
                    result.instructions.extend(answer)
        return results

    def from_templates(self, transcript: TranscriptInput) -> list[Instruction]:
        with self.stats.timer("instruction_templates"):
            out = template_instructions(transcript, self.config, self.stats)
        self._count(out)
        return out

    def from_llm(self, transcripts: Sequence[TranscriptInput]) -> list[list[Instruction] | Failure]:
        if self.llm is None:
            raise ValueError("from_llm needs an llm: InstructionGenerator(llm=...)")
        cfg, stats = self.config, self.stats
        if not cfg.llm_types:
            return [[] for _ in transcripts]
        schema = llm_schema(tuple(cfg.llm_types), cfg.open_per_type, cfg.choice_per_type,
                            cfg.max_question_chars, cfg.max_answer_chars)
        schema_text = json.dumps(schema_of(schema), separators=(",", ":"))
        results: list[list[Instruction] | Failure | None] = [None] * len(transcripts)
        asked: list[int] = []
        requests: list[ChatRequest] = []
        for i, t in enumerate(transcripts):
            if not any(o.present and o.description for e in t.entities for o in e.clips):
                results[i] = Failure("empty_transcript", "no entity is described in any clip")
                stats.count(f"{AGENT}_skipped_empty")
                continue
            asked.append(i)
            prompt = render("instruction_llm", **self._prompt_variables(t))
            requests.append(ChatRequest(messages=(ChatMessage.user(prompt),), max_tokens=cfg.max_tokens))

        def ask_round(batch: list[ChatRequest]) -> list[tuple[Any, str, str | None]]:
            answers = ask_json(self.llm, batch, schema, retries=0, stats=stats, agent=AGENT)
            return [(a.value, a.raw[-1], a.error) for a in answers]

        def check(k: int, value: Any) -> str | None:
            return check_llm_answer(transcripts[asked[k]], value.questions)

        with stats.timer(AGENT):
            outcomes = ask_checked(
                requests, ask_round, check=check,
                repair=lambda error: REPAIR_PROMPT.format(error=error, schema=schema_text),
                retries=cfg.retries, stats=stats, agent=AGENT,
            )
        for i, out in zip(asked, outcomes):
            if out.error is None:
                instructions = self._build(transcripts[i], out.value.questions)
                self._count(instructions)
                results[i] = instructions
            else:
                results[i] = Failure("invalid_answer", out.error, tuple(out.raw))
                stats.count(f"{AGENT}_failed")
        return results  # type: ignore[return-value]

    def _prompt_variables(self, t: TranscriptInput) -> dict[str, Any]:
        cfg, third = self.config, t.duration_s / 3
        entities = [
            {"name": clean_text(e.expression), "has_mask": e.masklet_id is not None,
             "first": format_timestamp(e.first_appearance_time) if e.first_appearance_time is not None else None}
            for e in t.entities
        ]
        clips = []
        for c in t.clips:
            lines = []
            for e in t.entities:
                o = e.observation(c.clip_index)
                if o is None:
                    continue
                text = _cut(o.description, cfg.max_description_chars) if o.present and o.description else (
                    "present" if o.present else "not visible")
                lines.append((clean_text(e.expression), text))
            clips.append({"start": format_timestamp(c.start_time),
                          "end": format_timestamp(min(c.end_time, t.duration_s), round_down=True), "lines": lines})
        return {
            "duration": format_timestamp(t.duration_s, round_down=True),
            "thirds": [format_timestamp(third * k, round_down=True) for k in range(4)],
            "entities": entities,
            "clips": clips,
            "types": list(cfg.llm_types),
            "n_open": cfg.open_per_type,
            "n_choice": cfg.choice_per_type,
            "mask_prefix": MASK_PREFIX,
        }

    def _build(self, t: TranscriptInput, questions: Sequence[LLMQuestion]) -> list[Instruction]:
        cfg, out = self.config, []
        for n, q in enumerate(questions):
            entities = [t.entity(name).expression for name in q.entities]  # checked to exist
            common: dict[str, Any] = {"form": q.form, "entities": entities, "m": cfg.temporal_tokens}
            answer, stem, mask_stem = q.answer, q.question, q.mask_question
            if q.form == "multiple_choice":
                options = list(q.options)
                rng_for(cfg.seed, t.video_id, f"type{q.task_type}.{n}.options").shuffle(options)
                keys = [_option_key(o) for o in options]
                letter = LETTERS[keys.index(_option_key(q.answer))]
                options = [normalize_timestamps(o) for o in options]
                stem, mask_stem = with_options(stem, options), mask_stem and with_options(mask_stem, options)
                answer = f"({letter})"
                common.update(options=options, answer_letter=letter)
            out.append(make_instruction(t, q.task_type, "language", stem, answer, **common))
            if q.mask_entity is not None and cfg.mask_versions:
                masklet = t.entity(q.mask_entity).masklet_id
                out.append(
                    make_instruction(t, q.task_type, "mask", mask_stem, answer, masklet_ids=[masklet], **common)
                )
        return out

    def _count(self, instructions: Sequence[Instruction]) -> None:
        for i in instructions:
            self.stats.count(f"instructions_type{i.task_type}")
            self.stats.count(f"instructions_group_{i.group}")


def _cut(text: str, limit: int) -> str:
    text = clean_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
