"""The VideoRefer chat agents (Analyzer, Annotator, Reviewer, Refiner) with a scripted fake chat model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from agents.analyzer import Analyzer, AnalyzerConfig, Noun, NounsAnswer
from agents.annotator import Annotator, AnnotatorConfig, InstanceJob
from agents.common import Failure
from agents.refiner import (
    QAJob, QAPair, QARegion, Refiner, RefinerConfig, check_merged, check_qa, qa_schema, to_region_tokens,
)
from agents.reviewer import INVALID_JUDGE, ReviewJob, Reviewer, ReviewerConfig
from engine.draw import draw_region
from engine.chat import ask_text
from engine.models.interfaces import ChatImage, ChatMessage, ChatModel, ChatRequest, ChatVideo
from engine.stats import Stats
from tests.fakes import FakeChat


def first_prompt(request: ChatRequest) -> str:
    """The text of the first user message (the agent's own prompt, before any repair turn)."""
    return " ".join(p for p in request.messages[0].content if isinstance(p, str))


def all_text(request: ChatRequest) -> str:
    return "\n".join(p for m in request.messages for p in m.content if isinstance(p, str))


def test_fake_chat_answers_as_scripted_and_records_each_batch():
    """The fake every test below leans on: scripted answers in order (or a function of each request), each
    `chat` call recorded as one batch, and a loud failure when the script runs out."""
    requests = [ChatRequest((ChatMessage.user(f"q{i}"),)) for i in range(3)]
    chat = FakeChat(["a", "b", "c"])
    assert isinstance(chat, ChatModel)
    assert ask_text(chat, requests[:2]) == ["a", "b"] and chat.chat(requests[2:]) == ["c"]
    assert chat.batch_sizes == [2, 1] and chat.requests == requests
    with pytest.raises(AssertionError, match="ran out"):
        chat.chat(requests[:1])
    echo = FakeChat(fn=lambda r: first_prompt(r).upper())
    assert echo.chat(requests) == ["Q0", "Q1", "Q2"] and echo.batch_sizes == [3]
    with pytest.raises(ValueError, match="answers or fn"):
        FakeChat()


# -- Analyzer ---------------------------------------------------------------------------------------------------

CAPTIONS = {
    "A man throws a ball to his dog in a park.": {
        "nouns": [
            {"noun": "The Man", "is_subject": True, "count": 1},
            {"noun": "Dog", "is_subject": True, "count": 1},
            {"noun": "dog", "is_subject": False, "count": 1},  # duplicate, not marked subject: the subject flag wins
            {"noun": "ball", "is_subject": False, "count": 1},
            {"noun": "background", "is_subject": False, "count": 1},  # a scene word, dropped
        ]
    },
    "Two cars race on a track.": {
        "nouns": [{"noun": "car", "is_subject": True, "count": 2}, {"noun": "track", "is_subject": False, "count": 1}]
    },
    "A woman sings.": {"nouns": [{"noun": "woman", "is_subject": True, "count": 1}]},
}


def _analyzer_fn(request: ChatRequest) -> str:
    for caption, answer in CAPTIONS.items():
        if caption in first_prompt(request):
            return json.dumps(answer)
    raise AssertionError(f"unexpected prompt: {first_prompt(request)}")


def test_analyzer_extracts_cleans_and_batches():
    llm, stats = FakeChat(fn=_analyzer_fn), Stats()
    results = Analyzer(llm, stats=stats).analyze(list(CAPTIONS))
    assert llm.batch_sizes == [3]  # every caption in one call
    assert [r.ok for r in results] == [True, True, True]
    assert results[0].nouns == (Noun("man", True), Noun("dog", True), Noun("ball", False))
    assert results[0].caption == "A man throws a ball to his dog in a park."
    assert results[1].subjects == (Noun("car", True, 2),) and results[1].subjects[0].plural  # two cars
    assert stats.counters["analyzer_captions"] == 3
    assert stats.counters["analyzer_nouns"] == 6
    assert stats.counters["analyzer_instances"] == 7  # the two cars count twice
    assert stats.counters["analyzer_duplicates_removed"] == 1
    assert stats.counters["analyzer_dropped_scene_word"] == 1
    assert stats.counters["analyzer_backend_calls"] == 1
    # The caption is in the prompt, and the JSON shape is spelled out there.
    assert '{"nouns": [' in first_prompt(llm.requests[0])
    assert llm.requests[0].json_schema is not None


def test_analyzer_keeps_subjects_first_within_max_nouns():
    answer = {"nouns": [{"noun": n, "is_subject": n == "girl", "count": 1} for n in ("kite", "tree", "bench", "girl")]}
    stats = Stats()
    (result,) = Analyzer(FakeChat([json.dumps(answer)]), AnalyzerConfig(max_nouns=2), stats).analyze(["x"])
    assert result.nouns == (Noun("girl", True), Noun("kite", False))
    assert stats.counters["analyzer_truncated_nouns"] == 2


def test_analyzer_repairs_invalid_json_on_retry():
    good = json.dumps({"nouns": [{"noun": "cat", "is_subject": True, "count": 1}]})
    llm = FakeChat(["Sure! The nouns are: cat.", good])
    stats = Stats()
    (result,) = Analyzer(llm, stats=stats).analyze(["A cat sleeps."])
    assert result.ok and result.nouns == (Noun("cat", True),)
    assert llm.batch_sizes == [1, 1]
    retry = llm.batches[1][0]
    assert retry.messages[1].content == ("Sure! The nouns are: cat.",)  # its own answer shown back
    assert "not valid" in all_text(retry)
    assert stats.counters["analyzer_retried_requests"] == 1


@pytest.mark.parametrize(
    "answer, reason",
    [
        ('{"nouns": "man"}', "invalid_answer"),  # wrong type
        ('{"nouns": [{"noun": 3, "is_subject": "yes", "count": 1}]}', "invalid_answer"),  # wrong item types
        ('{"nouns": [{"noun": "dog", "is_subject": false, "count": 1}]}', "invalid_answer"),  # no subject marked
        ('{"nouns": [{"noun": "dog", "is_subject": true}]}', "invalid_answer"),  # no count: singular or not?
        ('{"nouns": [{"noun": "dog", "is_subject": true, "count": -2}]}', "invalid_answer"),
        ("I love this video, it is so relaxing!", "invalid_answer"),  # off-topic prose
        ('{"nouns": []}', "no_nouns"),  # valid but empty
        ('{"nouns": [{"noun": "scene", "is_subject": true, "count": 1}]}', "no_nouns"),  # only a scene word
    ],
)
def test_analyzer_failures_keep_the_raw_answer(answer, reason):
    config = AnalyzerConfig(retries=1)
    llm, stats = FakeChat(fn=lambda r: answer), Stats()
    (result,) = Analyzer(llm, config, stats).analyze(["A dog runs."])
    assert not result.ok and result.nouns == ()
    assert result.failure.reason == reason
    assert result.failure.raw_answer == answer
    if reason == "invalid_answer":
        assert len(result.failure.raw) == 2 and result.failure.detail  # first answer and one retry, with why
        assert stats.counters["analyzer_failed_invalid"] == 1
    else:
        assert len(result.failure.raw) == 1  # a valid answer is not retried
        assert stats.counters["analyzer_failed_no_nouns"] == 1


def test_analyzer_short_mode_asks_only_the_subject():
    llm = FakeChat(['{"subject": "The Puppy", "plural": false}', '{"subject": "", "plural": false}',
                    '{"subject": "scene", "plural": false}'])
    results = Analyzer(llm).analyze(["A puppy chases a ball.", "Sunset over the sea.", "A busy scene."], short=True)
    assert llm.batch_sizes == [3]
    assert results[2].failure.reason == "no_nouns"
    assert "main subject" in first_prompt(llm.requests[0]) and '"nouns"' not in first_prompt(llm.requests[0])
    assert results[0].nouns == (Noun("puppy", True),)
    assert results[1].failure.reason == "no_nouns"


def test_analyzer_short_mode_rejects_a_plural_subject():
    """VideoRefer §3.1.2 keeps singular subjects only: the raw caption is the answer about one masklet."""
    answer = '{"subject": "dog", "plural": true}'
    stats = Stats()
    (result,) = Analyzer(FakeChat([answer]), stats=stats).analyze(["Two dogs chase each other around a bed."],
                                                                  short=True)
    assert not result.ok and result.nouns == ()
    assert result.failure.reason == "plural_subject" and "'dog'" in result.failure.detail
    assert result.failure.raw_answer == answer
    assert stats.counters["analyzer_failed_plural_subject"] == 1


def test_analyzer_counts_plural_nouns_and_rejects_those_it_cannot_count():
    answer = {"nouns": [
        {"noun": "dog", "is_subject": True, "count": 2},  # "two dogs": two instances
        {"noun": "people", "is_subject": False, "count": 0},  # "some people": how many?
        {"noun": "bird", "is_subject": False, "count": 7},  # more than max_instances
        {"noun": "ball", "is_subject": False, "count": 1},
    ]}
    llm, stats = FakeChat([json.dumps(answer)]), Stats()
    (result,) = Analyzer(llm, AnalyzerConfig(max_instances=4), stats).analyze(["x"])
    assert result.ok and result.nouns == (Noun("dog", True, 2), Noun("ball", False, 1))
    assert [(n.noun, f.reason) for n, f in result.rejected] == [("people", "uncounted_plural"),
                                                                 ("bird", "too_many_instances")]
    assert all(f.raw_answer == json.dumps(answer) for _, f in result.rejected)
    assert "max_instances=4" in result.rejected[1][1].detail
    assert stats.counters["analyzer_rejected_uncounted_plural"] == 1
    assert stats.counters["analyzer_instances"] == 3
    assert '"count"' in first_prompt(llm.requests[0]) and '"two dogs" is "dog" with count 2' in first_prompt(llm.requests[0])
    with pytest.raises(ValueError, match="max_instances"):
        AnalyzerConfig(max_instances=0)


def test_analyzer_blank_caption_is_not_sent():
    llm = FakeChat(fn=_analyzer_fn)
    results = Analyzer(llm).analyze(["  ", "A woman sings."])
    assert llm.batch_sizes == [1]
    assert results[0].failure.reason == "empty_caption" and results[1].ok


def test_analyzer_config_says_what_is_wrong():
    with pytest.raises(ValueError, match="max_nouns"):
        AnalyzerConfig(max_nouns=0)
    with pytest.raises(ValueError, match="retries"):
        AnalyzerConfig(retries=-1)


def test_nouns_schema_bounds_strings_and_lists():
    schema = NounsAnswer.model_json_schema()
    assert schema["properties"]["nouns"]["maxItems"] >= 1
    assert schema["$defs"]["NounItem"]["properties"]["noun"]["maxLength"] >= 1


# -- Annotator --------------------------------------------------------------------------------------------------

VIDEO = ChatVideo(frames=tuple(np.zeros((8, 8, 3), np.uint8) for _ in range(3)), fps=1.0)


def _annotator_fn(moves: dict[str, bool], static: dict[str, str] | None = None):
    def fn(request: ChatRequest) -> str:
        prompt = first_prompt(request)
        for name, moving in moves.items():
            if name in prompt:
                if "moves_or_acts" in prompt:
                    text = f"The {name} runs around." if moving else f"The {name} stays still."
                    return json.dumps({"moves_or_acts": moving, "description": text})
                return (static or {}).get(name, f"The {name} is brown.")
        raise AssertionError(f"no object named in: {prompt}")

    return fn


def test_annotator_drops_static_subject_keeps_static_non_subject():
    vlm, stats = FakeChat(fn=_annotator_fn({"man": True, "statue": False, "bench": False})), Stats()
    nouns = [Noun("man", True), Noun("statue", True), Noun("bench", False)]
    man, statue, bench = Annotator(vlm, stats=stats).annotate(VIDEO, nouns)
    assert vlm.batch_sizes == [3, 2]  # dynamic for all, static only for the kept ones
    assert man.ok and man.dynamic == "The man runs around." and man.static == "The man is brown." and man.moves
    assert not statue.ok and statue.failure.reason == "static_only"
    assert statue.dynamic == "The statue stays still." and '"moves_or_acts": false' in statue.failure.raw_answer
    assert bench.ok and bench.moves is False and bench.static == "The bench is brown."
    assert stats.counters["annotator_dropped_static"] == 1
    assert stats.counters["annotator_kept_static"] == 1
    assert stats.counters["annotator_kept"] == 2
    # The video comes first in every message, and each prompt names its object.
    for request in vlm.requests:
        assert request.messages[0].content[0] is VIDEO
    named = [("man" in first_prompt(r), "bench" in first_prompt(r)) for r in vlm.batches[1]]
    assert named == [(True, False), (False, True)]


def test_annotator_expressions_keep_static_objects():
    vlm = FakeChat(fn=_annotator_fn({"girl on the left": False}))
    (a,) = Annotator(vlm).annotate_expressions(VIDEO, ["girl   on the left"])
    assert a.ok and a.noun == "girl on the left" and a.moves is False and a.static
    assert '"girl on the left"' in first_prompt(vlm.batches[0][0])
    assert vlm.batch_sizes == [1, 1]


def test_annotator_invalid_dynamic_answer_and_empty_static_are_failures():
    def fn(request):
        prompt = first_prompt(request)
        if "moves_or_acts" in prompt:
            return "The dog is cute." if "dog" in prompt else '{"moves_or_acts": "sometimes", "description": 5}'
        return "   "

    vlm, stats = FakeChat(fn=fn), Stats()
    annotator = Annotator(vlm, AnnotatorConfig(retries=0), stats)
    dog, cat = annotator.annotate(VIDEO, [Noun("dog", True), Noun("cat", False)])
    assert dog.failure.reason == "invalid_dynamic_answer" and dog.failure.raw == ("The dog is cute.",)
    assert cat.failure.reason == "invalid_dynamic_answer" and cat.failure.detail
    assert vlm.batch_sizes == [2]  # nothing left for the static step
    assert stats.counters["annotator_failed_invalid"] == 2

    moving = '{"moves_or_acts": true, "description": "It runs."}'
    vlm = FakeChat(fn=lambda r: moving if "moves_or_acts" in first_prompt(r) else "")
    (fox,) = Annotator(vlm).annotate(VIDEO, [Noun("fox", True)])
    assert fox.failure.reason == "empty_static_answer" and fox.dynamic == "It runs."


def test_annotator_describes_an_instance_shown_by_its_contour():
    """"dog 1 of 2": every frame where the instance has a mask carries its contour; the prompt says which
    color marks it and not to describe the mark."""
    frames = tuple(np.full((40, 60, 3), 90, np.uint8) for _ in range(3))
    shown = [np.zeros((40, 60), bool) for _ in range(3)]
    shown[0][10:20, 5:15] = True
    shown[2][12:22, 30:40] = True  # not seen on frame 1
    vlm = FakeChat(fn=_annotator_fn({"dog": True}))
    (dog,) = Annotator(vlm).annotate_instances([InstanceJob("dog", True, frames, tuple(shown), fps=2.0)])
    assert dog.ok and dog.noun == "dog" and dog.dynamic == "The dog runs around."
    assert vlm.batch_sizes == [1, 1]
    (video,) = [p for p in vlm.requests[0].messages[0].content if isinstance(p, ChatVideo)]
    assert video.fps == 2.0 and len(video.frames) == 3
    outline = [(f == np.array(RED, np.uint8)).all(axis=2) for f in video.frames]
    assert outline[0].any() and outline[2].any() and not outline[1].any()
    assert np.array_equal(video.frames[1], frames[1])
    for mark, mask in zip(outline, shown):  # on the mask's edge only, the inside left as it was (no fill)
        assert not (mark & ~_near(mask, 1)).any()
    assert (video.frames[0][14, 9] == 90).all()
    prompt = first_prompt(vlm.requests[0])
    assert prompt.startswith("Watch the dog outlined in red in this video.") and "never the contour" in prompt
    with pytest.raises(ValueError, match="all empty"):
        InstanceJob("dog", True, frames[:1], (np.zeros((40, 60), bool),), fps=1.0)
    with pytest.raises(ValueError, match="one mask per frame"):
        InstanceJob("dog", True, frames, tuple(shown[:2]), fps=1.0)


def test_annotator_repairs_dynamic_answer_and_batches_many_nouns():
    names = [f"object{i}" for i in range(7)]
    seen: set[str] = set()

    def fn(request):
        prompt = first_prompt(request)
        name = next(n for n in names if f"the {n} " in prompt)
        if "moves_or_acts" not in prompt:
            return f"The {name} is red."
        if name not in seen:  # first answer of each is broken JSON
            seen.add(name)
            return '{"moves_or_acts": true, "description": '
        return json.dumps({"moves_or_acts": True, "description": f"The {name} moves."})

    vlm = FakeChat(fn=fn)
    results = Annotator(vlm).annotate(VIDEO, [Noun(n, True) for n in names])
    assert all(r.ok for r in results) and results[3].dynamic == "The object3 moves."
    assert vlm.batch_sizes == [7, 7, 7]  # dynamic, dynamic retry, static: one call each, whatever the count
    assert Annotator(FakeChat([])).annotate(VIDEO, []) == []


# -- draw_region and the Reviewer -------------------------------------------------------------------------------

H, W = 120, 160
RED = (255, 0, 0)


def _frame_and_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 200, size=(H, W, 3), dtype=np.uint8)
    image[:, :, 0] = 60  # a red channel far from the outline's
    mask = np.zeros((H, W), bool)
    mask[30:90, 40:120] = True
    return image, mask


def _near(mask: np.ndarray, radius: int) -> np.ndarray:
    import cv2

    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


@pytest.mark.parametrize("thickness", [None, 3])
def test_draw_region_is_a_thin_outline_and_a_light_fill(thickness):
    image, mask = _frame_and_mask()
    out = draw_region(image, mask, RED, thickness=thickness, fill_alpha=0.1)
    t = thickness or 1
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    changed = (out != image).any(axis=2)
    assert not (changed & ~_near(mask, t)).any()  # nothing changes away from the mask
    assert tuple(out[30, 80]) == RED and tuple(out[60, 40]) == RED  # on the contour: the outline color
    deep = out[60, 80].astype(int) - image[60, 80].astype(int)
    assert np.abs(deep).max() <= 0.1 * 255 + 1  # deep inside: mostly the original value...
    assert deep[0] > 0  # ...lightly tinted toward the outline color
    assert (out[60, 80] != RED).any()
    assert np.array_equal(out[0, 0], image[0, 0])


def test_draw_region_rejects_a_heavy_fill_and_bad_masks():
    image, mask = _frame_and_mask()
    with pytest.raises(ValueError, match="Strefer"):
        draw_region(image, mask, fill_alpha=0.8)
    with pytest.raises(ValueError, match="boolean"):
        draw_region(image, mask.astype(np.uint8))
    assert np.array_equal(draw_region(image, mask, fill_alpha=0.0)[60, 80], image[60, 80])


def _jobs(n: int) -> list[ReviewJob]:
    image, mask = _frame_and_mask()
    return [ReviewJob(image=image, mask=mask, frame_index=10 + i, noun=f"dog{i}", description=f"A brown dog{i} runs.")
            for i in range(n)]


def _judge_fn(request: ChatRequest) -> str:
    prompt = first_prompt(request)
    same = "brown" in prompt.split("Description B")[0]
    return json.dumps({"same_object": same, "reason": "Both describe a brown dog." if same else "Colors differ."})


def test_reviewer_outlines_region_and_judges_both_descriptions():
    captions = iter(["A brown dog running on grass.", "A white cat sitting.", "A brown dog with a collar."])
    captioner = FakeChat(fn=lambda r: next(captions))
    judge, stats = FakeChat(fn=_judge_fn), Stats()
    jobs = _jobs(3)
    reviews = Reviewer(captioner, judge, stats=stats).review(jobs)
    assert captioner.batch_sizes == [3] and judge.batch_sizes == [3]  # one call per step
    assert [r.verdict for r in reviews] == [True, False, True]
    assert reviews[0].reason == "Both describe a brown dog."
    assert reviews[1].region_caption == "A white cat sitting." and reviews[1].frame_index == 11
    assert stats.counters["reviewer_kept"] == 2 and stats.counters["reviewer_dropped"] == 1

    # The captioner saw the frame with the region outlined, and was told the outline's color.
    request = captioner.requests[0]
    (shown,) = [p for p in request.messages[0].content if isinstance(p, ChatImage)]
    image, mask = jobs[0].image, jobs[0].mask
    assert tuple(shown.pixels[30, 80]) == RED
    assert np.abs(shown.pixels[60, 80].astype(int) - image[60, 80].astype(int)).max() <= 27
    assert not ((shown.pixels != image).any(axis=2) & ~_near(mask, 1)).any()
    assert "red contour" in first_prompt(request)
    # The judge saw both descriptions.
    judge_prompt = first_prompt(judge.requests[1])
    assert "A white cat sitting." in judge_prompt and "A brown dog1 runs." in judge_prompt and "dog1" in judge_prompt


def test_reviewer_invalid_judge_answer_is_a_counted_false_verdict():
    junk = "Hmm, hard to say. They might be the same, or not." * 20
    captioner, judge, stats = FakeChat(fn=lambda r: "A dog."), FakeChat(fn=lambda r: junk), Stats()
    (review,) = Reviewer(captioner, judge, ReviewerConfig(retries=1), stats).review(_jobs(1))
    assert review.verdict is False
    assert review.reason.startswith(f"{INVALID_JUDGE}:")
    assert "Hmm, hard to say" in review.reason and len(review.reason) < len(junk)  # raw kept, truncated
    assert review.region_caption == "A dog."
    assert judge.batch_sizes == [1, 1]
    assert stats.counters["reviewer_invalid_judge"] == 1 and stats.counters["reviewer_dropped"] == 1


def test_reviewer_repairs_judge_answer_and_skips_empty_masks_and_captions():
    jobs = _jobs(3)
    empty = jobs[1]
    jobs[1] = ReviewJob(image=empty.image, mask=np.zeros_like(empty.mask), frame_index=3, noun="x", description="y")
    captions = iter(["A brown dog.", ""])  # job 0 captioned, job 2 gets nothing
    answers = iter(['{"same_object": "maybe"}', '{"same_object": true, "reason": "Same brown dog."}'])
    captioner, judge, stats = FakeChat(fn=lambda r: next(captions)), FakeChat(fn=lambda r: next(answers)), Stats()
    reviews = Reviewer(captioner, judge, stats=stats).review(jobs)
    assert captioner.batch_sizes == [2]  # the empty mask is never shown
    assert judge.batch_sizes == [1, 1]  # only the captioned job is judged; its bad answer is retried
    assert reviews[0].verdict and reviews[0].reason == "Same brown dog."
    assert not reviews[1].verdict and reviews[1].reason.startswith("empty_mask") and reviews[1].frame_index == 3
    assert not reviews[2].verdict and reviews[2].reason.startswith("empty_region_caption")
    assert stats.counters["reviewer_empty_mask"] == 1 and stats.counters["reviewer_empty_region_caption"] == 1


def test_review_job_and_config_validate_up_front():
    image, mask = _frame_and_mask()
    with pytest.raises(ValueError, match="height and width"):
        ReviewJob(image=image, mask=mask[:10], frame_index=0, noun="dog", description="d")
    with pytest.raises(ValueError, match="RGB uint8"):
        ReviewJob(image=image[..., 0], mask=mask, frame_index=0, noun="dog", description="d")
    with pytest.raises(ValueError, match="fill_alpha"):
        ReviewerConfig(fill_alpha=0.6)


# -- Refiner ----------------------------------------------------------------------------------------------------


def test_refiner_merge_batches_and_returns_plain_text():
    llm, stats = FakeChat(fn=lambda r: ' "The dog is brown and\n runs across the lawn." '), Stats()
    jobs = [("dog", "The dog runs across the lawn.", "The dog is brown."), ("cat", "It jumps.", "It is black.")]
    out = Refiner(llm, stats=stats).merge(jobs)
    assert out == ["The dog is brown and runs across the lawn."] * 2
    assert llm.batch_sizes == [2]
    prompt = first_prompt(llm.requests[0])
    assert "The dog runs across the lawn." in prompt and "The dog is brown." in prompt and "Object: dog" in prompt
    assert stats.counters["refiner_merge_ok"] == 2


def test_refiner_merge_retries_rule_breaks_then_fails_with_raw_answers():
    answers = {
        "dog": iter(["In the video, the dog runs.", "The dog runs."]),
        "cat": iter(["I'm sorry, I cannot help with that."] * 3),
        "cow": iter(["- The cow grazes.\n- It is black.", "The cow is black and grazes."]),
    }

    def fn(request):
        return next(answers[next(n for n in answers if f"Object: {n}" in first_prompt(request))])

    llm, stats = FakeChat(fn=fn), Stats()
    dog, cat, cow = Refiner(llm, stats=stats).merge([(n, "moves", "looks") for n in ("dog", "cat", "cow")])
    assert dog == "The dog runs." and cow == "The cow is black and grazes."
    assert isinstance(cat, Failure) and cat.reason == "invalid_answer"
    assert cat.raw == ("I'm sorry, I cannot help with that.",) * 3 and "not a description" in cat.detail
    assert llm.batch_sizes == [3, 3, 1]  # each round is one batch of what is still pending
    assert "the video" in all_text(llm.batches[1][0]).lower() and "not valid" in all_text(llm.batches[1][0])


def test_check_merged_rules():
    assert check_merged("The man walks.", 100) is None
    assert "caption" in check_merged("The caption says the man walks.", 100)
    assert "characters" in check_merged("The man walks. " * 20, 100)
    assert check_merged("", 100) == "the answer is empty"


REGIONS = (QARegion(0, "dog", "A brown dog runs."), QARegion(1, "man in red", "A man in red throws a ball."))


def _pairs(**override) -> list[dict]:
    pairs = [
        {"kind": "basic", "question": "What is <region0> chasing?", "answer": "A ball.", "regions": [0]},
        {"kind": "reasoning", "question": "Why does <region1> throw the ball to <region0>?",
         "answer": "To play fetch with <region0>.", "regions": [1, 0]},
        {"kind": "future", "question": "What will <region0> do next?", "answer": "Bring the ball back.",
         "regions": [0]},
    ]
    for key, value in override.items():
        index, field = key.split("_", 1)
        pairs[int(index[1:])][field] = value
    return pairs


def test_refiner_write_qa_valid_and_batched():
    llm, stats = FakeChat(fn=lambda r: json.dumps({"pairs": _pairs()})), Stats()
    results = Refiner(llm, stats=stats).write_qa([QAJob(REGIONS), QAJob(REGIONS), QAJob(REGIONS)])
    assert llm.batch_sizes == [3]
    pairs = results[0]
    assert [p.kind for p in pairs] == ["basic", "reasoning", "future"]
    assert type(pairs[1]) is QAPair and pairs[1].regions == [1, 0]
    prompt = first_prompt(llm.requests[0])
    assert "<region1>: man in red. A man in red throws a ball." in prompt and "1 basic" in prompt
    assert stats.counters["refiner_qa_pairs"] == 9 and stats.counters["refiner_qa_reasoning"] == 3
    assert to_region_tokens(pairs[1].question) == ("Why does <region> throw the ball to <region>?", [1, 0])


def test_refiner_write_qa_rejects_unknown_region_and_keeps_raw():
    bad = json.dumps({"pairs": _pairs(p0_question="What is <region7> chasing?", p0_regions=[7])})
    llm, stats = FakeChat(fn=lambda r: bad), Stats()
    (result,) = Refiner(llm, RefinerConfig(retries=1), stats).write_qa([QAJob(REGIONS)])
    assert isinstance(result, Failure) and result.reason == "invalid_answer"
    assert "<region7>" in result.detail and result.raw == (bad, bad)
    assert "<region7>" in all_text(llm.batches[1][0])  # the retry told the model what was wrong
    assert stats.counters["refiner_qa_failed"] == 1


def test_refiner_write_qa_repairs_json_and_semantic_errors():
    answers = iter([
        "Here are your questions: ...",  # not JSON
        json.dumps({"pairs": _pairs(p2_question="What will the dog <region0> do next?")}),  # name beside it
        json.dumps({"pairs": _pairs()}),
    ])
    llm = FakeChat(fn=lambda r: next(answers))
    (result,) = Refiner(llm).write_qa([QAJob(REGIONS)])
    assert isinstance(result, list) and len(result) == 3
    assert llm.batch_sizes == [1, 1, 1]
    assert "'dog' beside <region0>" in all_text(llm.batches[2][0])


GROUP = (QARegion(0, "both shapes", "Two squares slide apart.", 2), QARegion(1, "the ball", "A ball rolls."))


@pytest.mark.parametrize(
    "question, answer, error",
    [
        ("What are <region0> doing?", "<region0> slide apart.", None),
        ("What is <region0> doing?", "They slide.", "<region0> stands for 2 objects: use a plural verb, not 'is'"),
        ("What's <region0> doing?", "They slide.", "not \"What's\""),
        ("Where are <region1> rolling?", "Away.", "<region1> is one object ('the ball'): use a singular verb"),
        ("Is <region1> and <region0> moving?", "Yes.", "stands for 3 objects (objects per region: <region0> 2)"),
        ("Are <region1> and <region0> moving?", "Yes.", None),
        ("Which of <region1> and <region0> is faster?", "The ball.", None),  # not the subject
        ("What will <region1> do next?", "<region1> is going to stop.", None),  # "do" after a modal
        ("What are <region0> doing?", "<region0> is sliding.", "pairs.0.answer: <region0> stands for 2 objects"),
    ],
)
def test_check_qa_asks_for_verbs_of_the_regions_number(question, answer, error):
    """A region of several objects (a MeViS expression naming two) is plural in questions and answers."""
    pair = QAPair(kind="basic", question=question, answer=answer, regions=list(dict.fromkeys(
        int(i) for i in re.findall(r"<region(\d+)>", question))))
    got = check_qa(QAJob(GROUP), [pair])
    assert (got is None) if error is None else (error in got), got


def test_refiner_tells_the_model_how_many_objects_a_region_holds():
    singular = _pairs(p0_question="What is <region0> doing?", p0_regions=[0], p1_question="Why do <region0> move?",
                      p1_regions=[0], p2_question="Where will <region0> go?", p2_regions=[0])
    plural = [dict(p, question=p["question"].replace("What is", "What are")) for p in singular]
    llm = FakeChat([json.dumps({"pairs": singular}), json.dumps({"pairs": plural})])
    (result,) = Refiner(llm).write_qa([QAJob(GROUP)])
    assert [p.question for p in result][0] == "What are <region0> doing?"
    prompt = first_prompt(llm.requests[0])
    assert "<region0> (2 objects, plural): both shapes." in prompt and "<region1>: the ball." in prompt
    assert '"What are <region0> doing?", "they", "their"' in prompt
    assert "use a plural verb, not 'is'" in all_text(llm.requests[1])
    with pytest.raises(ValueError, match="counts"):
        QAJob(((0, "dog", "d", 0),))


def test_named_answers_take_the_expression_with_its_own_determiner():
    from flows.videorefer import _named

    regions = [QARegion(0, "both shapes", "", 2), QARegion(1, "two boxes", "", 2), QARegion(2, "the dog", "", 1)]
    assert _named("<region0> slide apart.", regions) == "Both shapes slide apart."
    assert _named("It is near <region1>. <region2> waits.", regions) == "It is near the two boxes. The dog waits."


@pytest.mark.parametrize(
    "override, message",
    [
        ({"p0_regions": [1]}, "order of first appearance"),
        ({"p1_regions": [0, 1]}, "order of first appearance"),
        ({"p0_question": "What is the dog chasing?"}, "at least one region"),
        ({"p0_question": "What is the dog chasing?", "p0_regions": []}, "at least 1 item"),
        ({"p0_question": "What is <region> chasing?"}, "exactly as <regionN>"),
        ({"p0_answer": "It chases region1."}, "exactly as <regionN>"),
        ({"p0_answer": "It chases <region1>."}, "does not show"),
        ({"p0_kind": "trivia"}, "kind"),
        ({"p0_kind": "future"}, "write exactly 1 basic"),
        ({"p0_answer": ""}, "answer"),
        ({"p0_answer": "x" * 700}, "answer"),
    ],
)
def test_qa_schema_rejects(override, message):
    schema = qa_schema((1, 1, 1), 300, 600)
    with pytest.raises(ValueError, match=message):
        schema.model_validate_json(json.dumps({"pairs": _pairs(**override)}))


def test_qa_schema_bounds_and_accepts_valid():
    schema = qa_schema((1, 1, 1), 300, 600)
    assert len(schema.model_validate_json(json.dumps({"pairs": _pairs()})).pairs) == 3
    js = schema.model_json_schema()
    assert js["properties"]["pairs"]["maxItems"] == 3
    with pytest.raises(ValueError):
        schema.model_validate_json(json.dumps({"pairs": _pairs()[:2]}))  # too few


def test_to_region_tokens_order_with_repeats():
    text, order = to_region_tokens("Is <region2> closer to <region0> than <region2> is to <region10>?")
    assert text == "Is <region> closer to <region> than <region> is to <region>?"
    assert order == [2, 0, 2, 10]
    assert to_region_tokens("no regions") == ("no regions", [])


def test_qa_job_and_refiner_config_validate():
    job = QAJob(((0, "dog", "d"),))
    assert job.regions == (QARegion(0, "dog", "d"),)
    with pytest.raises(ValueError, match="distinct"):
        QAJob(((0, "dog", "d"), (0, "cat", "c")))
    with pytest.raises(ValueError, match="at least one region"):
        QAJob(())
    with pytest.raises(ValueError, match="questions per kind"):
        RefinerConfig(basic_questions=0, reasoning_questions=0, future_questions=0)
    many = QAJob(tuple((i, f"o{i}", "d") for i in range(3)))
    llm = FakeChat([])
    (result,) = Refiner(llm, RefinerConfig(max_regions=2)).write_qa([many])
    assert result.reason == "too_many_regions" and llm.batches == []


def test_refiner_question_counts_follow_config():
    config = RefinerConfig(basic_questions=2, reasoning_questions=0, future_questions=1)
    pairs = _pairs()
    pairs[1] = {"kind": "basic", "question": "Where is <region1>?", "answer": "On the lawn.", "regions": [1]}
    llm = FakeChat([json.dumps({"pairs": pairs})])
    (result,) = Refiner(llm, config).write_qa([QAJob(REGIONS)])
    assert [p.kind for p in result] == ["basic", "basic", "future"]
    assert "2 basic, 0 reasoning and 1 future" in first_prompt(llm.requests[0])


def test_every_agent_names_the_prompt_templates_it_renders(monkeypatch, tmp_path):
    """Provenance records the hash of each template an agent names: the names must be exactly the templates
    each agent renders on its paths, and the VideoRefer flow records all of them."""
    import prompts
    from engine.config import load_config
    from engine.storage import Dataset
    from flows import videorefer

    rendered: dict[str, set[str]] = {}
    for module in ("analyzer", "annotator", "reviewer", "refiner"):
        def recording(name: str, _module: str = module, **variables) -> str:
            rendered.setdefault(_module, set()).add(name)
            return prompts.render(name, **variables)

        monkeypatch.setattr(f"agents.{module}.render", recording)

    def chat(request: ChatRequest) -> str:
        prompt = first_prompt(request)
        if "List the objects" in prompt:
            return json.dumps({"nouns": [{"noun": "dog", "is_subject": True, "count": 1}]})
        if "main subject" in prompt:
            return '{"subject": "dog", "plural": false}'
        if "moves_or_acts" in prompt:
            return '{"moves_or_acts": true, "description": "It runs."}'
        if "same object" in prompt:
            return '{"reason": "Both a dog.", "same_object": true}'
        if "questions and answers" in prompt:
            return json.dumps({"pairs": _pairs()})
        return "A brown dog."

    Analyzer(FakeChat(fn=chat)).analyze(["A dog runs."])
    Analyzer(FakeChat(fn=chat)).analyze(["A dog runs."], short=True)
    Annotator(FakeChat(fn=chat)).annotate(VIDEO, [Noun("dog", True)])
    Annotator(FakeChat(fn=chat)).annotate_expressions(VIDEO, ["the dog"])
    Reviewer(FakeChat(fn=chat), FakeChat(fn=chat)).review(_jobs(1))
    Refiner(FakeChat(fn=chat)).merge([("dog", "It runs.", "It is brown.")])
    Refiner(FakeChat(fn=chat)).write_qa([QAJob(REGIONS)])
    agents = {"analyzer": Analyzer, "annotator": Annotator, "reviewer": Reviewer, "refiner": Refiner}
    assert {module: set(agent.prompts) for module, agent in agents.items()} == rendered

    names = [n for agent in agents.values() for n in agent.prompts]
    hashes = {n: prompts.template_hash(n) for n in names}
    assert len(set(hashes.values())) == len(names) == 8  # a hash per template's content
    pipeline = videorefer.build(load_config("tiny"), {r: FakeChat([]) for r in videorefer.roles(load_config("tiny"))},
                                stats=Stats(), dataset=Dataset(str(tmp_path / "ds")))
    assert pipeline.prompt_hashes == hashes
