"""Template task types 1-6 of Strefer's Instruction Generator (Table 7), from a video's transcript.

    1  what an entity present in a clip is doing (clip frames; mask-referring version where its masklet has a
       mask in the clip)
    2  the same question of an entity absent from the clip; the answer says it is not seen (clip frames)
    3  is there <entity>? yes plus its behaviour, or an uncertain no (clip frames)
    4  is there <entity>? "Yes." or "No." only (clip frames)
    5  multiple choice: the order in which entities first appear (full video)
    6  what an entity is doing between two timestamps, which may be a range it is absent from (full video;
       mask-referring version)

Every family has several phrasings, drawn with `rng_for(seed, video_id, "type{n}")`: the same seed gives the
same instructions, another seed other phrasings and ranges. Types 1 and 2 share their question phrasings, so a
question never tells whether its entity is there. A mask-referring question starts with `MASK_PREFIX` and
refers to the entity by a pronoun or a generic term chosen by rule from its noun, never by a word of its
expression or noun (a phrasing that would repeat one is not used).
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Callable, NamedTuple, Sequence

from agents.instruction_records import (
    LETTERS,
    MASK_PREFIX,
    Instruction,
    InstructionConfig,
    TranscriptEntity,
    TranscriptInput,
    clean_text,
    make_instruction,
    rng_for,
    with_options,
)
from agents.timecodes import format_timestamp
from engine.stats import Stats

# -- phrasings ---------------------------------------------------------------------------------------------------

BEHAVIOUR_QUESTIONS = (  # types 1 and 2
    "What is happening to the {e}?",
    "What is currently happening to the {e}?",
    "What is the {e} doing?",
    "Describe what the {e} is doing.",
    "What can you tell me about what the {e} is doing?",
)
BEHAVIOUR_MASK_QUESTIONS = (  # type 1, after MASK_PREFIX
    "What is happening to {obj}?",
    "What is currently happening to {obj}?",
    "What {be} {subj} doing?",
    "Describe what {subj} {be} doing.",
)
ABSENT_ANSWERS = (  # type 2: uncertainty, never a made-up behaviour
    "I don't see the {e} in this part of the video.",
    "Sorry, I'm not sure. The {e} does not seem to be clearly visible here.",
    "The {e} seems to be not clearly visible.",
    "I'm not sure: I can't find the {e} in this part of the video.",
)
PRESENCE_QUESTIONS = (  # type 3
    "Were you able to see {a} {e}?",
    "Is there {a} {e} in this part of the video? If so, what is happening?",
    "Can you see {a} {e}? If you can, describe what happens.",
    "Do you notice {a} {e} here?",
)
PRESENT_ANSWERS = (
    "Yes. {d}",
    "Yes, there is {a} {e}. {d}",
    "Yes, I can see {a} {e}. {d}",
)
UNSURE_ANSWERS = (
    "Sorry, I'm not sure; I don't see {a} {e} in this part of the video.",
    "I'm not sure. {A} {e} does not seem to be clearly visible.",
    "I can't clearly see {a} {e} here, so I'm not sure.",
)
YES_NO_QUESTIONS = (  # type 4
    'Is there {a} {e}? Answer only "Yes" or "No".',
    'Can you see {a} {e} in this part of the video? Answer "Yes" or "No" only.',
    'Does {a} {e} appear here? Reply with only "Yes" or "No".',
)
ORDER_QUESTIONS = (  # type 5
    "Which order shows their first appearance in the video?",
    "In which order do these entities first appear in the video?",
    "Which sequence lists the entities in the order they first appear in the video?",
)
RANGE_QUESTIONS = (  # type 6
    "Could you explain what the {e} is doing between {t0} and {t1}?",
    "What is the {e} doing from {t0} to {t1}?",
    "Describe what the {e} does between {t0} and {t1}.",
    "What happens to the {e} between {t0} and {t1}?",
)
RANGE_MASK_QUESTIONS = (
    "Could you explain what {subj} {be} doing between {t0} and {t1}?",
    "What {be} {subj} doing from {t0} to {t1}?",
    "Describe what {subj} {does} between {t0} and {t1}.",
    "What happens to {obj} between {t0} and {t1}?",
)
RANGE_ABSENT_ANSWERS = (
    "The {e} does not appear between {t0} and {t1}.",
    "I don't see the {e} between {t0} and {t1}.",
    "The {e} is not visible from {t0} to {t1}.",
)

# -- referring to an entity without its words -----------------------------------------------------------------

FEMALE = frozenset(
    "woman women girl girls lady ladies mother mom mum bride daughter sister wife grandmother grandma queen "
    "actress waitress aunt niece female ballerina princess".split()
)
MALE = frozenset(
    "man men boy boys gentleman father dad groom son brother husband grandfather grandpa king actor waiter "
    "uncle nephew male guy prince".split()
)
PERSON = frozenset(
    "person people child children kid kids baby toddler infant adult player student teacher worker individual "
    "dancer rider skier surfer athlete chef doctor customer performer musician singer referee officer "
    "pedestrian driver cyclist runner swimmer climber skater audience crowd human".split()
)
ANIMAL = frozenset(
    "animal dog puppy cat kitten bird parrot horse pony cow calf sheep lamb goat pig duck goose chicken hen "
    "fish monkey elephant giraffe zebra lion tiger bear deer rabbit mouse rat squirrel snake turtle frog "
    "camel dolphin whale penguin owl eagle pigeon seagull".split()
)
_STOP = frozenset(
    "the a an in on at of with and or to from by for is are his her their its this that who which one some "
    "into onto near over under".split()
)


class Referent(NamedTuple):
    subj: str  # "she"
    obj: str  # "her"
    be: str  # "is"
    does: str  # "does"


_SHE, _HE = Referent("she", "her", "is", "does"), Referent("he", "him", "is", "does")
_THEY, _IT = Referent("they", "them", "are", "do"), Referent("it", "it", "is", "does")
_PERSON = Referent("this person", "this person", "is", "does")
_INDIVIDUAL = Referent("this individual", "this individual", "is", "does")
_ANIMAL = Referent("this animal", "this animal", "is", "does")
_OBJECT = Referent("this object", "this object", "is", "does")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def content_words(text: str) -> set[str]:
    """The words of an expression that give it away: everything but short words and function words."""
    return {w for w in words(text) if len(w) > 2 and w not in _STOP}


_HEAD_END = frozenset(
    "in on at of with near by from behind beside under over wearing holding carrying who that which while and "
    "or".split()
)


def head_word(expression: str) -> str:
    """The head noun of a referring expression: the last word before its first modifier ("girl in a white
    dress" -> "girl", "man holding a cup" -> "man", "brown dog" -> "dog")."""
    head = ""
    for w in words(expression):
        if w in _HEAD_END or (w.endswith("ing") and len(w) > 4):
            break
        head = w
    return head


def entity_kind(expression: str, noun: str) -> str:
    """female, male, person, animal or object: from the expression's head noun ("bride in white" is female even
    when its noun is the generalized "person"), else the noun's last word, else any word of the expression."""
    vocabularies = (("female", FEMALE), ("male", MALE), ("person", PERSON), ("animal", ANIMAL))
    noun_words = words(noun)
    for head in (head_word(expression), noun_words[-1] if noun_words else ""):
        for kind, vocab in vocabularies:
            if head in vocab or (head.endswith("s") and head[:-1] in vocab):
                return kind
    present = set(words(expression))
    for kind, vocab in vocabularies:
        if present & vocab:
            return kind
    return "object"


def referents(expression: str, noun: str) -> list[Referent]:
    """Pronouns and generic terms for the entity, pronoun first."""
    return {
        "female": [_SHE, _PERSON], "male": [_HE, _PERSON], "person": [_THEY, _PERSON, _INDIVIDUAL],
        "animal": [_IT, _ANIMAL], "object": [_IT, _OBJECT],
    }[entity_kind(expression, noun)]


def mask_question(entity: TranscriptEntity, phrasings: Sequence[str], rng: random.Random, **slots: str) -> str | None:
    """A mask-referring question: MASK_PREFIX, then a phrasing with the entity as a pronoun or generic term.
    None when every phrasing would repeat a word of the entity's expression or noun."""
    forbidden = content_words(entity.expression) | content_words(entity.noun)
    choices = [(p, r) for p in phrasings for r in referents(entity.expression, entity.noun)]
    rng.shuffle(choices)
    for phrasing, ref in choices:
        question = f"{MASK_PREFIX} {phrasing.format(**ref._asdict(), **slots)}"
        if not forbidden & set(words(question)):
            return question
    return None


# -- helpers -------------------------------------------------------------------------------------------------------


def name(entity: TranscriptEntity) -> str:
    """The expression without a leading article: "The girl in red" -> "girl in red"."""
    return re.sub(r"^(?:the|a|an)\s+", "", clean_text(entity.expression), flags=re.IGNORECASE)


def article(text: str) -> str:
    return "an" if text[:1].lower() in "aeiou" else "a"


def _sentence(text: str) -> str:
    text = clean_text(text)
    return text if not text or text[-1] in ".!?" else text + "."


class _Context(NamedTuple):
    transcript: TranscriptInput
    config: InstructionConfig
    rng: random.Random
    stats: Stats


def _observed(ctx: _Context):
    """(clip, entity, observation) for every entity the transcript observed in every clip, in clip order."""
    for clip in ctx.transcript.clips:
        for entity in ctx.transcript.entities:
            o = entity.observation(clip.clip_index)
            if o is not None:
                yield clip, entity, o


def _make(ctx: _Context, task_type: int, referring: str, question: str, answer: str, entity: TranscriptEntity | None,
          **kwargs) -> Instruction:
    masklets = [entity.masklet_id] if referring == "mask" else []
    entities = [entity.expression] if entity is not None else kwargs.pop("entities", [])
    return make_instruction(ctx.transcript, task_type, referring, question, answer, masklet_ids=masklets,
                            entities=entities, m=ctx.config.temporal_tokens, **kwargs)


def _mask_version(ctx: _Context, task_type: int, entity: TranscriptEntity, phrasings: Sequence[str], answer: str,
                  **kwargs) -> list[Instruction]:
    if not ctx.config.mask_versions or entity.masklet_id is None:
        return []
    clip = kwargs.get("clip")
    if clip is not None and clip.clip_index not in entity.mask_clips:
        # A clip's <region> is shown on the clip's own frames: without a mask there, no mask version.
        ctx.stats.count("instructions_mask_skipped_not_in_clip")
        return []
    slots = {k: kwargs.pop(k) for k in ("t0", "t1") if k in kwargs}
    question = mask_question(entity, phrasings, ctx.rng, **slots)
    if question is None:
        ctx.stats.count("instructions_mask_skipped_words")
        return []
    return [_make(ctx, task_type, "mask", question, answer, entity, **kwargs)]


# -- the six types ------------------------------------------------------------------------------------------------


def type1(ctx: _Context) -> list[Instruction]:
    """What an entity present in a clip is doing; the answer is its transcript description."""
    out, rng = [], ctx.rng
    for clip, entity, o in _observed(ctx):
        if not (o.present and o.description and o.description.strip()):
            continue
        answer = _sentence(o.description)
        question = rng.choice(BEHAVIOUR_QUESTIONS).format(e=name(entity))
        out.append(_make(ctx, 1, "language", question, answer, entity, clip=clip))
        out += _mask_version(ctx, 1, entity, BEHAVIOUR_MASK_QUESTIONS, answer, clip=clip)
    return out


def type2(ctx: _Context) -> list[Instruction]:
    """The behaviour question of an entity the transcript found absent from the clip; the answer says so."""
    out, rng = [], ctx.rng
    for clip, entity, o in _observed(ctx):
        if o.present:
            continue
        e = name(entity)
        question, answer = rng.choice(BEHAVIOUR_QUESTIONS).format(e=e), rng.choice(ABSENT_ANSWERS).format(e=e)
        out.append(_make(ctx, 2, "language", question, answer, entity, clip=clip))
    return out


def type3(ctx: _Context) -> list[Instruction]:
    """Is there the entity? Yes and its behaviour, or an uncertain no."""
    out, rng = [], ctx.rng
    for clip, entity, o in _observed(ctx):
        if o.present and not (o.description and o.description.strip()):
            continue  # present but undescribed: the answer would have nothing to say
        e = name(entity)
        slots = {"e": e, "a": article(e), "A": article(e).capitalize()}
        question = rng.choice(PRESENCE_QUESTIONS).format(**slots)
        if o.present:
            answer = rng.choice(PRESENT_ANSWERS).format(d=_sentence(o.description), **slots)
        else:
            answer = rng.choice(UNSURE_ANSWERS).format(**slots)
        out.append(_make(ctx, 3, "language", question, answer, entity, clip=clip))
    return out


def type4(ctx: _Context) -> list[Instruction]:
    """Is there the entity? "Yes." or "No." only."""
    out, rng = [], ctx.rng
    for clip, entity, o in _observed(ctx):
        e = name(entity)
        question = rng.choice(YES_NO_QUESTIONS).format(e=e, a=article(e))
        out.append(_make(ctx, 4, "language", question, "Yes." if o.present else "No.", entity, clip=clip))
    return out


def appearance_window(transcript: TranscriptInput, entity: TranscriptEntity) -> tuple[float, float] | None:
    """When the entity first appears, as an interval: its masklet's first frame where the transcript agrees
    (or says nothing), the span of the first clip the transcript sees it in where it has no masklet, and the
    hull of both where they disagree. None when neither knows."""
    first_clip = next((c for c in transcript.clips if (o := entity.observation(c.clip_index)) and o.present), None)
    t = entity.first_appearance_time
    if first_clip is None:
        return None if t is None else (t, t)
    lo, hi = first_clip.start_time, first_clip.end_time
    if t is None:
        return (lo, hi)
    if lo <= t <= hi:
        return (t, t)
    return (min(t, lo), max(t, hi))


def first_appearance_order(ctx: _Context) -> list[TranscriptEntity]:
    """Up to `order_entities` entities, picked at random among those whose first appearances are certainly
    ordered (windows at least `min_order_gap_s` apart), sorted by first appearance."""
    cfg, windows = ctx.config, {}
    for entity in ctx.transcript.entities:
        window = appearance_window(ctx.transcript, entity)
        if window is not None:
            windows[entity.expression] = (entity, window)
    candidates = list(windows.values())
    ctx.rng.shuffle(candidates)
    chosen: list[tuple[TranscriptEntity, tuple[float, float]]] = []
    for entity, (lo, hi) in candidates:
        if all(hi + cfg.min_order_gap_s <= c_lo or c_hi + cfg.min_order_gap_s <= lo for _, (c_lo, c_hi) in chosen):
            chosen.append((entity, (lo, hi)))
        if len(chosen) == cfg.order_entities:
            break
    return [e for e, _ in sorted(chosen, key=lambda c: c[1][0])]


def type5(ctx: _Context) -> list[Instruction]:
    """One multiple-choice question per video: which option lists the entities in first-appearance order.
    The distractors are other orders of the same entities; the options are distinct."""
    cfg, rng = ctx.config, ctx.rng
    ordered = first_appearance_order(ctx)
    if len(ordered) < cfg.min_order_entities:
        ctx.stats.count("instructions_type5_too_few_entities")
        return []
    names = [name(e) for e in ordered]
    n_options = min(cfg.order_options, _factorial(len(names)))
    correct = tuple(range(len(names)))
    orders = [correct, *_other_orders(len(names), n_options - 1, rng)]
    rng.shuffle(orders)
    options = [", ".join(names[i] for i in order) for order in orders]
    letter = LETTERS[orders.index(correct)]
    question = with_options(rng.choice(ORDER_QUESTIONS), options)
    return [_make(ctx, 5, "language", question, f"({letter})", None, form="multiple_choice", options=options,
                  answer_letter=letter, entities=[e.expression for e in ordered])]


def _factorial(n: int) -> int:
    out = 1
    for k in range(2, n + 1):
        out *= k
    return out


def _other_orders(n: int, k: int, rng: random.Random) -> list[tuple[int, ...]]:
    """k distinct permutations of range(n), none the identity."""
    identity = tuple(range(n))
    if n <= 5:
        return rng.sample([p for p in itertools.permutations(range(n)) if p != identity], k)
    out: list[tuple[int, ...]] = []
    while len(out) < k:
        p = list(identity)
        rng.shuffle(p)
        if tuple(p) != identity and tuple(p) not in out:
            out.append(tuple(p))
    return out


def type6(ctx: _Context) -> list[Instruction]:
    """What an entity is doing between two timestamps: for each entity and each clip, a range of 1 to
    `max_range_clips` consecutive clips starting there. The answer joins its descriptions in those clips, or
    says it is not seen there."""
    out, rng, t = [], ctx.rng, ctx.transcript
    clips = t.clips
    for entity in t.entities:
        for i in range(len(clips)):
            n = rng.randint(1, min(ctx.config.max_range_clips, len(clips) - i))
            span = clips[i : i + n]
            seen = [entity.observation(c.clip_index) for c in span]
            if any(o is None for o in seen) or any(o.present and not (o.description or "").strip() for o in seen):
                continue  # unknown or undescribed somewhere in the range: no answer to give
            start, end = span[0].start_time, min(span[-1].end_time, t.duration_s)
            slots = {"e": name(entity), "t0": format_timestamp(start), "t1": format_timestamp(end, round_down=True)}
            described = [_sentence(o.description) for o in seen if o.present]
            answer = " ".join(described) if described else rng.choice(RANGE_ABSENT_ANSWERS).format(**slots)
            question = rng.choice(RANGE_QUESTIONS).format(**slots)
            out.append(_make(ctx, 6, "language", question, answer, entity))
            out += _mask_version(ctx, 6, entity, RANGE_MASK_QUESTIONS, answer, t0=slots["t0"], t1=slots["t1"])
    return out


GENERATORS: dict[int, Callable[[_Context], list[Instruction]]] = {
    1: type1, 2: type2, 3: type3, 4: type4, 5: type5, 6: type6,
}


def template_instructions(transcript: TranscriptInput, config: InstructionConfig | None = None,
                          stats: Stats | None = None) -> list[Instruction]:
    """Types `config.template_types` of one video, each drawn with its own generator seeded from the seed, the
    video id and the type; with `max_per_type`, a random subset of that many per type and referring."""
    config = config or InstructionConfig()
    stats = stats if stats is not None else Stats()
    out: list[Instruction] = []
    for task_type in sorted(config.template_types):
        rng = rng_for(config.seed, transcript.video_id, f"type{task_type}")
        made = GENERATORS[task_type](_Context(transcript, config, rng, stats))
        if config.max_per_type is not None:
            made = _cap(made, config.max_per_type, rng)
        out.extend(made)
    return out


def _cap(instructions: list[Instruction], limit: int, rng: random.Random) -> list[Instruction]:
    keep: list[int] = []
    for referring in ("language", "mask"):
        idx = [i for i, ins in enumerate(instructions) if ins.referring == referring]
        keep += idx if len(idx) <= limit else rng.sample(idx, limit)
    return [instructions[i] for i in sorted(keep)]


__all__ = [
    "GENERATORS", "appearance_window", "content_words", "entity_kind", "first_appearance_order", "head_word",
    "mask_question", "referents", "template_instructions",
]
