"""The Instruction Generator's records and the helpers both of its halves use (Strefer §2.1.6, Table 7,
Table 1): the transcript it reads (`TranscriptInput`), the instructions it writes (`Instruction`), its config,
the groups of Table 1, and how an instruction becomes `samples` rows (`to_samples`, `scope_frames`).

The template types (`agents.instruction_templates`) and the LLM types (`agents.instruction_generator`) both
build on this module, which imports neither.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Optional, Sequence

from pydantic import Field, field_validator, model_validator

from agents.timecodes import (
    DEFAULT_M,
    END_TOLERANCE_S,
    find_timestamps,
    format_timestamp,
    normalize_timestamps,
    timestamps_to_tokens,
)
from engine.ids import stable_id
from schemas.records import ClipRecord, MaskletRecord, Provenance, Record, SampleRecord, Turn, Window

if TYPE_CHECKING:
    from agents.transcriber import Transcript

PIPELINE = "strefer"
DATA_TYPE = "strefer"
MASK_PREFIX = "Please answer the following question about the <region>."
REGION = "<region>"
COARSE_RANGES = ("beginning", "middle", "end", "throughout")
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
# What a sample's text points at besides a mask or a timestamp (Table 7): a coarse part of the video (types 8
# and 9) or another event (before/during/after it: types 10 and 11).
COARSE_TIME_TYPES = frozenset({8, 9})
EVENT_TYPES = frozenset({10, 11})
RefersTo = Literal["mask", "timestamp", "coarse_time", "event"]


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
    mask_clips: list[int] = Field(
        default_factory=list, description="the clips its masklet has a mask in: only those get a mask version"
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
            if e.mask_clips and (e.masklet_id is None or not set(e.mask_clips) <= known):
                raise ValueError(
                    f"entity {e.expression!r}: mask_clips {e.mask_clips} need a masklet_id and known clips "
                    f"{sorted(known)}"
                )
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
        masklet id, first appearance, the clips it has a mask in); an entity without one keeps its expression
        as its noun. The clips are `clips` where given (a mask is in a clip by frame index), else those of the
        transcript's entries (by time)."""
        by_expression = {entity_key(m.expression): m for m in masklets}
        spans = {c.clip_index: ClipSpan(c.clip_index, c.start_time, c.end_time) for c in clips}
        for entity in transcript.entities:
            for entry in entity.clips:
                spans.setdefault(entry.clip_index, ClipSpan(entry.clip_index, entry.start_time, entry.end_time))

        def mask_clips(masklet: MaskletRecord) -> list[int]:
            if clips:
                return [c.clip_index for c in clips
                        if any(c.start_frame <= f.frame_index < c.end_frame for f in masklet.frames)]
            return [c.clip_index for c in spans.values()
                    if any(c.start_time <= f.timestamp < c.end_time for f in masklet.frames)]

        entities = []
        for entity in transcript.entities:
            masklet = by_expression.get(entity_key(entity.expression))
            entities.append(TranscriptEntity(
                expression=entity.expression,
                noun=masklet.noun if masklet is not None else entity.expression,
                masklet_id=masklet.masklet_id if masklet is not None else None,
                first_appearance_time=first_appearance(masklet) if masklet is not None else None,
                mask_clips=mask_clips(masklet) if masklet is not None else [],
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
    """One question-answer pair of Table 7. Texts carry no `<video>` prefix (`to_samples` adds it)."""

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


def has_time(instruction: Instruction) -> bool:
    """Whether a timestamp appears in the question (its options included) or the answer: only then do the
    two time formats differ."""
    return bool(find_timestamps(instruction.question) or find_timestamps(instruction.answer))


def refers_to(instruction: Instruction) -> list[RefersTo]:
    """What the instruction's text points at: a mask (`<region>`), a timestamp, a coarse part of the video,
    another event. Table 1 groups by task type (type 7, with timestamps, is G3 "traditional"), while §3.2's
    Finding 1 speaks of mask-and-timestamp data: these labels let a user mix data by content."""
    out: list[RefersTo] = []
    if instruction.masklet_ids:
        out.append("mask")
    if has_time(instruction):
        out.append("timestamp")
    if instruction.task_type in COARSE_TIME_TYPES:
        out.append("coarse_time")
    if instruction.task_type in EVENT_TYPES:
        out.append("event")
    return out


def to_samples(
    instruction: Instruction,
    *,
    source: str,
    provenance: Provenance,
    frames: Sequence[int] = (),
    window: Window | None = None,
    time_formats: Sequence[TimeFormat] = ("timestamp", "tokens"),
    kept: bool = True,
) -> list[SampleRecord]:
    """`samples` rows: human "<video>\\n" + question, gpt answer. An instruction with a time in it gives one
    row per time format, times as HH:MM:SS.xxx ("timestamp") or as temporal tokens ("tokens"), labelled
    `time_format`; one without a time gives a single row with no such label (an exporter keeps it whatever
    format it picks), whose id does not depend on the formats. `frames` are the frame indexes the exporter
    shows (see `scope_frames`); `window` is the clip a clip-scoped instruction is about."""
    if not time_formats or not set(time_formats) <= {"timestamp", "tokens"}:
        raise ValueError(f"time_formats must be among 'timestamp', 'tokens', got {list(time_formats)}")
    start, end = instruction.span
    labels = {
        "group": instruction.group,
        "form": instruction.form,
        "referring": instruction.referring,
        "generator": instruction.source,
        "frames": instruction.frames,
        "span": f"{format_timestamp(start)}-{format_timestamp(end, round_down=True)}",
    }
    forms: Sequence[TimeFormat | None] = list(dict.fromkeys(time_formats)) if has_time(instruction) else [None]
    out = []
    for form in forms:
        if form == "tokens":
            question, answer = instruction.temporal_tokens.question, instruction.temporal_tokens.answer
            extra = {"time_format": form, "temporal_tokens": str(instruction.temporal_tokens.m + 1)}
        else:
            question, answer = instruction.question, instruction.answer
            extra = {"time_format": form} if form else {}
        out.append(SampleRecord(
            sample_id=stable_id(instruction.instruction_id, *([form] if form else []), provenance.config_hash),
            video_id=instruction.video_id,
            source=source,
            pipeline=PIPELINE,
            data_type=DATA_TYPE,
            task=f"type{instruction.task_type}",
            labels={**labels, **extra},
            conversation=[Turn(role="human", value=f"<video>\n{question}"), Turn(role="gpt", value=answer)],
            masklet_ids=list(instruction.masklet_ids),
            frames=list(frames),
            window=window,
            refers_to=refers_to(instruction),
            kept=kept,
            provenance=provenance,
        ))
    return out


def scope_frames(start_frame: int, end_frame: int, *, count: int = 32) -> list[int]:
    """Up to `count` frame indexes spread evenly over frames [start_frame, end_frame) (a clip's own range, or
    the item's: never recomputed from seconds, where 62 / 15 * 15 > 62 would reach into the next shot)."""
    if not 0 <= start_frame < end_frame or count < 1:
        raise ValueError(f"need 0 <= start_frame < end_frame and count >= 1, got {start_frame}, {end_frame}, {count}")
    if end_frame - start_frame <= count:
        return list(range(start_frame, end_frame))
    if count == 1:
        return [(start_frame + end_frame - 1) // 2]
    step = (end_frame - 1 - start_frame) / (count - 1)
    return sorted({start_frame + int(round(i * step)) for i in range(count)})


def clip_window(clip: ClipRecord) -> Window:
    """The window of a clip-scoped sample: the clip's frames and seconds, counted in the whole file."""
    return Window(start_frame=clip.start_frame, end_frame=clip.end_frame, start_s=clip.start_time,
                  end_s=clip.end_time)


# -- the config ------------------------------------------------------------------------------------------------


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


