"""The Strefer chat agents (Entity Recognizer, Referring Parser, Video Transcriber) with a scripted fake chat model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.analyzer import Failure
from agents.entity_recognizer import EntityRecognizer, RecognizerConfig
from agents.referring_parser import ParsedEntity, ParserConfig, ReferringParser, parser_schema, to_entity_refs
from agents.transcriber import (
    ClipEntry,
    ClipView,
    EntityTranscript,
    TranscribeJob,
    Transcript,
    TranscriberConfig,
    VideoTranscriber,
    parse_yes_no,
)
from engine.models.interfaces import ChatRequest, ChatVideo
from engine.stats import Stats
from schemas import EntityRef
from tests.fakes import FakeChat

P1 = (
    'What "active" scene entities can you identify from the video? An entity refers to an object, and "active" '
    'scene entities are scene objects that have any dynamic behaviors, such as actions, interactions with others, '
    'or movements. Please compile a list of clearly visible "active" scene entities from the video. Use entity '
    'appearance in concise description to distinguish one "active" scene entity from another if possible.'
)


def video(n: int = 3, value: int = 0) -> ChatVideo:
    return ChatVideo(frames=tuple(np.full((8, 8, 3), value, np.uint8) for _ in range(n)), fps=1.0)


def first_prompt(request: ChatRequest) -> str:
    """The text of the first user message (the agent's own prompt, before any repair turn)."""
    return " ".join(p for p in request.messages[0].content if isinstance(p, str))


def all_text(request: ChatRequest) -> str:
    return "\n".join(p for m in request.messages for p in m.content if isinstance(p, str))


# -- Entity Recognizer ------------------------------------------------------------------------------------------


def test_recognizer_sends_prompt_p1_for_all_videos_in_one_batch():
    videos = [video(value=10), video(value=20), video(value=30)]
    paragraphs = {10: "A girl in a white dress dances.", 20: "   ", 30: "A brown dog runs after a ball."}

    def fn(request):
        part = request.messages[0].content[0]
        return paragraphs[int(part.frames[0][0, 0, 0])]

    vlm, stats = FakeChat(fn=fn), Stats()
    results = EntityRecognizer(vlm, stats=stats).recognize(videos)
    assert vlm.batch_sizes == [3]
    assert results[0] == "A girl in a white dress dances." and results[2] == "A brown dog runs after a ball."
    assert isinstance(results[1], Failure) and results[1].reason == "empty_answer" and results[1].raw == ("",)
    for request, v in zip(vlm.requests, videos):
        assert request.messages[0].content == (v, P1)  # the video first, then Prompt P.1 word for word
        assert request.json_schema is None  # a free paragraph, not JSON
    assert stats.counters["recognizer_videos"] == 3
    assert stats.counters["recognizer_paragraphs"] == 2
    assert stats.counters["recognizer_failed_empty"] == 1
    assert stats.counters["recognizer_backend_calls"] == 1


def test_recognizer_video_without_frames_is_a_failure_not_sent_and_long_answers_are_cut():
    vlm, stats = FakeChat(["x" * 50]), Stats()
    results = EntityRecognizer(vlm, RecognizerConfig(max_paragraph_chars=20), stats).recognize([video(0), video()])
    assert results[0] == Failure("no_frames", results[0].detail) and results[0].detail
    assert results[1] == "x" * 20
    assert vlm.batch_sizes == [1]
    assert stats.counters["recognizer_failed_no_frames"] == 1 and stats.counters["recognizer_truncated"] == 1
    assert EntityRecognizer(FakeChat([])).recognize([]) == []


def test_recognizer_config_says_what_is_wrong():
    with pytest.raises(ValueError, match="max_tokens"):
        RecognizerConfig(max_tokens=1)
    with pytest.raises(ValueError, match="max_paragraph_chars"):
        RecognizerConfig(max_paragraph_chars=0)


# -- Referring Parser -------------------------------------------------------------------------------------------

PARAGRAPHS = {
    "A bride in a white gown walks with a groom. A parrot flies above them.": {
        "expressions": ["The bride in a white gown", "groom in a  black suit.", "green parrot"],
        "nouns": ["Bride", "groom", "the parrot"],
        "categories": ["person", "Person", "bird"],
    },
    "A small dog chases a red ball.": {
        "expressions": ["small dog", "red ball"],
        "nouns": ["dog", "ball"],
        "categories": ["dog", "sports ball"],
    },
}


def _parser_fn(request: ChatRequest) -> str:
    for paragraph, answer in PARAGRAPHS.items():
        if paragraph in first_prompt(request):
            return json.dumps(answer)
    raise AssertionError(f"unexpected prompt: {first_prompt(request)}")


def test_parser_returns_aligned_entities_in_one_batch():
    llm, stats = FakeChat(fn=_parser_fn), Stats()
    wedding, dog = ReferringParser(llm, stats=stats).parse(list(PARAGRAPHS))
    assert llm.batch_sizes == [2]
    assert wedding == [
        ParsedEntity("bride in a white gown", "bride", "person"),
        ParsedEntity("groom in a black suit", "groom", "person"),
        ParsedEntity("green parrot", "parrot", "bird"),
    ]
    assert dog[1] == ParsedEntity("red ball", "ball", "sports ball")
    # The detector is prompted with the generalized category, the grounder with the full expression.
    assert to_entity_refs(wedding) == [
        EntityRef(expression="bride in a white gown", noun="person"),
        EntityRef(expression="groom in a black suit", noun="person"),
        EntityRef(expression="green parrot", noun="bird"),
    ]
    prompt = first_prompt(llm.requests[0])
    assert "At most 8 entities" in prompt and '"parrot" -> "bird"' in prompt
    assert llm.requests[0].json_schema["properties"]["expressions"]["maxItems"] == 8
    assert stats.counters["parser_paragraphs"] == 2
    assert stats.counters["parser_parsed"] == 2
    assert stats.counters["parser_entities"] == 5
    assert stats.counters["parser_backend_calls"] == 1


def test_parser_repairs_invalid_json_on_retry():
    good = json.dumps({"expressions": ["cat"], "nouns": ["cat"], "categories": ["cat"]})
    llm, stats = FakeChat(['{"expressions": ["cat"], "nouns": ["cat"], "categ', good]), Stats()
    (result,) = ReferringParser(llm, stats=stats).parse(["A cat jumps."])
    assert result == [ParsedEntity("cat", "cat", "cat")]
    assert llm.batch_sizes == [1, 1]
    retry = llm.batches[1][0]
    assert retry.messages[1].content == ('{"expressions": ["cat"], "nouns": ["cat"], "categ',)
    assert "not valid" in all_text(retry)
    assert stats.counters["parser_retried_requests"] == 1


def test_parser_shows_the_broken_rule_and_accepts_the_fix():
    unequal = json.dumps({"expressions": ["man", "woman"], "nouns": ["man"], "categories": ["person"]})
    fixed = json.dumps({"expressions": ["man", "woman"], "nouns": ["man", "woman"], "categories": ["person"] * 2})
    llm = FakeChat([unequal, fixed])
    (result,) = ReferringParser(llm).parse(["A man and a woman talk."])
    assert [p.noun for p in result] == ["man", "woman"]
    repair = all_text(llm.batches[1][0])
    assert "same length" in repair and "2 expressions, 1 nouns and 1 categories" in repair


def _answer(expressions, nouns, categories) -> str:
    return json.dumps({"expressions": expressions, "nouns": nouns, "categories": categories})


@pytest.mark.parametrize(
    "answer, detail",
    [
        (_answer(["man", "dog"], ["man", "dog"], ["person"]), "same length"),
        (_answer(["man", "  "], ["man", "dog"], ["person", "dog"]), "expression 1 is empty"),
        (_answer(["man", "dog"], ["man", ""], ["person", "dog"]), "noun 1 is empty"),
        (_answer(["man", "dog"], ["man", "dog"], ["person", " . "]), "category 1 is empty"),
        (_answer(["Man in red", "the man in RED"], ["man"] * 2, ["person"] * 2), "distinct"),
        (_answer(["a", "b", "c"], ["a", "b", "c"], ["x", "y", "z"]), "at most 2"),  # max_entities=2 below
        (_answer(["x" * 121], ["x"], ["x"]), "at most 120"),
        ('{"expressions": "man", "nouns": ["man"], "categories": ["person"]}', "valid array"),
        ("What a lovely wedding! Everyone looks so happy.", "Invalid JSON"),  # off-topic prose
    ],
)
def test_parser_invalid_answers_end_as_failures_with_the_raw_answer(answer, detail):
    llm, stats = FakeChat(fn=lambda r: answer), Stats()
    (result,) = ReferringParser(llm, ParserConfig(max_entities=2, retries=1), stats).parse(["A man walks a dog."])
    assert isinstance(result, Failure) and result.reason == "invalid_answer"
    assert result.raw == (answer, answer)  # the first answer and one retry, both kept
    assert result.raw_answer == answer
    assert detail in result.detail
    assert llm.batch_sizes == [1, 1]
    assert stats.counters["parser_failed_invalid"] == 1 and stats.counters["parser_entities"] == 0


def test_parser_no_entities_and_blank_paragraphs_are_failures():
    llm, stats = FakeChat([_answer([], [], [])]), Stats()
    blank, empty = ReferringParser(llm, stats=stats).parse(["  ", "Clouds drift over a hill."])
    assert blank.reason == "empty_paragraph" and blank.raw == ()
    assert empty.reason == "no_entities" and empty.raw == (_answer([], [], []),)  # valid: not retried
    assert llm.batch_sizes == [1]
    assert stats.counters["parser_failed_empty_paragraph"] == 1 and stats.counters["parser_failed_no_entities"] == 1


def test_parser_schema_bounds_strings_and_lists_and_config_is_validated():
    schema = parser_schema(5).model_json_schema()
    for key in ("expressions", "nouns", "categories"):
        assert schema["properties"][key]["maxItems"] == 5
        assert schema["properties"][key]["items"]["maxLength"] <= 120
    assert parser_schema(5) is parser_schema(5)
    with pytest.raises(ValueError, match="max_entities"):
        ParserConfig(max_entities=0)
    with pytest.raises(ValueError, match="retries"):
        ParserConfig(retries=-1)


# -- Video Transcriber ------------------------------------------------------------------------------------------


def _clips(n: int, start_value: int, length: float = 2.0) -> list[ClipView]:
    return [
        ClipView(clip_index=i, start_time=i * length, end_time=(i + 1) * length, frames=video(2, start_value + i))
        for i in range(n)
    ]


# Which entity is visible in which clip, by the clip's frame value; anything else answers "No".
PRESENT = {("girl in a white dress", 10), ("girl in a white dress", 11), ("brown dog", 11), ("red car", 22)}
PRESENCE_WORDS = {("girl in a white dress", 10): "Yes.", ("girl in a white dress", 11): "**yes**",
                  ("brown dog", 11): "Yes, there is.", ("red car", 22): "YES"}


def _transcriber_fn(request: ChatRequest) -> str:
    clip_value = int(request.messages[0].content[0].frames[0][0, 0, 0])
    question = request.messages[0].content[1]
    entity = next(e for e in ("girl in a white dress", "brown dog", "red car") if f"a {e}?" in question)
    if len(request.messages) == 1:
        return PRESENCE_WORDS.get((entity, clip_value), "No.")
    return f"  The {entity}   moves in clip {clip_value}. "


def _jobs() -> list[TranscribeJob]:
    return [
        TranscribeJob("v1", _clips(2, 10), ["girl in a white dress", "brown  dog"]),
        TranscribeJob("v2", _clips(3, 20), ["red car"]),
    ]


def test_transcriber_asks_presence_then_behaviour_in_two_batches():
    vlm, stats = FakeChat(fn=_transcriber_fn), Stats()
    t1, t2 = VideoTranscriber(vlm, stats=stats).transcribe(_jobs())
    assert len(vlm.batches) == 2  # every presence check, then every follow-up: two backend calls in all
    assert vlm.batch_sizes == [2 * 2 + 3 * 1, len(PRESENT)]
    presence = vlm.batches[0]
    assert {first_prompt(r) for r in presence} == {
        "Is there a girl in a white dress? Answer 'Yes' or 'No'.",
        "Is there a brown dog? Answer 'Yes' or 'No'.",
        "Is there a red car? Answer 'Yes' or 'No'.",
    }
    assert all(len(r.messages) == 1 and isinstance(r.messages[0].content[0], ChatVideo) for r in presence)
    # Behaviour questions only for the present ones, as a follow-up after the model's own "yes".
    asked = set()
    for r in vlm.batches[1]:
        clip_value = int(r.messages[0].content[0].frames[0][0, 0, 0])
        entity = next(e for e, _ in PRESENT if f"a {e}?" in first_prompt(r))
        asked.add((entity, clip_value))
        assert r.messages[1].role == "assistant" and r.messages[1].content == (PRESENCE_WORDS[entity, clip_value],)
        assert r.messages[2].content == (
            f"What clearly happens to the {entity}? Describe only what is visibly happening to the {entity}, "
            "without inference or assumptions.",
        )
    assert asked == PRESENT

    assert t1.video_id == "v1" and [e.expression for e in t1.entities] == ["girl in a white dress", "brown dog"]
    girl, dog = t1.entities
    assert [c.present for c in girl.clips] == [True, True] and [c.present for c in dog.clips] == [False, True]
    assert girl.clips[1].description == "The girl in a white dress moves in clip 11."
    assert girl.clips[1].raw_presence == "**yes**"
    assert dog.clips[0].description is None and dog.clips[0].raw_presence == "No."
    assert (dog.clips[1].clip_index, dog.clips[1].start_time, dog.clips[1].end_time) == (1, 2.0, 4.0)
    (car,) = t2.entities
    assert [c.present for c in car.clips] == [False, False, True]
    assert car.clips[2].description == "The red car moves in clip 22."
    assert stats.counters["transcriber_presence_backend_calls"] == 1
    assert stats.counters["transcriber_behavior_backend_calls"] == 1
    assert stats.counters["transcriber_presence_requests"] == 7
    assert stats.counters["transcriber_present"] == 4 and stats.counters["transcriber_absent"] == 3
    assert stats.counters["transcriber_descriptions"] == 4
    assert stats.counters["transcriber_videos"] == 2 and stats.counters["transcriber_clips"] == 5


def test_transcriber_unclear_presence_is_absent_counted_and_kept():
    answers = {20: "There might be something red.", 21: "", 22: "No"}

    def fn(request):
        return answers[int(request.messages[0].content[0].frames[0][0, 0, 0])]

    vlm, stats = FakeChat(fn=fn), Stats()
    (t,) = VideoTranscriber(vlm, stats=stats).transcribe([TranscribeJob("v2", _clips(3, 20), ["red car"])])
    assert len(vlm.batches) == 1  # nothing present: no behaviour batch at all
    clips = t.entities[0].clips
    assert [c.present for c in clips] == [False, False, False]
    assert [c.raw_presence for c in clips] == ["There might be something red.", "", "No"]
    assert [c.unclear for c in clips] == [True, True, False]
    assert stats.counters["transcriber_unclear_presence"] == 2 and stats.counters["transcriber_absent"] == 3


def test_transcriber_empty_description_is_kept_as_none_and_counted():
    vlm, stats = FakeChat(fn=lambda r: "Yes" if len(r.messages) == 1 else "  "), Stats()
    (t,) = VideoTranscriber(vlm, stats=stats).transcribe([TranscribeJob("v", _clips(1, 0), ["cat"])])
    (entry,) = t.entities[0].clips
    assert entry.present and entry.description is None
    assert stats.counters["transcriber_empty_description"] == 1
    assert "visible, no description" in t.to_text()


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("Yes", True), ("yes.", True), ("YES!", True), ("**Yes**", True), ("'Yes'", True), ('"yes", a dog', True),
        ("Yes, there is a girl.", True), ("No", False), ("no.", False), ("No, there isn't.", False),
        ("- No", False), ("Yesterday", None), ("Nope", None), ("Not sure.", None), ("There is a dog.", None),
        ("", None), ("1. Yes", None), ("Y", None), ("Maybe", None),
    ],
)
def test_parse_yes_no(text, verdict):
    assert parse_yes_no(text) is verdict


def _entry(i: int, start: float, end: float, present: bool, description: str | None = None) -> ClipEntry:
    return ClipEntry(clip_index=i, start_time=start, end_time=end, present=present, description=description,
                     raw_presence="Yes" if present else "No")


def test_transcript_to_text_is_compact_and_timestamped():
    transcript = Transcript(
        video_id="v1",
        entities=[
            EntityTranscript(expression="girl in a white dress", clips=[
                _entry(0, 0.0, 3.5, False), _entry(1, 3.5, 7.0, False),
                _entry(2, 7.0, 9.25, True, "She walks to the table."),
                _entry(3, 9.25, 3725.5, True, "She sits down."),
            ]),
            EntityTranscript(expression="brown dog", clips=[
                _entry(0, 0.0, 3.5, False), _entry(2, 7.0, 9.25, False),  # a gap: not merged across it
            ]),
        ],
    )
    assert transcript.to_text() == "\n".join([
        "Entity 1: girl in a white dress",
        "- 00:00:00.000-00:00:07.000: not visible",
        "- 00:00:07.000-00:00:09.250: She walks to the table.",
        "- 00:00:09.250-01:02:05.500: She sits down.",
        "Entity 2: brown dog",
        "- 00:00:00.000-00:00:03.500: not visible",
        "- 00:00:07.000-00:00:09.250: not visible",
    ])
    # Stored as JSON, read back equal.
    assert Transcript.model_validate_json(transcript.model_dump_json()) == transcript
    assert transcript.entity("brown dog").clips[1].clip_index == 2
    with pytest.raises(KeyError):
        transcript.entity("cat")


def test_transcript_from_the_agent_renders_its_descriptions():
    (t1, _) = VideoTranscriber(FakeChat(fn=_transcriber_fn)).transcribe(_jobs())
    text = t1.to_text()
    assert "Entity 2: brown dog\n- 00:00:00.000-00:00:02.000: not visible\n" in text
    assert "- 00:00:02.000-00:00:04.000: The brown dog moves in clip 11." in text


def test_clip_entry_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="not present"):
        _entry(0, 0.0, 1.0, False, "It runs.")
    with pytest.raises(ValueError, match="before it starts"):
        _entry(0, 2.0, 1.0, False)


@pytest.mark.parametrize(
    "job, message",
    [
        (TranscribeJob("v", _clips(1, 0), ["dog", "Dog"]), "twice"),
        (TranscribeJob("v", _clips(1, 0), ["  "]), "empty entity"),
        (TranscribeJob("v", [ClipView(0, 0.0, 1.0, video(0))], ["dog"]), "no frames"),
        (TranscribeJob("v", [ClipView(0, 2.0, 1.0, video())], ["dog"]), "start_time <= end_time"),
        (TranscribeJob("v", [ClipView(0, 0.0, 1.0, video()), ClipView(0, 1.0, 2.0, video())], ["dog"]), "repeated"),
        (TranscribeJob("", _clips(1, 0), ["dog"]), "video_id"),
    ],
)
def test_transcriber_rejects_malformed_jobs_before_any_model_call(job, message):
    vlm = FakeChat(fn=_transcriber_fn)
    with pytest.raises(ValueError, match=message):
        VideoTranscriber(vlm).transcribe([_jobs()[0], job])
    assert vlm.batches == []


def test_transcriber_without_entities_or_clips_calls_nothing():
    vlm = FakeChat([])
    t1, t2 = VideoTranscriber(vlm).transcribe([TranscribeJob("a", _clips(2, 0), []), TranscribeJob("b", [], ["x"])])
    assert vlm.batches == []
    assert t1.entities == [] and t2.entities[0].clips == []
    with pytest.raises(ValueError, match="max_description_chars"):
        TranscriberConfig(max_description_chars=5)


def test_every_strefer_agent_names_its_prompt_templates():
    from prompts import render, template_hash

    names = [n for agent in (EntityRecognizer, ReferringParser, VideoTranscriber) for n in agent.prompts]
    assert names == ["entity_recognizer", "referring_parser", "transcriber_presence", "transcriber_behavior"]
    assert all(len(template_hash(n)) == 12 for n in names)
    assert render("entity_recognizer") == P1
    assert render("transcriber_presence", entity="dog") == "Is there a dog? Answer 'Yes' or 'No'."
