"""Instruction Generator (Strefer §2.1.6, Table 7, Table 1): a video's transcript and masklets in, instruction
question-answer pairs of the 11 task types out.

Types 1-6 come from templates (`agents.instruction_templates`), deterministic for a seed; types 7-11 from an
LLM shown the transcript with HH:MM:SS.xxx timestamps, the task definitions and Table 7's examples, one
request per video and every video of a call in one batch. Each type has, where Table 7 gives one, a
mask-referring version: the question starts with `MASK_PREFIX`, the entity's words give way to a pronoun or a
generic term, and `masklet_ids` lists the entity's masklet for the `<region>` token.

Every question and answer keeps its times as HH:MM:SS.xxx and carries a `temporal_tokens` copy with the times
as `<k>` tokens (A.3.4), so an exporter writes either; `to_sample` turns an `Instruction` into a
`SampleRecord`. An LLM answer still invalid after `retries` re-asks (each shown its error) is a `Failure`
that keeps every raw answer.

Counters: `instructions_type{n}`, `instructions_group_{G}`, `instruction_llm_failed`,
`instruction_llm_skipped_empty`, and ask_json's `instruction_llm_requests` / `_backend_calls`.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.common import Failure
from agents.timecodes import (
    DEFAULT_M,
    END_TOLERANCE_S,
    TIMESTAMP,
    find_timestamps,
    format_timestamp,
    normalize_timestamps,
    timestamps_to_tokens,
)
from engine.chat import REPAIR_PROMPT, ask_checked, ask_json, schema_of
from engine.ids import stable_id
from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest
from engine.stats import Stats
from prompts import render
from schemas.records import ClipRecord, MaskletRecord, Provenance, Record, SampleRecord, Turn

if TYPE_CHECKING:
    from agents.transcriber import Transcript

AGENT = "instruction_llm"
PIPELINE = "strefer"
DATA_TYPE = "strefer"
MASK_PREFIX = "Please answer the following question about the <region>."
REGION = "<region>"
COARSE_RANGES = ("beginning", "middle", "end", "throughout")
RELATIONS = ("before", "during", "after")
LETTERS = "ABCDEFGH"
TEMPLATE_TYPES = (1, 2, 3, 4, 5, 6)
LLM_TYPES = (7, 8, 9, 10, 11)
MAX_QUESTION_CHARS = 1000  # hard bounds of the LLM's JSON; the config's limits are tighter
MAX_ANSWER_CHARS = 2000
MAX_OPTIONS = 6

Group = Literal["G1", "G2", "G3", "G4", "G5", "G6", "G7", "G8"]
Referring = Literal["language", "mask"]
Form = Literal["open", "multiple_choice"]
Source = Literal["template", "llm"]
Scope = Literal["clip", "video"]
TimeFormat = Literal["timestamp", "tokens"]

# Table 1 (Strefer): the data groups, keyed by (task type of Table 7, how the question refers to the entity).
#   group  description                                            source    frames  types
#   G1     traditional data                                       template  clip    1, 2, 3, 4
#   G2     traditional data                                       template  video   5
#   G3     traditional data                                       LLM       video   7
#   G4     timestamp referring data                               LLM       video   8, 9, 10, 11
#   G5     timestamp referring data                               template  video   6
#   G6     mask referring instead of language, derived from G3    LLM       video   7
#   G7     mask referring instead of language, derived from G4    LLM       video   8, 9, 10, 11
#   G8     mask referring instead of language, derived from G5    template  video   6
# Table 1 follows the task type, not the text: type 7 is G3 though its questions name two timestamps, and
# types 9-11 are G4 though theirs name none. Table 7 also gives type 1 a mask-referring version that no group
# of Table 1 lists; it keeps G1 (template, clip frames), and its labels say referring=mask.
GROUPS: dict[tuple[int, str], str] = {
    (1, "language"): "G1", (2, "language"): "G1", (3, "language"): "G1", (4, "language"): "G1",
    (1, "mask"): "G1",
    (5, "language"): "G2",
    (7, "language"): "G3",
    (8, "language"): "G4", (9, "language"): "G4", (10, "language"): "G4", (11, "language"): "G4",
    (6, "language"): "G5",
    (7, "mask"): "G6",
    (8, "mask"): "G7", (9, "mask"): "G7", (10, "mask"): "G7", (11, "mask"): "G7",
    (6, "mask"): "G8",
}
# Table 7's "Frames" column: types 1-4 see only their clip, the others the full video.
CLIP_TYPES = frozenset({1, 2, 3, 4})
MASK_VERSION_TYPES = frozenset(t for t, referring in GROUPS if referring == "mask")


def group_of(task_type: int, referring: str) -> str:
    """The Table 1 group of a task type's language- or mask-referring version."""
    try:
        return GROUPS[(task_type, referring)]
    except KeyError:
        raise ValueError(f"task type {task_type} has no {referring}-referring version (Table 7)") from None


def source_of(task_type: int) -> str:
    return "template" if task_type in TEMPLATE_TYPES else "llm"


def clean_text(text: str) -> str:
    return " ".join(str(text).split())


def entity_key(name: str) -> str:
    """How entity names are compared: lowercase, single spaces, no leading article, no end punctuation."""
    key = clean_text(name).lower().strip(" .,;:!?\"'")
    return re.sub(r"^(?:the|a|an)\s+", "", key)


# -- the transcript (the Video Transcriber's output) ------------------------------------------------------------


class ClipSpan(NamedTuple):
    clip_index: int
    start_time: float
    end_time: float


class Observation(Record):
    """What the Video Transcriber saw of one entity in one clip (§2.1.5)."""

    clip_index: int
    present: bool = Field(description="the answer to the presence check")
    description: Optional[str] = Field(default=None, description="the behaviour description, when present")


class TranscriptEntity(Record):
    expression: str = Field(min_length=1, description="the referring expression, e.g. girl in a white dress")
    noun: str = Field(min_length=1, description="its noun or generalized category")
    masklet_id: Optional[str] = None
    first_appearance_time: Optional[float] = Field(
        default=None, description="seconds of its masklet's first frame with a mask (see first_appearance)"
    )
    clips: list[Observation] = Field(default_factory=list)

    def observation(self, clip_index: int) -> Observation | None:
        return next((o for o in self.clips if o.clip_index == clip_index), None)


class TranscriptInput(Record):
    """One video's transcript, as the Instruction Generator needs it: the video's duration and clips, and per
    entity its noun, masklet and first appearance, and per clip whether it is present and what it does.

    `from_transcript` builds one from the Video Transcriber's `Transcript` and the video's masklets."""

    video_id: str = Field(min_length=1)
    duration_s: float = Field(gt=0)
    clips: list[ClipSpan]
    entities: list[TranscriptEntity]

    @field_validator("clips")
    @classmethod
    def _sorted(cls, clips: list[ClipSpan]) -> list[ClipSpan]:
        return sorted(clips, key=lambda c: (c.start_time, c.clip_index))

    @model_validator(mode="after")
    def _consistent(self) -> "TranscriptInput":
        if not math.isfinite(self.duration_s):
            raise ValueError(f"duration_s must be finite, got {self.duration_s}")
        end = self.duration_s + END_TOLERANCE_S
        indexes = [c.clip_index for c in self.clips]
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"clip indexes must be distinct, got {indexes}")
        for c in self.clips:
            if not 0 <= c.start_time < c.end_time <= end:
                raise ValueError(
                    f"clip {c.clip_index} spans {c.start_time}-{c.end_time} s: clips need 0 <= start < end <= "
                    f"duration_s ({self.duration_s})"
                )
        keys = [entity_key(e.expression) for e in self.entities]
        if len(set(keys)) != len(keys) or not all(keys):
            names = [e.expression for e in self.entities]
            raise ValueError(f"entity expressions must be distinct and non-empty, got {names}")
        known = set(indexes)
        for e in self.entities:
            seen = [o.clip_index for o in e.clips]
            if len(set(seen)) != len(seen) or not set(seen) <= known:
                raise ValueError(
                    f"entity {e.expression!r} must have at most one observation per clip, of known clips "
                    f"{sorted(known)}; got {seen}"
                )
            t = e.first_appearance_time
            if t is not None and not (math.isfinite(t) and 0 <= t <= end):
                raise ValueError(f"entity {e.expression!r}: first_appearance_time {t} is outside the video")
        return self

    @classmethod
    def from_transcript(
        cls,
        transcript: "Transcript",
        *,
        duration_s: float,
        masklets: Sequence[MaskletRecord] = (),
        clips: Sequence[ClipRecord] = (),
    ) -> "TranscriptInput":
        """The Video Transcriber's `Transcript` joined with the video's masklets, matched by expression (noun,
        masklet id, first appearance); an entity without one keeps its expression as its noun. The clips are
        `clips` where given, else those of the transcript's entries."""
        by_expression = {entity_key(m.expression): m for m in masklets}
        spans = {c.clip_index: ClipSpan(c.clip_index, c.start_time, c.end_time) for c in clips}
        for entity in transcript.entities:
            for entry in entity.clips:
                spans.setdefault(entry.clip_index, ClipSpan(entry.clip_index, entry.start_time, entry.end_time))
        entities = []
        for entity in transcript.entities:
            masklet = by_expression.get(entity_key(entity.expression))
            entities.append(TranscriptEntity(
                expression=entity.expression,
                noun=masklet.noun if masklet is not None else entity.expression,
                masklet_id=masklet.masklet_id if masklet is not None else None,
                first_appearance_time=first_appearance(masklet) if masklet is not None else None,
                clips=[Observation(clip_index=e.clip_index, present=e.present, description=e.description)
                       for e in entity.clips],
            ))
        return cls(video_id=transcript.video_id, duration_s=duration_s, clips=list(spans.values()),
                   entities=entities)

    def clip(self, clip_index: int) -> ClipSpan:
        return next(c for c in self.clips if c.clip_index == clip_index)

    def entity(self, name: str) -> TranscriptEntity | None:
        key = entity_key(name)
        return next((e for e in self.entities if entity_key(e.expression) == key), None)


def first_appearance(masklet: MaskletRecord) -> float | None:
    """Seconds of the first frame a masklet has a mask on (its `frames` list only frames with a mask)."""
    return min((f.timestamp for f in masklet.frames), default=None)


# -- the output -------------------------------------------------------------------------------------------------


class TokenText(Record):
    """The question and answer with every timestamp as a temporal token `<k>`, k = round(m·t/duration)."""

    question: str
    answer: str
    m: int


class Instruction(Record):
    """One question-answer pair of Table 7. Texts carry no `<video>` prefix (`to_sample` adds it)."""

    instruction_id: str
    video_id: str
    task_type: int = Field(ge=1, le=11)
    group: Group
    source: Source
    referring: Referring
    form: Form
    question: str = Field(min_length=1, description="times as HH:MM:SS.xxx; MCQ options listed as (A) ...")
    answer: str = Field(min_length=1)
    options: list[str] = Field(default_factory=list, description="multiple choice: the options, in (A).. order")
    answer_letter: Optional[str] = None
    masklet_ids: list[str] = Field(default_factory=list, description="one per <region> token, in order")
    entities: list[str] = Field(default_factory=list, description="expressions of the entities it is about")
    frames: Scope = Field(description="clip: only the clip's frames are shown; video: the full video")
    span: tuple[float, float] = Field(description="seconds of the frames shown: the clip, or the whole video")
    clip_index: Optional[int] = None
    duration_s: float = Field(gt=0)
    temporal_tokens: TokenText

    @model_validator(mode="after")
    def _consistent(self) -> "Instruction":
        group, frames = group_of(self.task_type, self.referring), "clip" if self.task_type in CLIP_TYPES else "video"
        if self.group != group:
            raise ValueError(f"type {self.task_type} {self.referring}-referring is group {group}, not {self.group}")
        if self.source != source_of(self.task_type):
            raise ValueError(f"type {self.task_type} comes from {source_of(self.task_type)}")
        if self.frames != frames:
            raise ValueError(f"type {self.task_type} is shown {frames} frames, not {self.frames}")
        if self.question.count(REGION) != len(self.masklet_ids):
            raise ValueError("the question needs one <region> token per masklet id")
        if (self.referring == "mask") != self.question.startswith(MASK_PREFIX):
            raise ValueError(f"a question starts with {MASK_PREFIX!r} exactly when it is mask-referring")
        if (self.form == "multiple_choice") != bool(self.options) or bool(self.options) != bool(self.answer_letter):
            raise ValueError("a multiple-choice instruction needs options and answer_letter; an open one neither")
        return self


def make_instruction(
    transcript: TranscriptInput,
    task_type: int,
    referring: str,
    question: str,
    answer: str,
    *,
    form: str = "open",
    options: Sequence[str] = (),
    answer_letter: str | None = None,
    masklet_ids: Sequence[str] = (),
    entities: Sequence[str] = (),
    clip: ClipSpan | None = None,
    m: int = DEFAULT_M,
) -> Instruction:
    """An `Instruction` with its group, source, frames and temporal-token copy filled in from the type."""
    duration = transcript.duration_s
    question, answer = normalize_timestamps(question), normalize_timestamps(answer)
    if task_type in CLIP_TYPES:
        if clip is None:
            raise ValueError(f"type {task_type} is asked of one clip: give its clip")
        span, clip_index = (clip.start_time, min(clip.end_time, duration)), clip.clip_index
    else:
        span, clip_index = (0.0, duration), None
    return Instruction(
        instruction_id=stable_id(  # the clip too: one question can be asked of two clips
            transcript.video_id, task_type, referring, form, question, answer, list(masklet_ids), clip_index, span
        ),
        video_id=transcript.video_id,
        task_type=task_type,
        group=group_of(task_type, referring),
        source=source_of(task_type),
        referring=referring,
        form=form,
        question=question,
        answer=answer,
        options=list(options),
        answer_letter=answer_letter,
        masklet_ids=list(masklet_ids),
        entities=list(entities),
        frames="clip" if task_type in CLIP_TYPES else "video",
        span=span,
        clip_index=clip_index,
        duration_s=duration,
        temporal_tokens=TokenText(
            question=timestamps_to_tokens(question, duration, m),
            answer=timestamps_to_tokens(answer, duration, m),
            m=m,
        ),
    )


def with_options(stem: str, options: Sequence[str]) -> str:
    """A multiple-choice question: the stem, then one `(A) option` line per option."""
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options, got {len(options)}")
    return "\n".join([stem, *(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))])


def rng_for(seed: int, video_id: str, task: str) -> random.Random:
    """The random generator of one task of one video: the same seed, video and task give the same draws."""
    return random.Random(int(stable_id(seed, video_id, task), 16))


def to_sample(
    instruction: Instruction,
    *,
    source: str,
    provenance: Provenance,
    frames: Sequence[int] = (),
    time_format: TimeFormat = "timestamp",
    kept: bool = True,
) -> SampleRecord:
    """A `samples` row: human "<video>\\n" + question, gpt answer, with times as HH:MM:SS.xxx ("timestamp") or
    as temporal tokens ("tokens"). `frames` are the frame indexes the exporter shows (see `scope_frames`)."""
    if time_format == "timestamp":
        question, answer = instruction.question, instruction.answer
    elif time_format == "tokens":
        question, answer = instruction.temporal_tokens.question, instruction.temporal_tokens.answer
    else:
        raise ValueError(f"time_format must be 'timestamp' or 'tokens', got {time_format!r}")
    start, end = instruction.span
    return SampleRecord(
        sample_id=stable_id(instruction.instruction_id, time_format, provenance.config_hash),
        video_id=instruction.video_id,
        source=source,
        pipeline=PIPELINE,
        data_type=DATA_TYPE,
        task=f"type{instruction.task_type}",
        labels={
            "group": instruction.group,
            "form": instruction.form,
            "time_format": time_format,
            "referring": instruction.referring,
            "generator": instruction.source,
            "frames": instruction.frames,
            "span": f"{format_timestamp(start)}-{format_timestamp(end, round_down=True)}",
            **({"temporal_tokens": str(instruction.temporal_tokens.m + 1)} if time_format == "tokens" else {}),
        },
        conversation=[Turn(role="human", value=f"<video>\n{question}"), Turn(role="gpt", value=answer)],
        masklet_ids=list(instruction.masklet_ids),
        frames=list(frames),
        kept=kept,
        provenance=provenance,
    )


def scope_frames(instruction: Instruction, *, fps: float, num_frames: int, count: int = 32) -> list[int]:
    """Up to `count` frame indexes spread evenly over the frames the instruction shows (its clip or video)."""
    if fps <= 0 or num_frames < 1 or count < 1:
        raise ValueError(f"need fps > 0, num_frames >= 1 and count >= 1, got {fps}, {num_frames}, {count}")
    start, end = instruction.span
    first = min(max(int(math.floor(start * fps)), 0), num_frames - 1)
    last = max(min(int(math.ceil(end * fps)) - 1, num_frames - 1), first)
    if last - first + 1 <= count:
        return list(range(first, last + 1))
    step = (last - first) / (count - 1)
    return sorted({first + int(round(i * step)) for i in range(count)})


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


@dataclass(frozen=True)
class InstructionConfig:
    seed: int = 0
    template_types: tuple[int, ...] = TEMPLATE_TYPES
    llm_types: tuple[int, ...] = LLM_TYPES
    mask_versions: bool = True  # the mask-referring version wherever Table 7 has one and the entity a masklet
    max_per_type: Optional[int] = None  # template instructions of one type (and referring) per video, sampled
    order_entities: int = 4  # most entities in a type 5 (first appearance) question
    min_order_entities: int = 3
    order_options: int = 4
    min_order_gap_s: float = 0.5  # type 5 only orders entities whose first appearances are this far apart
    max_range_clips: int = 2  # a type 6 range covers 1 to this many consecutive clips
    open_per_type: int = 1  # LLM questions per video of each type in llm_types
    choice_per_type: int = 1
    temporal_tokens: int = DEFAULT_M  # M of A.3.4
    max_question_chars: int = 400
    max_answer_chars: int = 600
    max_description_chars: int = 400  # each transcript description is cut to this in the prompt
    retries: int = 2
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        if not set(self.template_types) <= set(TEMPLATE_TYPES):
            raise ValueError(f"template_types must be among {TEMPLATE_TYPES}, got {self.template_types}")
        if not set(self.llm_types) <= set(LLM_TYPES) or len(set(self.llm_types)) != len(self.llm_types):
            raise ValueError(f"llm_types must be distinct types among {LLM_TYPES}, got {self.llm_types}")
        if self.max_per_type is not None and self.max_per_type < 1:
            raise ValueError(f"max_per_type must be >= 1 or None, got {self.max_per_type}")
        if not 2 <= self.min_order_entities <= self.order_entities <= len(LETTERS):
            raise ValueError(
                f"need 2 <= min_order_entities <= order_entities <= {len(LETTERS)}, got "
                f"{self.min_order_entities}, {self.order_entities}"
            )
        if not 2 <= self.order_options <= len(LETTERS):
            raise ValueError(f"order_options must be in [2, {len(LETTERS)}], got {self.order_options}")
        if not self.min_order_gap_s >= 0 or self.max_range_clips < 1:
            raise ValueError(
                f"need min_order_gap_s >= 0 and max_range_clips >= 1, got {self.min_order_gap_s}, "
                f"{self.max_range_clips}"
            )
        if self.open_per_type < 0 or self.choice_per_type < 0 or self.open_per_type + self.choice_per_type < 1:
            raise ValueError(f"open_per_type and choice_per_type must be >= 0 with a sum >= 1, got "
                             f"{self.open_per_type}, {self.choice_per_type}")
        if self.temporal_tokens < 1:
            raise ValueError(f"temporal_tokens (M) must be >= 1, got {self.temporal_tokens}")
        for name, cap in (("max_question_chars", MAX_QUESTION_CHARS), ("max_answer_chars", MAX_ANSWER_CHARS),
                          ("max_description_chars", MAX_ANSWER_CHARS)):
            if not 16 <= getattr(self, name) <= cap:
                raise ValueError(f"{name} must be in [16, {cap}], got {getattr(self, name)}")
        if self.retries < 0 or self.max_tokens < 64:
            raise ValueError(f"need retries >= 0 and max_tokens >= 64, got {self.retries}, {self.max_tokens}")


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
        from agents.instruction_templates import template_instructions  # it imports this module

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
