"""Strefer's Instruction Generator: timecodes, template types 1-6, LLM types 7-11 with a scripted fake chat
model, groups of Table 1, and the samples it writes."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from agents.common import Failure
from agents.instruction_generator import InstructionGenerator, llm_schema
from agents.instruction_records import (
    GROUPS,
    MASK_PREFIX,
    Instruction,
    InstructionConfig,
    TranscriptInput,
    first_appearance,
    group_of,
    scope_frames,
    to_samples,
)
from agents.instruction_templates import (
    ABSENT_ANSWERS,
    entity_kind,
    head_word,
    BEHAVIOUR_QUESTIONS,
    PRESENCE_QUESTIONS,
    RANGE_QUESTIONS,
    YES_NO_QUESTIONS,
    template_instructions,
)
from agents.timecodes import (
    find_timestamps,
    format_timestamp,
    from_temporal_token,
    parse_timestamp,
    timestamps_to_tokens,
    to_temporal_token,
    token_index,
)
from engine.stats import Stats
from schemas.records import Assignment, FrameMask, MaskletRecord, Provenance, Rle
from tests.fakes import FakeChat

PROVENANCE = Provenance(engine_version="test", profile="tiny", models={"llm": "fake/chat"}, config_hash="cfg")


def all_text(request) -> str:
    return "\n".join(p for m in request.messages for p in m.content if isinstance(p, str))


def first_prompt(request) -> str:
    return " ".join(p for p in request.messages[0].content if isinstance(p, str))


# -- hand-written transcripts -----------------------------------------------------------------------------------

GIRL, DOG, MAN = "girl in a white dress", "brown dog", "man in a black suit"


def obs(*entries):
    """(clip_index, description or None for absent) -> observations."""
    return [{"clip_index": i, "present": d is not None, "description": d} for i, d in entries]


def park(video_id: str = "park", duration: float = 30.0, end: float | None = None) -> TranscriptInput:
    """Three clips of 10 s; the girl leaves in the middle clip, the dog arrives there, the man (no masklet)
    only in the last clip."""
    return TranscriptInput(
        video_id=video_id,
        duration_s=duration,
        clips=[(0, 0.0, 10.0), (1, 10.0, 20.0), (2, 20.0, duration if end is None else end)],
        entities=[
            {"expression": GIRL, "noun": "girl", "masklet_id": "m-girl", "first_appearance_time": 1.0,
             "mask_clips": [0, 2], "clips": obs((0, "The girl waves at the camera."), (1, None), (2, "She sits down on a bench"))},
            {"expression": DOG, "noun": "dog", "masklet_id": "m-dog", "first_appearance_time": 12.0,
             "mask_clips": [1, 2], "clips": obs((0, None), (1, "The dog runs across the lawn."), (2, "The dog barks."))},
            {"expression": MAN, "noun": "person", "masklet_id": None, "first_appearance_time": None,
             "clips": obs((0, None), (1, None), (2, "The man walks in."))},
        ],
    )


def observation(t: TranscriptInput, expression: str, clip_index: int):
    return t.entity(expression).observation(clip_index)


def by_type(instructions, task_type, referring=None):
    return [i for i in instructions if i.task_type == task_type and (referring is None or i.referring == referring)]


# -- timecodes ----------------------------------------------------------------------------------------------------


def test_timestamp_format_and_parse():
    assert format_timestamp(0) == "00:00:00.000"
    assert format_timestamp(19.228) == "00:00:19.228"
    assert format_timestamp(3723.0005) == "01:02:03.001"  # halves round up
    assert format_timestamp(65.5) == "00:01:05.500"
    assert parse_timestamp("00:00:05") == 5.0
    assert parse_timestamp("00:00:12.210") == pytest.approx(12.21)
    assert parse_timestamp("00:00:05.5") == pytest.approx(5.5)
    assert parse_timestamp("01:02:03.004") == pytest.approx(3723.004)
    for seconds in (0.0, 0.001, 7.007, 59.9995, 3599.999, 86399.25):
        assert abs(parse_timestamp(format_timestamp(seconds)) - seconds) <= 0.0005 + 1e-9


@pytest.mark.parametrize("bad", ["5", "0:05", "00:60:00", "00:00:61", "00:00:05.1234", "aa:bb:cc", "", " 00:00"])
def test_parse_timestamp_rejects(bad):
    with pytest.raises(ValueError, match="not a timestamp"):
        parse_timestamp(bad)


@pytest.mark.parametrize("bad", [-0.001, math.nan, math.inf, "5", None])
def test_format_timestamp_rejects(bad):
    with pytest.raises(ValueError):
        format_timestamp(bad)


def test_temporal_tokens_follow_the_paper():
    # A.3.4: 19.228 s of a 90 s video with 32 tokens -> 19.228 / 90 * 32 ≈ 6.84 -> <7>; with M = 31, 6.62 -> <7>.
    assert to_temporal_token(19.228, 90.0, m=32) == "<7>"
    assert to_temporal_token(19.228, 90.0) == "<7>"
    assert to_temporal_token(0.0, 90.0) == "<0>"
    assert to_temporal_token(90.0, 90.0) == "<31>"
    assert from_temporal_token("<0>", 90.0) == 0.0
    assert from_temporal_token("<31>", 90.0) == 90.0
    assert from_temporal_token("<7>", 62.0) == pytest.approx(14.0)
    assert to_temporal_token(90.0004, 90.0) == "<31>"  # a millisecond-rounded end still counts as the end


@pytest.mark.parametrize("duration", [1.0, 7.3, 40.0, 3600.0])
@pytest.mark.parametrize("m", [1, 7, 31, 100])
def test_temporal_tokens_round_trip_within_one_token(duration, m):
    for k in range(m + 1):
        assert to_temporal_token(from_temporal_token(f"<{k}>", duration, m), duration, m) == f"<{k}>"
    for i in range(0, 1001):
        t = duration * i / 1000
        back = from_temporal_token(to_temporal_token(t, duration, m), duration, m)
        assert abs(back - t) <= duration / (2 * m) + 1e-9  # within half a token either way: one token wide
        # Through the text form too: timestamp -> token -> time stays within one token of the timestamp.
        text = timestamps_to_tokens(f"at {format_timestamp(t)}.", duration, m)
        assert abs(from_temporal_token(text[3:-1], duration, m) - t) <= duration / (2 * m) + 0.001


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: to_temporal_token(-1.0, 10.0), ">= 0"),
        (lambda: to_temporal_token(10.5, 10.0), "past the end"),
        (lambda: to_temporal_token(1.0, 0.0), "duration must be > 0"),
        (lambda: to_temporal_token(1.0, 10.0, m=0), "m .* must be an int >= 1"),
        (lambda: from_temporal_token("<32>", 10.0), "past the last anchor"),
        (lambda: from_temporal_token("7", 10.0), "not a temporal token"),
        (lambda: from_temporal_token("<-1>", 10.0), "not a temporal token"),
        (lambda: timestamps_to_tokens("from 00:00:05.000 to 00:00:12.000", 10.0), "past the end"),
    ],
)
def test_temporal_token_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_timestamps_to_tokens_rewrites_every_timestamp():
    text = "between 00:00:05.000 and 00:00:12.210, not 12:30 pm"
    assert timestamps_to_tokens(text, 40.0) == "between <4> and <9>, not 12:30 pm"
    assert token_index("<9>") == 9
    assert find_timestamps(text) == [5.0, pytest.approx(12.21)]


# -- Table 1 -------------------------------------------------------------------------------------------------------


def test_group_table_matches_table_1():
    expected = {
        "G1": {(1, "language"), (2, "language"), (3, "language"), (4, "language"), (1, "mask")},
        "G2": {(5, "language")},
        "G3": {(7, "language")},
        "G4": {(8, "language"), (9, "language"), (10, "language"), (11, "language")},
        "G5": {(6, "language")},
        "G6": {(7, "mask")},
        "G7": {(8, "mask"), (9, "mask"), (10, "mask"), (11, "mask")},
        "G8": {(6, "mask")},
    }
    got: dict[str, set] = {}
    for key, group in GROUPS.items():
        got.setdefault(group, set()).add(key)
    assert got == expected
    for task_type in (2, 3, 4, 5):  # Table 7: no mask-referring version
        with pytest.raises(ValueError, match="no mask-referring version"):
            group_of(task_type, "mask")


# -- template types -----------------------------------------------------------------------------------------------


def test_transcript_validates_up_front():
    good = park().model_dump()
    for mutate, message in [
        (lambda d: d["clips"].__setitem__(2, (2, 20.0, 31.0)), "clips need 0 <= start < end <= duration_s"),
        (lambda d: d["entities"][1].__setitem__("expression", "The girl in a white dress"), "distinct"),
        (lambda d: d["entities"][0]["clips"].append({"clip_index": 9, "present": True}), "known clips"),
        (lambda d: d["entities"][0].__setitem__("first_appearance_time", 45.0), "outside the video"),
        (lambda d: d["clips"].append((0, 1.0, 2.0)), "clip indexes must be distinct"),
    ]:
        data = copy.deepcopy(good)
        mutate(data)
        with pytest.raises(ValidationError, match=message):
            TranscriptInput.model_validate(data)


def test_type1_describes_present_entities_and_type2_asks_only_about_absent_ones():
    t = park()
    out = template_instructions(t, InstructionConfig(template_types=(1, 2)))
    type1, type2 = by_type(out, 1, "language"), by_type(out, 2)
    # Type 1: every present, described (clip, entity), with the description as the answer.
    assert {(i.clip_index, i.entities[0]) for i in type1} == {(0, GIRL), (1, DOG), (2, GIRL), (2, DOG), (2, MAN)}
    for i in type1:
        o = observation(t, i.entities[0], i.clip_index)
        assert o.present and i.answer.rstrip(".") == o.description.rstrip(".")
        assert i.frames == "clip" and i.span == (t.clip(i.clip_index).start_time, t.clip(i.clip_index).end_time)
    # Type 2: exactly the entities absent from that clip; the answer says it is not seen, with no behaviour.
    assert {(i.clip_index, i.entities[0]) for i in type2} == {(0, DOG), (0, MAN), (1, GIRL), (1, MAN)}
    absent_answers = {a.format(e=e) for a in ABSENT_ANSWERS for e in (GIRL, DOG, MAN)}
    for i in type2:
        assert observation(t, i.entities[0], i.clip_index).present is False
        assert i.answer in absent_answers
        assert i.question in {q.format(e=i.entities[0]) for q in BEHAVIOUR_QUESTIONS}
        assert i.group == "G1" and i.frames == "clip" and i.masklet_ids == []


def test_type3_and_type4_answer_presence():
    t = park()
    out = template_instructions(t, InstructionConfig(template_types=(3, 4)))
    for i in by_type(out, 4):
        present = observation(t, i.entities[0], i.clip_index).present
        assert i.answer == ("Yes." if present else "No.")
        assert '"Yes" or "No"' in i.question
    assert len(by_type(out, 4)) == 9
    for i in by_type(out, 3):
        o = observation(t, i.entities[0], i.clip_index)
        if o.present:
            assert i.answer.startswith("Yes") and o.description.rstrip(".") in i.answer
        else:
            assert not i.answer.startswith("Yes") and "not sure" in i.answer
    assert all(i.group == "G1" and i.form == "open" for i in out)


# Type 5: first appearances A 2.0 s, E 2.2 s (too close to A to be ordered), B 12.5 s, C only from the transcript
# (somewhere in 20-30 s), D 25 s (inside C's window: unordered against C), F never seen.
ORDER_TRUTH = {"red kite": 2.0, "blue ball": 12.5, "old man": 20.0, "small cat": 25.0, "green frisbee": 2.2}


def order_transcript(video_id: str = "order") -> TranscriptInput:
    def entity(name, t, first_clip, masklet=True):
        if first_clip is None:
            clips = obs((0, None), (1, None), (2, None))
        else:
            clips = obs(*((c, f"The {name} moves." if c >= first_clip else None) for c in range(3)))
        return {"expression": name, "noun": name.split()[-1], "masklet_id": f"m-{name}" if masklet else None,
                "first_appearance_time": t, "clips": clips}

    return TranscriptInput(
        video_id=video_id, duration_s=30.0, clips=[(0, 0.0, 10.0), (1, 10.0, 20.0), (2, 20.0, 30.0)],
        entities=[
            entity("red kite", 2.0, 0), entity("blue ball", 12.5, 1), entity("old man", None, 2, masklet=False),
            entity("small cat", 25.0, 2), entity("green frisbee", 2.2, 0), entity("ghost", None, None, masklet=False),
        ],
    )


def parse_options(question: str) -> list[str]:
    return [line[4:] for line in question.splitlines() if re.match(r"^\([A-H]\) ", line)]


def test_type5_correct_answer_is_the_first_appearance_order_and_options_are_distinct_permutations():
    seen_sets = set()
    letters = set()
    for seed in range(40):
        out = template_instructions(order_transcript(), InstructionConfig(seed=seed, template_types=(5,)))
        (ins,) = out
        assert ins.task_type == 5 and ins.group == "G2" and ins.form == "multiple_choice" and ins.frames == "video"
        options = parse_options(ins.question)
        assert options == ins.options and len(options) == 4
        orders = [o.split(", ") for o in options]
        assert len({tuple(o) for o in orders}) == 4  # distinct
        assert all(sorted(o) == sorted(orders[0]) for o in orders)  # permutations of one set
        chosen = orders[0]
        assert len(chosen) == 3 and "ghost" not in chosen
        assert not {"red kite", "green frisbee"} <= set(chosen)  # too close to order
        assert not {"old man", "small cat"} <= set(chosen)  # C's window holds D's time
        correct = sorted(chosen, key=ORDER_TRUTH.__getitem__)
        assert ins.answer == f"({ins.answer_letter})"
        assert orders["ABCDEFGH".index(ins.answer_letter)] == correct
        seen_sets.add(frozenset(chosen))
        letters.add(ins.answer_letter)
    assert len(seen_sets) == 4  # every combination of {A|E} x {B} x {C|D} comes up across seeds
    assert len(letters) >= 3  # the correct option is not always in one place


def test_type5_needs_enough_ordered_entities_and_first_appearance_comes_from_masklets():
    stats = Stats()
    assert template_instructions(park(), InstructionConfig(template_types=(5,), min_order_entities=3), stats) != []
    # The transcript says the dog is there from clip 0 while its masklet starts at 12 s: its first appearance is
    # uncertain (0-12 s) and overlaps the girl's, so only two entities can be ordered.
    t = park().model_dump()
    t["entities"][1]["clips"][0] = {"clip_index": 0, "present": True, "description": "The dog sleeps."}
    uncertain = TranscriptInput.model_validate(t)
    assert template_instructions(uncertain, InstructionConfig(template_types=(5,)), stats) == []
    assert stats.counters["instructions_type5_too_few_entities"] == 1

    masklet = MaskletRecord(
        masklet_id="m", video_id="v", expression="dog", noun="dog", method="strefer", start_frame=10, start_time=1.0,
        detector_score=0.9, detector_box=[0, 0, 1, 1],
        assignment=Assignment(method="sole-candidate", candidate_index=0, num_candidates=1, score=1.0),
        num_frames_tracked=20,
        frames=[FrameMask(frame_index=f, timestamp=f / 10, rle=Rle(size=[2, 2], counts="04"), box=[0, 0, 1, 1])
                for f in (14, 7, 9)],
        provenance=PROVENANCE,
    )
    assert first_appearance(masklet) == pytest.approx(0.7)


def test_type6_ranges_are_inside_the_video_on_clip_boundaries_and_say_when_absent():
    # The last clip ends a fraction of a millisecond past the duration (rounding upstream): ranges still end inside.
    t = park(duration=29.9996, end=30.0)
    bounds = {0.0, 10.0, 20.0, 29.9996}
    for seed in range(10):
        out = template_instructions(t, InstructionConfig(seed=seed, template_types=(6,)))
        assert len(by_type(out, 6, "language")) == 9  # every entity from every clip
        for i in out:
            start, end = find_timestamps(i.question)
            assert 0 <= start < end <= t.duration_s
            assert any(abs(start - b) < 0.001 for b in bounds) and any(abs(end - b) < 0.001 for b in bounds)
            assert i.group == ("G5" if i.referring == "language" else "G8") and i.frames == "video"
            assert i.span == (0.0, t.duration_s)
            entity = t.entity(i.entities[0])
            inside = [c for c in t.clips if c.start_time >= start - 0.001 and c.end_time <= end + 0.002]
            described = [entity.observation(c.clip_index).description for c in inside
                         if entity.observation(c.clip_index).present]
            if described:
                assert all(d.rstrip(".") in i.answer for d in described)
            else:
                assert any(w in i.answer for w in ("not visible", "does not appear", "don't see"))
                assert entity.expression in i.answer
            # The token form: the same text with <k> tokens that map back within one token.
            tokens = re.findall(r"<(\d+)>", i.temporal_tokens.question)
            assert len(tokens) == 2 and not find_timestamps(i.temporal_tokens.question)
            for k, seconds in zip(tokens, (start, end)):
                assert abs(from_temporal_token(f"<{k}>", t.duration_s) - seconds) <= t.duration_s / 62 + 0.001


def test_templates_are_deterministic_for_a_seed_and_vary_across_seeds():
    def questions(seed, video_id="park"):
        return [i.model_dump() for i in template_instructions(park(video_id), InstructionConfig(seed=seed))]

    assert questions(3) == questions(3)
    assert questions(3) != questions(4)
    assert questions(3) != questions(3, video_id="other")  # the video id seeds too
    # Every family shows at least three phrasings over a few seeds.
    used = {n: set() for n in (1, 3, 4, 6)}
    pools = {1: BEHAVIOUR_QUESTIONS, 3: PRESENCE_QUESTIONS, 4: YES_NO_QUESTIONS, 6: RANGE_QUESTIONS}
    for seed in range(12):
        for i in template_instructions(park(), InstructionConfig(seed=seed)):
            if i.task_type in used and i.referring == "language":
                (k,) = [k for k, p in enumerate(pools[i.task_type]) if phrasing_matches(p, i.question)]
                used[i.task_type].add(k)
    assert all(len(v) >= 3 for v in used.values()), used


def test_max_per_type_samples_a_subset():
    full = template_instructions(park(), InstructionConfig())
    capped = template_instructions(park(), InstructionConfig(max_per_type=2))
    for n in range(1, 7):
        for referring in ("language", "mask"):
            assert len(by_type(capped, n, referring)) == min(2, len(by_type(full, n, referring)))
    assert {i.instruction_id for i in capped} <= {i.instruction_id for i in full}


def phrasing_matches(phrasing: str, text: str) -> bool:
    pattern = re.sub(r"\\\{[a-zA-Z0-9]+\\\}", ".+", re.escape(phrasing))
    return re.fullmatch(pattern, text) is not None


def _giveaway_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2} - {"the", "and", "with", "her", "his"}


def test_mask_referring_questions_start_with_the_sentence_and_hide_the_entity():
    t = park().model_dump()
    t["entities"].append(
        {"expression": "person doing a handstand", "noun": "person", "masklet_id": "m-hand",
         "first_appearance_time": 21.0, "mask_clips": [2], "clips": obs((0, None), (1, None), (2, "The person flips over."))}
    )
    t = TranscriptInput.model_validate(t)
    stats = Stats()
    masked = []
    for seed in range(6):
        masked += [i for i in template_instructions(t, InstructionConfig(seed=seed), stats) if i.referring == "mask"]
    assert {i.task_type for i in masked} == {1, 6}
    assert {i.entities[0] for i in masked} == {GIRL, DOG, "person doing a handstand"}  # never the man: no masklet
    for i in masked:
        entity = t.entity(i.entities[0])
        assert i.question.startswith(MASK_PREFIX + " ")
        assert i.question.count("<region>") == 1 and i.masklet_ids == [entity.masklet_id]
        body = i.question.lower()
        assert entity.expression not in body and entity.noun not in body
        assert not _giveaway_words(entity.expression) & set(re.findall(r"[a-z]+", body))
        assert i.group == {1: "G1", 6: "G8"}[i.task_type]
    # The handstand person: "doing" and "person" are its own words, so those phrasings are avoided.
    hand = [i for i in masked if i.entities[0] == "person doing a handstand"]
    assert hand and all("doing" not in i.question and "person" not in i.question for i in hand)
    # The language versions name the entity.
    for i in template_instructions(t, InstructionConfig(template_types=(1,))):
        if i.referring == "language":
            assert i.entities[0].split()[0] in i.question and not i.masklet_ids
    off = template_instructions(t, InstructionConfig(mask_versions=False))
    assert not [i for i in off if i.referring == "mask"]


@pytest.mark.parametrize(
    "expression, noun, kind, head",
    [
        ("bride in a white gown", "person", "female", "bride"),
        ("man holding a girl's hand", "person", "male", "man"),
        ("child riding a tricycle", "child", "person", "child"),
        ("brown dog", "dog", "animal", "dog"),
        ("parrot on a perch", "bird", "animal", "parrot"),
        ("red kite", "kite", "object", "kite"),
        ("women dancing", "person", "female", "women"),
    ],
)
def test_pronoun_rules_follow_the_head_noun(expression, noun, kind, head):
    assert head_word(expression) == head
    assert entity_kind(expression, noun) == kind


def test_from_transcript_joins_the_transcriber_output_with_masklets():
    from agents.transcriber import ClipEntry, EntityTranscript, Transcript

    def entry(i, start, end, description):
        return ClipEntry(clip_index=i, start_time=start, end_time=end, present=description is not None,
                         description=description, raw_presence="Yes" if description else "No")

    transcript = Transcript(video_id="v1", entities=[
        EntityTranscript(expression="bride in white",
                         clips=[entry(0, 0.0, 4.0, None), entry(1, 4.0, 9.0, "She dances.")]),
        EntityTranscript(expression="red kite",
                         clips=[entry(0, 0.0, 4.0, "It flies."), entry(1, 4.0, 9.0, None)]),
    ])
    masklet = MaskletRecord(
        masklet_id="m-bride", video_id="v1", expression="Bride in white", noun="person", method="strefer",
        start_frame=50, start_time=5.0, detector_score=0.9, detector_box=[0, 0, 1, 1],
        assignment=Assignment(method="grounder", candidate_index=0, num_candidates=2, score=1.0),
        num_frames_tracked=40,
        frames=[FrameMask(frame_index=f, timestamp=f / 10, rle=Rle(size=[2, 2], counts="04"), box=[0, 0, 1, 1])
                for f in (45, 50, 60)],
        provenance=PROVENANCE,
    )
    t = TranscriptInput.from_transcript(transcript, duration_s=9.0, masklets=[masklet])
    assert t.clips == [(0, 0.0, 4.0), (1, 4.0, 9.0)] and t.duration_s == 9.0
    bride, kite = t.entities
    assert (bride.noun, bride.masklet_id, bride.first_appearance_time) == ("person", "m-bride", pytest.approx(4.5))
    assert (kite.noun, kite.masklet_id, kite.first_appearance_time) == ("red kite", None, None)
    assert bride.observation(1).description == "She dances." and bride.observation(0).present is False
    assert (bride.mask_clips, kite.mask_clips) == ([1], [])  # masks at 4.5-6.0 s: the second clip only
    out = template_instructions(t, InstructionConfig(template_types=(1,)))
    (masked,) = [i for i in out if i.referring == "mask"]
    assert masked.masklet_ids == ["m-bride"] and masked.entities == ["bride in white"]


def test_generator_counts_types_and_groups():
    stats = Stats()
    out = InstructionGenerator(stats=stats).from_templates(park())
    for n in range(1, 7):
        assert stats.counters[f"instructions_type{n}"] == len(by_type(out, n)) > 0
    for g in ("G1", "G2", "G5", "G8"):
        assert stats.counters[f"instructions_group_{g}"] == sum(i.group == g for i in out) > 0
    assert len({i.instruction_id for i in out}) == len(out)


# -- samples -------------------------------------------------------------------------------------------------------


def test_a_timed_instruction_gives_one_sample_per_time_format():
    out = template_instructions(park(), InstructionConfig(template_types=(6,)))
    ins = next(i for i in out if i.referring == "mask")
    stamp, tokens = to_samples(ins, source="park.mp4", provenance=PROVENANCE, frames=[1, 2])
    assert stamp.data_type == "strefer" and stamp.pipeline == "strefer" and stamp.task == "type6"
    assert stamp.labels["group"] == "G8" and stamp.labels["form"] == "open"
    assert stamp.labels["time_format"] == "timestamp" and stamp.labels["referring"] == "mask"
    assert "temporal_tokens" not in stamp.labels and tokens.labels["temporal_tokens"] == "32"
    assert [t.role for t in stamp.conversation] == ["human", "gpt"]
    assert stamp.conversation[0].value == "<video>\n" + ins.question and stamp.conversation[1].value == ins.answer
    assert stamp.masklet_ids == ins.masklet_ids == ["m-girl"]
    assert stamp.frames == [1, 2] and stamp.video_id == "park" and stamp.window is None
    assert stamp.refers_to == tokens.refers_to == ["mask", "timestamp"]
    assert tokens.labels["time_format"] == "tokens" and tokens.sample_id != stamp.sample_id
    assert tokens.conversation[0].value == "<video>\n" + ins.temporal_tokens.question
    assert not find_timestamps(tokens.conversation[0].value) and re.search(r"<\d+>", tokens.conversation[0].value)
    (again,) = to_samples(ins, source="park.mp4", provenance=PROVENANCE, time_formats=("timestamp",))
    assert again.sample_id == stamp.sample_id
    with pytest.raises(ValueError, match="time_formats"):
        to_samples(ins, source="x", provenance=PROVENANCE, time_formats=("seconds",))


def test_a_time_free_instruction_gives_one_sample_whatever_the_formats():
    ins = by_type(template_instructions(park(), InstructionConfig(template_types=(1,))), 1, "mask")[0]
    assert ins.question == ins.temporal_tokens.question and ins.answer == ins.temporal_tokens.answer
    ids = set()
    for formats in (("timestamp", "tokens"), ("tokens",), ("timestamp",)):
        (sample,) = to_samples(ins, source="park.mp4", provenance=PROVENANCE, time_formats=formats)
        assert "time_format" not in sample.labels and "temporal_tokens" not in sample.labels
        assert sample.refers_to == ["mask"]
        ids.add(sample.sample_id)
    assert len(ids) == 1  # the id does not depend on the time formats


def test_refers_to_says_what_the_text_points_at():
    out = InstructionGenerator(FakeChat([json.dumps(valid_answer())])).generate([park()])[0].instructions
    kinds = {}
    for i in out:
        (sample, *_) = to_samples(i, source="park.mp4", provenance=PROVENANCE)
        kinds.setdefault((i.task_type, i.referring), set()).add(tuple(sample.refers_to))
    assert kinds[(7, "language")] == {("timestamp",)} and kinds[(7, "mask")] == {("mask", "timestamp")}  # G3, G6
    assert kinds[(8, "mask")] == kinds[(9, "mask")] == {("mask", "coarse_time")}  # G7: mask and a coarse time
    assert kinds[(10, "language")] == {("event",)} and kinds[(11, "mask")] == {("mask", "event")}
    assert kinds[(6, "language")] == {("timestamp",)} and kinds[(6, "mask")] == {("mask", "timestamp")}
    assert kinds[(1, "language")] == kinds[(4, "language")] == kinds[(5, "language")] == {()}


def test_scope_frames_spread_over_a_frame_range():
    assert scope_frames(0, 31, count=8) == [0, 4, 9, 13, 17, 21, 26, 30]
    assert scope_frames(31, 62, count=40) == list(range(31, 62))  # never frame 62, the next clip's first
    assert scope_frames(5, 6, count=3) == [5] and scope_frames(10, 20, count=1) == [14]
    with pytest.raises(ValueError, match="start_frame < end_frame"):
        scope_frames(10, 10)


def test_a_type1_mask_version_needs_a_mask_in_its_clip():
    t = park().model_dump()
    t["entities"][1]["mask_clips"] = [2]  # the dog's masklet misses clip 1, where the transcript sees it
    stats = Stats()
    out = template_instructions(TranscriptInput.model_validate(t), InstructionConfig(template_types=(1,)), stats)
    masked = {(i.entities[0], i.clip_index) for i in out if i.referring == "mask"}
    assert masked == {(GIRL, 0), (GIRL, 2), (DOG, 2)}
    assert {(i.entities[0], i.clip_index) for i in out if i.referring == "language"} >= {(DOG, 1)}
    assert stats.counters["instructions_mask_skipped_not_in_clip"] == 1
    t["entities"][1]["mask_clips"] = [5]
    with pytest.raises(ValidationError, match="mask_clips"):
        TranscriptInput.model_validate(t)


def test_instruction_rejects_inconsistent_fields():
    ins = by_type(template_instructions(park(), InstructionConfig(template_types=(1,))), 1, "mask")[0]
    data = ins.model_dump()
    for change, message in [
        ({"group": "G3"}, "group"),
        ({"masklet_ids": []}, "<region>"),
        ({"frames": "video"}, "clip"),
        ({"form": "multiple_choice"}, "options"),
    ]:
        with pytest.raises(ValidationError, match=message):
            Instruction.model_validate({**data, **change})


# -- LLM types 7-11 ------------------------------------------------------------------------------------------------


def q(task_type, form="open", *, question, answer, options=(), coarse=None, relation=None, entities=(),
      mask_entity=None, mask_question=None):
    return {"task_type": task_type, "form": form, "question": question, "answer": answer, "options": list(options),
            "coarse_range": coarse, "relation": relation, "entities": list(entities), "mask_entity": mask_entity,
            "mask_question": None if mask_question is None else f"{MASK_PREFIX} {mask_question}"}


def valid_answer(dog: str = DOG) -> dict:
    """Two questions (open, multiple choice) of each type 7-11 about `park()`."""
    return {"questions": [
        q(7, question=f"What does the {dog} do between 00:00:10 and 00:00:20.000?",
          answer="The dog runs across the lawn.", entities=[dog], mask_entity=dog,
          mask_question="What does it do between 00:00:10.000 and 00:00:20.000?"),
        q(7, "multiple_choice", question="What happens between 00:00:20.000 and 00:00:30.000?",
          answer="The man walks in.", options=["The girl waves.", "The man walks in.", "The dog sleeps."]),
        q(8, question=f"What does the {GIRL} do in the beginning of the video?", answer="She waves at the camera.",
          coarse="beginning", entities=[GIRL], mask_entity=GIRL,
          mask_question="What does she do in the beginning of the video?"),
        q(8, "multiple_choice", question="What happens at the end of the video?", answer="The man walks in.",
          options=["The man walks in.", "The girl waves.", "The dog runs."], coarse="end"),
        q(9, question=f"During which part of the video does the {dog} run across the lawn?", answer="The middle.",
          coarse="middle", entities=[dog], mask_entity=dog,
          mask_question="During which part of the video does this animal run across the lawn?"),
        q(9, "multiple_choice", question=f"When does the {MAN} walk in?", answer="The end.",
          options=["The beginning.", "The middle.", "The end."], coarse="end", entities=[MAN]),
        q(10, question=f"What is the {dog} doing while the {MAN} walks in?", answer="The dog barks.",
          relation="during", entities=[dog, MAN], mask_entity=dog,
          mask_question=f"What is it doing while the {MAN} walks in?"),
        q(10, "multiple_choice", question=f"What does the {GIRL} do after the {dog} runs across the lawn?",
          answer="She sits down on a bench.", options=["She sits down on a bench.", "She waves.", "She runs."],
          relation="after", entities=[GIRL, dog]),
        q(11, question=f"Who walks in while the {dog} barks?", answer=f"The {MAN}.", relation="during",
          entities=[MAN, dog], mask_entity=dog, mask_question="Who walks in while this animal barks?"),
        q(11, "multiple_choice", question="Who waves at the camera before the dog arrives?", answer=f"The {GIRL}.",
          options=[f"The {GIRL}.", f"The {MAN}.", f"The {dog}."], relation="before", entities=[GIRL, dog]),
    ]}


def videos(n: int) -> list[TranscriptInput]:
    """`n` videos, told apart in the prompt by the dog's name."""
    out = []
    for k in range(n):
        data = park(f"video{k}").model_dump()
        data["entities"][1]["expression"] = f"brown dog {k}"
        out.append(TranscriptInput.model_validate(data))
    return out


def by_dog(answers: dict[int, str | list[str]]):
    """A FakeChat function answering each video (found by its dog's name in the prompt) from `answers`; a list
    is consumed one answer per attempt."""
    def fn(request):
        k = int(re.search(r'"brown dog (\d+)"', first_prompt(request)).group(1))
        answer = answers[k]
        return answer.pop(0) if isinstance(answer, list) else answer
    return fn


def test_llm_types_from_one_batched_call_for_several_videos():
    ts = videos(3)
    llm, stats = FakeChat(fn=by_dog({k: json.dumps(valid_answer(f"brown dog {k}")) for k in range(3)})), Stats()
    results = InstructionGenerator(llm, stats=stats).from_llm(ts)
    assert llm.batch_sizes == [3]  # one request per video, one backend call
    assert stats.counters["instruction_llm_backend_calls"] == 1
    assert llm.requests[0].json_schema is not None
    prompt = first_prompt(llm.requests[0])
    assert "[00:00:10.000 - 00:00:20.000]" in prompt and "The dog runs across the lawn." in prompt
    assert '"brown dog 0" (has a mask)' in prompt and f'"{MAN}"\n' in prompt
    for t, out in zip(ts, results):
        assert isinstance(out, list)
        language, mask = [i for i in out if i.referring == "language"], [i for i in out if i.referring == "mask"]
        assert sorted((i.task_type, i.form) for i in language) == sorted(
            itertools.product(range(7, 12), ("multiple_choice", "open")))
        assert {(i.task_type, i.group) for i in language} == {(7, "G3"), (8, "G4"), (9, "G4"), (10, "G4"), (11, "G4")}
        assert sorted(i.task_type for i in mask) == [7, 8, 9, 10, 11]
        assert {(i.task_type, i.group) for i in mask} == {(7, "G6"), (8, "G7"), (9, "G7"), (10, "G7"), (11, "G7")}
        for i in out:
            assert i.source == "llm" and i.frames == "video" and i.video_id == t.video_id
            assert all(t.entity(e) is not None for e in i.entities)
            if i.referring == "mask":
                assert i.question.startswith(MASK_PREFIX) and i.question.count("<region>") == 1
            if i.form == "multiple_choice":
                assert parse_options(i.question) == i.options and len(set(i.options)) == len(i.options)
                assert i.answer == f"({i.answer_letter})"
        # Type 7: times normalized to HH:MM:SS.xxx, the token copy with tokens.
        t7 = next(i for i in language if i.task_type == 7 and i.form == "open")
        assert "between 00:00:10.000 and 00:00:20.000" in t7.question
        assert t7.temporal_tokens.question.endswith("between <10> and <21>?")
        mc9 = next(i for i in language if i.task_type == 9 and i.form == "multiple_choice")
        assert mc9.options["ABCDEFGH".index(mc9.answer_letter)] == "The end."
        dog_masks = [i for i in mask if i.task_type in (7, 9, 10, 11)]
        assert all(i.masklet_ids == ["m-dog"] for i in dog_masks)
        assert next(i for i in mask if i.task_type == 8).masklet_ids == ["m-girl"]
    assert stats.counters["instructions_type7"] == 3 * 3 and stats.counters["instructions_group_G7"] == 3 * 4
    assert stats.counters["instruction_llm_failed"] == 0


def _mutated(change) -> str:
    answer = valid_answer("brown dog 0")
    change(answer["questions"])
    return json.dumps(answer)


ADVERSARIAL = {
    "range_outside_video": (
        lambda qs: qs[0].update(question="What does the brown dog 0 do between 00:00:10.000 and 00:00:45.000?"),
        "after the video ends"),
    "range_reversed": (
        lambda qs: qs[0].update(question="What does the brown dog 0 do between 00:00:20.000 and 00:00:10.000?"),
        "time range"),
    "loose_time": (lambda qs: qs[2].update(answer="She waves at 0:05."), "HH:MM:SS.xxx"),
    "unknown_entity": (lambda qs: qs[5].update(entities=["purple dragon"]), "purple dragon"),
    "duplicate_options": (
        lambda qs: qs[1].update(options=["The man walks in.", "the man walks in", "The dog sleeps."]), "distinct"),
    "answer_not_an_option": (lambda qs: qs[3].update(answer="Nobody comes."), "exactly one of the options"),
    "bad_coarse_range": (lambda qs: qs[2].update(coarse_range="start"), "coarse_range"),
    "type_out_of_range": (lambda qs: qs[0].update(task_type=6), "task_type"),
    "mask_on_entity_without_masklet": (
        lambda qs: qs[5].update(mask_entity=MAN, mask_question=f"{MASK_PREFIX} When does he walk in?"),
        "has no mask"),
    "mask_question_names_entity": (
        lambda qs: qs[4].update(mask_question=f"{MASK_PREFIX} When does the brown dog 0 run?"), "replace its words"),
    "mask_question_without_prefix": (lambda qs: qs[4].update(mask_question="When does it run?"), "must start with"),
    "region_in_language_question": (lambda qs: qs[9].update(question="Who waves at <region>?"), "<region>"),
    "missing_question": (lambda qs: qs.pop(), "at least 10 items"),
    "wrong_mix_of_types": (lambda qs: qs.__setitem__(9, dict(qs[8])), "type 11 has 2 open"),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_llm_invalid_answers_are_retried_then_failed_with_raw_answers(name):
    change, message = ADVERSARIAL[name]
    bad = _mutated(change)
    llm, stats = FakeChat(fn=lambda _: bad), Stats()
    (result,) = InstructionGenerator(llm, InstructionConfig(retries=2), stats).from_llm(videos(1))
    assert isinstance(result, Failure) and result.reason == "invalid_answer"
    assert message in result.detail
    assert result.raw == (bad, bad, bad) and result.raw_answer == bad
    assert llm.batch_sizes == [1, 1, 1]
    retry = llm.batches[-1][0]
    assert retry.messages[-2].content == (bad,) and "not valid" in all_text(retry)  # shown its answer and error
    assert stats.counters["instruction_llm_failed"] == 1
    assert not any(k.startswith("instructions_type") for k in stats.counters)


def test_llm_invalid_json_is_repaired_on_retry_and_one_failure_does_not_sink_the_batch():
    ts = videos(3)
    good = {k: json.dumps(valid_answer(f"brown dog {k}")) for k in range(3)}
    broken = _mutated(ADVERSARIAL["unknown_entity"][0]).replace("brown dog 0", "brown dog 2")
    llm, stats = FakeChat(fn=by_dog({0: ["not json {", good[0]], 1: good[1], 2: [broken, broken, broken]})), Stats()
    results = InstructionGenerator(llm, InstructionConfig(retries=2), stats).from_llm(ts)
    assert llm.batch_sizes == [3, 2, 1]  # every round one batch; only the invalid ones asked again
    assert isinstance(results[0], list) and isinstance(results[1], list)
    assert isinstance(results[2], Failure) and results[2].raw == (broken,) * 3
    assert stats.counters["instruction_llm_failed"] == 1
    assert stats.counters["instructions_group_G3"] == 2 * 2


def test_generate_keeps_template_types_when_the_llm_fails_and_skips_empty_transcripts():
    empty = TranscriptInput(video_id="empty", duration_s=5.0, clips=[(0, 0.0, 5.0)], entities=[
        {"expression": "cat", "noun": "cat", "clips": obs((0, None))}])
    ts = [videos(1)[0], empty]
    llm, stats = FakeChat(fn=lambda _: "{}"), Stats()
    results = InstructionGenerator(llm, InstructionConfig(retries=1), stats).generate(ts)
    assert llm.batch_sizes == [1, 1]  # the empty transcript is never asked
    assert results[0].failure is not None and results[0].failure.raw == ("{}", "{}")
    assert {i.task_type for i in results[0].instructions} == {1, 2, 3, 4, 5, 6}
    assert results[1].failure.reason == "empty_transcript"
    assert stats.counters["instruction_llm_skipped_empty"] == 1 and stats.counters["instruction_llm_failed"] == 1
    with pytest.raises(ValueError, match="needs an llm"):
        InstructionGenerator().from_llm(ts)


def test_llm_schema_counts_types_and_forms():
    schema = llm_schema((7, 8), 1, 0, 400, 600)
    one = [valid_answer()["questions"][0], valid_answer()["questions"][2]]
    assert len(schema.model_validate({"questions": one}).questions) == 2
    with pytest.raises(ValidationError, match="type 7 has 2 open"):
        schema.model_validate({"questions": [one[0], one[0]]})
    config = InstructionConfig(llm_types=(9,), open_per_type=0, choice_per_type=1)
    llm = FakeChat([json.dumps({"questions": [valid_answer()["questions"][5]]})])
    (out,) = InstructionGenerator(llm, config).from_llm([park()])
    assert [(i.task_type, i.form, i.referring) for i in out] == [(9, "multiple_choice", "language")]
    assert "1 multiple-choice question(s)" in first_prompt(llm.requests[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"template_types": (0, 1)}, "template_types"),
        ({"llm_types": (7, 7)}, "llm_types"),
        ({"min_order_entities": 1}, "min_order_entities"),
        ({"open_per_type": 0, "choice_per_type": 0}, "sum >= 1"),
        ({"retries": -1}, "retries"),
        ({"max_per_type": 0}, "max_per_type"),
    ],
)
def test_config_says_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InstructionConfig(**kwargs)


def test_generator_asks_with_the_prompt_it_names(tmp_path, monkeypatch):
    import prompts
    from prompts import render, template_hash

    (name,) = InstructionGenerator.prompts
    llm = FakeChat([json.dumps(valid_answer())])
    InstructionGenerator(llm).from_llm([park()])
    # The request is exactly that template rendered with this video's transcript (what provenance hashes).
    text = first_prompt(llm.requests[0])
    assert text.startswith("You write question-answer pairs about one video")
    assert "The video lasts 00:00:30.000" in text and f'- "{GIRL}" (has a mask), first seen at 00:00:01.000' in text
    assert f'- "{MAN}"\n' in text and f"- {DOG}: not visible" in text and "- The dog runs across the lawn." not in text
    assert text == render(name, **InstructionGenerator()._prompt_variables(park()))
    # Its hash follows the template's content: an edited copy hashes differently.
    original = template_hash(name)
    edited = tmp_path / f"{name}.j2"
    edited.write_text((Path(prompts.__file__).parent / f"{name}.j2").read_text() + "\n")
    monkeypatch.setattr(prompts, "_DIR", tmp_path)
    assert template_hash(name) != original


def test_llm_options_are_shuffled_by_seed_and_the_letter_follows_the_answer():
    answer = json.dumps(valid_answer())
    letters = set()
    for seed in range(8):
        (out,) = InstructionGenerator(FakeChat([answer]), InstructionConfig(seed=seed)).from_llm([park()])
        mc9 = next(i for i in out if i.task_type == 9 and i.form == "multiple_choice" and i.referring == "language")
        assert sorted(mc9.options) == ["The beginning.", "The end.", "The middle."]
        assert mc9.options["ABC".index(mc9.answer_letter)] == "The end."
        letters.add(mc9.answer_letter)
    assert len(letters) >= 2  # the LLM listed the answer third every time; the stored position varies
