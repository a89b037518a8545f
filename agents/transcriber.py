"""Video Transcriber (Strefer §2.1.5): a video LLM describes each entity's behaviour, clip by clip.

For each entity (a referring expression) and each clip, a presence check, "Is there a {entity}? Answer 'Yes' or
'No'.", shown only that clip's frames; where the answer is yes, the follow-up in the same conversation: "What
clearly happens to the {entity}? Describe only what is visibly happening to the {entity}, without inference or
assumptions." Every presence check of every job goes to the model in one batch, then every follow-up in a
second one, so a call costs two backend calls whatever the number of videos, clips and entities.

The result is a `Transcript` per video (a pydantic model, stored as JSON and later given to the Instruction
Generator's LLM through `to_text`). A presence answer that is neither yes nor no is counted
(`transcriber_unclear_presence`) and treated as absent; its raw text stays on the entry.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.timecodes import format_timestamp
from engine.chat import ask_text
from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest, ChatVideo
from engine.stats import Stats
from prompts import render

AGENT = "transcriber"
PRESENCE_TEMPLATE = "transcriber_presence"
BEHAVIOR_TEMPLATE = "transcriber_behavior"
MAX_ENTITIES = 32
MAX_ENTITY_CHARS = 200
MAX_CLIPS = 4096
MAX_DESCRIPTION_CHARS = 4000  # hard bound of the record; `TranscriberConfig.max_description_chars` is tighter
MAX_RAW_PRESENCE_CHARS = 500  # a presence answer is kept up to this length

_FIRST_WORD = re.compile(r"^[\W_]*([A-Za-z]+)")


def parse_yes_no(text: str) -> bool | None:
    """True for yes, False for no, None when the answer's first word is neither. Case, surrounding quotes,
    Markdown emphasis and punctuation are ignored: "Yes.", "**No**", "'yes', there is" all count."""
    match = _FIRST_WORD.match(text)
    if match is None:
        return None
    word = match.group(1).lower()
    return True if word == "yes" else False if word == "no" else None


# -- input ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipView:
    """One clip of a video as the model sees it: its frames, sampled from [start_time, end_time) only."""

    clip_index: int
    start_time: float  # seconds from the video's first frame
    end_time: float
    frames: ChatVideo


@dataclass(frozen=True)
class TranscribeJob:
    video_id: str
    clips: Sequence[ClipView]
    entities: Sequence[str]  # referring expressions ("girl in a white dress"), distinct


# -- output -----------------------------------------------------------------------------------------------------


class ClipEntry(BaseModel):
    """One entity in one clip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_index: int = Field(ge=0)
    start_time: float = Field(ge=0)
    end_time: float = Field(ge=0)
    present: bool
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)  # only when present
    raw_presence: str = Field(max_length=MAX_RAW_PRESENCE_CHARS)  # the model's presence answer, as given

    @model_validator(mode="after")
    def _consistent(self) -> "ClipEntry":
        if self.end_time < self.start_time:
            raise ValueError(f"clip {self.clip_index} ends ({self.end_time}) before it starts ({self.start_time})")
        if self.description is not None and not self.present:
            raise ValueError(f"clip {self.clip_index} has a description but the entity is not present")
        return self

    @property
    def unclear(self) -> bool:
        """The presence answer was neither yes nor no (and the entity was taken as absent)."""
        return parse_yes_no(self.raw_presence) is None


class EntityTranscript(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expression: str = Field(min_length=1, max_length=MAX_ENTITY_CHARS)  # the referring expression asked about
    clips: list[ClipEntry] = Field(max_length=MAX_CLIPS)  # in the job's clip order


class Transcript(BaseModel):
    """A video's structured, behaviour-centric transcript: per entity, per clip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    video_id: str = Field(min_length=1)
    entities: list[EntityTranscript] = Field(max_length=MAX_ENTITIES)

    def entity(self, expression: str) -> EntityTranscript:
        for e in self.entities:
            if e.expression == expression:
                return e
        raise KeyError(f"no entity {expression!r} in the transcript of {self.video_id}")

    def to_text(self) -> str:
        """A compact rendering for an LLM prompt: one block per entity, one line per clip in time order,
        consecutive clips where the entity is not visible merged into one line.

            Entity 1: girl in a white dress
            - 00:00:00.000-00:00:07.000: not visible
            - 00:00:07.000-00:00:09.500: She walks to the table and sits down.
        """
        lines: list[str] = []
        for n, e in enumerate(self.entities, 1):
            lines.append(f"Entity {n}: {e.expression}")
            runs: list[tuple[float, float, str]] = []
            for c in sorted(e.clips, key=lambda c: (c.start_time, c.clip_index)):
                text = (c.description or "visible, no description") if c.present else "not visible"
                previous = runs[-1] if runs else None
                if (
                    not c.present
                    and previous is not None
                    and previous[2] == "not visible"
                    and c.start_time <= previous[1] + 1e-3  # contiguous: no gap hidden by the merge
                ):
                    runs[-1] = (previous[0], max(previous[1], c.end_time), text)
                else:
                    runs.append((c.start_time, c.end_time, text))
            for start, end, text in runs:
                lines.append(f"- {format_timestamp(start)}-{format_timestamp(end)}: {text}")
        return "\n".join(lines)


# -- agent ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranscriberConfig:
    presence_max_tokens: int = 16  # "Yes" or "No", with room for a short sentence
    behavior_max_tokens: int = 256
    max_description_chars: int = 1500  # longer descriptions are cut (counted)

    def __post_init__(self) -> None:
        if self.presence_max_tokens < 1:
            raise ValueError(f"presence_max_tokens must be >= 1, got {self.presence_max_tokens}")
        if self.behavior_max_tokens < 16:
            raise ValueError(f"behavior_max_tokens must be >= 16, got {self.behavior_max_tokens}")
        if not 16 <= self.max_description_chars <= MAX_DESCRIPTION_CHARS:
            raise ValueError(
                f"max_description_chars must be in [16, {MAX_DESCRIPTION_CHARS}], got {self.max_description_chars}"
            )


@dataclass(frozen=True)
class _Check:
    job: int
    entity: int
    clip: int


def _validate(job: TranscribeJob, at: int) -> list[str]:
    """The job's entities, whitespace collapsed; a `ValueError` naming the job for anything malformed."""
    where = f"transcribe job {at} (video {job.video_id!r})"
    if not str(job.video_id).strip():
        raise ValueError(f"transcribe job {at} has an empty video_id")
    entities = [" ".join(str(e).split()) for e in job.entities]
    if len(entities) > MAX_ENTITIES:
        raise ValueError(f"{where} has {len(entities)} entities; at most {MAX_ENTITIES}")
    seen: set[str] = set()
    for e in entities:
        if not e:
            raise ValueError(f"{where} has an empty entity expression")
        if len(e) > MAX_ENTITY_CHARS:
            raise ValueError(f"{where}: entity {e[:40]!r}... is longer than {MAX_ENTITY_CHARS} characters")
        if e.lower() in seen:
            raise ValueError(f"{where} lists the entity {e!r} twice; give each entity once")
        seen.add(e.lower())
    if len(job.clips) > MAX_CLIPS:
        raise ValueError(f"{where} has {len(job.clips)} clips; at most {MAX_CLIPS}")
    indexes: set[int] = set()
    for clip in job.clips:
        if clip.clip_index < 0 or clip.clip_index in indexes:
            raise ValueError(f"{where}: clip_index {clip.clip_index} is negative or repeated")
        indexes.add(clip.clip_index)
        if not (math.isfinite(clip.start_time) and math.isfinite(clip.end_time)) or not (
            0 <= clip.start_time <= clip.end_time
        ):
            raise ValueError(
                f"{where}: clip {clip.clip_index} spans [{clip.start_time}, {clip.end_time}]; "
                "need 0 <= start_time <= end_time"
            )
        if not clip.frames.frames:
            raise ValueError(f"{where}: clip {clip.clip_index} has no frames; sample at least one per clip")
    return entities


class VideoTranscriber:
    """`VideoTranscriber(vlm).transcribe(jobs)` -> one `Transcript` per job, in order. Two backend calls in all:
    every presence check, then every behaviour follow-up for the entities found present."""

    prompts = (PRESENCE_TEMPLATE, BEHAVIOR_TEMPLATE)  # template names, for provenance (prompts.template_hash)

    def __init__(self, vlm: ChatModel, config: TranscriberConfig | None = None, stats: Stats | None = None) -> None:
        self.vlm = vlm
        self.config = config or TranscriberConfig()
        self.stats = stats if stats is not None else Stats()

    def transcribe(self, jobs: Sequence[TranscribeJob]) -> list[Transcript]:
        cfg, stats = self.config, self.stats
        entities = [_validate(job, i) for i, job in enumerate(jobs)]  # all up front, before any model call

        # Step 1: presence checks, every (job, entity, clip) in one batch.
        checks: list[_Check] = []
        questions: list[str] = []
        requests: list[ChatRequest] = []
        for j, job in enumerate(jobs):
            stats.count(f"{AGENT}_videos")
            stats.count(f"{AGENT}_clips", len(job.clips))
            stats.count(f"{AGENT}_entities", len(entities[j]))
            for e, entity in enumerate(entities[j]):
                question = render(PRESENCE_TEMPLATE, entity=entity)
                for c, clip in enumerate(job.clips):
                    checks.append(_Check(j, e, c))
                    questions.append(question)
                    requests.append(
                        ChatRequest(messages=(ChatMessage.user(clip.frames, question),),
                                    max_tokens=cfg.presence_max_tokens)
                    )
        with stats.timer(f"{AGENT}_presence"):
            raw_presence = ask_text(self.vlm, requests, stats=stats, agent=f"{AGENT}_presence")

        present: list[bool] = []
        for raw in raw_presence:
            verdict = parse_yes_no(raw)
            if verdict is None:
                stats.count(f"{AGENT}_unclear_presence")
            stats.count(f"{AGENT}_present" if verdict else f"{AGENT}_absent")
            present.append(bool(verdict))

        # Step 2: behaviour, a follow-up in the same conversation, only where the answer was yes; one batch.
        followed = [k for k, yes in enumerate(present) if yes]
        follow_ups = []
        for k in followed:
            check = checks[k]
            clip = jobs[check.job].clips[check.clip]
            entity = entities[check.job][check.entity]
            follow_ups.append(
                ChatRequest(
                    messages=(
                        ChatMessage.user(clip.frames, questions[k]),
                        ChatMessage.assistant(raw_presence[k]),
                        ChatMessage.user(render(BEHAVIOR_TEMPLATE, entity=entity)),
                    ),
                    max_tokens=cfg.behavior_max_tokens,
                )
            )
        with stats.timer(f"{AGENT}_behavior"):
            answers = ask_text(self.vlm, follow_ups, stats=stats, agent=f"{AGENT}_behavior")
        descriptions: dict[int, str | None] = {}
        for k, answer in zip(followed, answers):
            text = " ".join(answer.split())
            if not text:
                descriptions[k] = None
                stats.count(f"{AGENT}_empty_description")
                continue
            if len(text) > cfg.max_description_chars:
                text = text[: cfg.max_description_chars]
                stats.count(f"{AGENT}_descriptions_truncated")
            descriptions[k] = text
            stats.count(f"{AGENT}_descriptions")

        # Assemble: checks were laid out job by job, entity by entity, clip by clip.
        entries: dict[tuple[int, int], list[ClipEntry]] = {}
        for k, check in enumerate(checks):
            clip = jobs[check.job].clips[check.clip]
            entries.setdefault((check.job, check.entity), []).append(
                ClipEntry(
                    clip_index=clip.clip_index,
                    start_time=clip.start_time,
                    end_time=clip.end_time,
                    present=present[k],
                    description=descriptions.get(k),
                    raw_presence=raw_presence[k][:MAX_RAW_PRESENCE_CHARS],
                )
            )
        return [
            Transcript(
                video_id=job.video_id,
                entities=[
                    EntityTranscript(expression=entity, clips=entries.get((j, e), []))
                    for e, entity in enumerate(entities[j])
                ],
            )
            for j, job in enumerate(jobs)
        ]
