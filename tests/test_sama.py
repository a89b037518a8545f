"""SAMA's engine (SAMA §3.1, A.3): the annotator's checks, the Set-of-Mark frames, tags back to masklets, pseudo
masks for box-only objects, and the samples, with fake chat and box-segmenter backends (named as fakes)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from agents.sama_annotator import MarkedObject, SamaAnnotator, SamaAnswer, SamaConfig, SamaJob, check_answer, plain, to_tokens
from engine import masks
from engine.config import load_config
from engine.draw import NAMED_COLORS
from engine.runner import Runner
from engine.stats import Stats
from engine.storage import Dataset
from flows import sama
from schemas import MaskletRecord, RejectionRecord, SampleRecord, from_table
from tests.fakes import FakeChat, FakeColorBoxSegmenter
from tests.object_items import object_item


def _tags(request) -> list[str]:
    text = next(p for p in request.messages[0].content if isinstance(p, str))
    return list(dict.fromkeys(re.findall(r"^- \[(obj\d+)\]", text, flags=re.M)))


def good_answer(request, turns: int = 4) -> str:
    tags = _tags(request)
    dialogue = [{"question": f"What is [{tags[0]}] doing?",
                 "answer": f"<p>the first box</p> [{tags[0]}] moves right beside <p>the other box</p> [{tags[-1]}]."}]
    dialogue += [{"question": "Which box is lower?", "answer": f"<p>the lower box</p> [{tags[-1]}]."}] * (turns - 1)
    return json.dumps({"descriptions": [{"tag": t, "description": f"A flat box, {t}."} for t in tags],
                       "dialogue": dialogue})


def _run(tmp_path, items, chat, *, segmenter=None) -> tuple[Dataset, Stats]:
    config = load_config("tiny")
    stats = Stats()
    dataset = Dataset(str(tmp_path / "ds"))
    backends = {"vlm": chat, "box_segmenter": segmenter or FakeColorBoxSegmenter()}
    Runner(sama.build(config, backends, stats=stats, dataset=dataset), dataset, stats=stats).run(items)
    return dataset, stats


def _job(n: int = 2) -> SamaJob:
    frame = np.zeros((8, 8, 3), dtype=np.uint8)
    return SamaJob((frame,), tuple(MarkedObject(f"obj{i}", NAMED_COLORS[i][0], f"box {i}") for i in range(n)))


def test_check_answer_refuses_unknown_tags_loose_tags_and_ungrounded_answers():
    config = SamaConfig(turns=1)

    def answer(question: str, reply: str, described=("obj0", "obj1")) -> SamaAnswer:
        return SamaAnswer(descriptions=[{"tag": t, "description": "d"} for t in described],
                          dialogue=[{"question": question, "answer": reply}])

    job = _job()
    assert check_answer(job, answer("What is [obj0]?", "<p>a box</p> [obj0]."), config) is None
    assert check_answer(job, answer("What is [obj2]?", "<p>a box</p> [obj0]."), config).startswith("unknown tag obj2")
    assert check_answer(job, answer("Q?", "<p>a box</p> [obj0].", ("obj0",)), config).startswith("descriptions must")
    assert "grounds no object" in check_answer(job, answer("Q?", "A box moves."), config)
    assert "outside a grounded mention" in check_answer(job, answer("Q?", "<p>a box</p> [obj0] near obj1."), config)
    assert "exactly as [objN]" in check_answer(job, answer("Is <obj1> red?", "<p>a box</p> [obj0]."), config)


def test_to_tokens_maps_tags_to_region_and_seg_tokens_in_order():
    question, answer, tags = to_tokens("Is [obj1] left of [obj0]?", "Yes, <p>the blue box</p> [obj1] is left of "
                                       "<p> the red box </p>[obj0].")
    assert question == "Is <region> left of <region>?"
    assert answer == "Yes, <p> the blue box </p> [SEG] is left of <p> the red box </p> [SEG]."
    assert tags == ["obj1", "obj0", "obj1", "obj0"]
    assert plain("<p>the box</p> [obj0] is red [obj1].") == "the box is red ."


def test_an_unknown_tag_is_asked_again_with_the_error_then_rejected_with_the_raw_answer():
    bad = json.dumps({"descriptions": [{"tag": "obj0", "description": "d"}, {"tag": "obj1", "description": "d"}],
                      "dialogue": [{"question": "Q?", "answer": "<p>a box</p> [obj7]."}]})
    chat = FakeChat([bad, bad, bad])
    (result,) = SamaAnnotator(chat, SamaConfig(turns=1, retries=2)).annotate([_job()])
    assert result.reason == "unknown_tag" and result.raw_answer == bad and len(result.raw) == 3
    repair = chat.requests[1].messages[-1].content[0]
    assert "unknown tag obj7" in repair
    fixed = bad.replace("[obj7]", "[obj1]")
    (result,) = SamaAnnotator(FakeChat([bad, fixed]), SamaConfig(turns=1)).annotate([_job()])
    assert result.descriptions == {"obj0": "d", "obj1": "d"} and result.dialogue[0].answer == "<p>a box</p> [obj1]."


def test_samples_map_tags_back_to_masklets_on_16_set_of_mark_frames(tmp_path):
    item, truth = object_item(tmp_path / "v1", objects=3, frames=40)
    chat = FakeChat(fn=good_answer)
    dataset, stats = _run(tmp_path, [item], chat)
    samples = from_table(SampleRecord, dataset.read_table("samples"))
    masklets = {m.masklet_id: m for m in from_table(MaskletRecord, dataset.read_table("masklets"))}
    assert len(masklets) == 3 and {m.method for m in masklets.values()} == {"source"}
    by_expression = {m.expression: m for m in masklets.values()}
    descriptions = [s for s in samples if s.data_type == "object_description"]
    (dialogue,) = [s for s in samples if s.data_type == "grounded_dialogue"]
    assert len(descriptions) == 3
    tag_of = dict(zip(dialogue.labels["tag_masklets"].split(","), dialogue.labels["tags"].split(",")))
    assert [tag_of[by_expression[e].masklet_id] for e in ("the red box", "the blue box", "the green box")] == \
        ["obj0", "obj1", "obj2"]
    for s in descriptions:
        assert "<region>" in s.conversation[0].value and tag_of[s.masklet_ids[0]] == s.labels["tag"]
    # the dialogue: a token per masklet, in order; [SEG] after every grounded phrase
    text = " ".join(t.value for t in dialogue.conversation)
    tokens = re.findall(r"<region>|\[SEG\]", text)
    assert len(tokens) == len(dialogue.masklet_ids) == 3 + 3  # first turn: 1 region + 2 SEG; then one SEG a turn
    assert [tag_of[i] for i in dialogue.masklet_ids] == ["obj0", "obj0", "obj2", "obj2", "obj2", "obj2"]
    assert dialogue.conversation[0].value.startswith("<video>\n") and "<p> the first box </p> [SEG]" in text
    # 16 frames spread uniformly over the 40 annotated ones, each marked with every object's box in its color
    assert len(dialogue.frames) == 16 and dialogue.frames[0] == 0 and dialogue.frames[-1] == 39
    (request,) = chat.requests
    images = [p.pixels for p in request.messages[0].content if not isinstance(p, str)]
    assert len(images) == 16
    for image, index in zip(images, dialogue.frames):
        for k in range(3):
            x0, y0, x1, y1 = (int(v) for v in masks.mask_box(truth[k].masks[index]))
            color = NAMED_COLORS[k][1]
            assert tuple(image[y1, (x0 + x1) // 2]) == color, (index, k)  # the box's bottom edge (y1 exclusive)
    assert stats.counters["funnel.sama_annotator.out"] == 1


def test_single_object_videos_are_skipped_and_box_only_objects_get_pseudo_masks(tmp_path):
    single, _ = object_item(tmp_path / "one", objects=1, frames=8)
    boxed, truth = object_item(tmp_path / "two", objects=2, frames=24, boxes_only=(1,), dataset="vidstg")
    segmenter = FakeColorBoxSegmenter()
    dataset, stats = _run(tmp_path, [single, boxed], FakeChat(fn=good_answer), segmenter=segmenter)
    rejections = from_table(RejectionRecord, dataset.read_table("rejections"))
    assert [(r.stage, r.reason) for r in rejections] == [("sama_annotator", "single_object")]
    masklets = from_table(MaskletRecord, dataset.read_table("masklets"))
    pseudo = next(m for m in masklets if m.method == "pseudo")
    assert len(pseudo.frames) == 16 and segmenter.calls == [1] * 16  # only the sampled frames, one call each
    for f in pseudo.frames:
        assert np.array_equal(masks.decode(f.rle), truth[1].masks[f.frame_index])
    assert stats.counters["pseudo_masks"] == 16


def test_an_answer_that_stays_invalid_is_a_rejection_and_the_run_goes_on(tmp_path):
    first, _ = object_item(tmp_path / "a", objects=2, frames=8)
    second, _ = object_item(tmp_path / "b", objects=2, frames=9)

    def answer(request) -> str:
        return "not json" if len(request.messages[0].content) == 9 else good_answer(request)

    dataset, _ = _run(tmp_path, [first, second], FakeChat(fn=answer))
    (rejection,) = from_table(RejectionRecord, dataset.read_table("rejections"))
    assert rejection.reason == "invalid_answer" and rejection.raw_answer == "not json"
    samples = from_table(SampleRecord, dataset.read_table("samples"))
    assert {s.source for s in samples} == {second.source}


@pytest.mark.parametrize("turns", [0, 17])
def test_config_bounds(turns):
    with pytest.raises(ValueError):
        SamaConfig(turns=turns)


def test_pseudo_masks_from_the_tiny_hq_sam(tmp_path):
    """The real HQ-SAM backend (tiny, random weights) behind the pseudo masks: one call per sampled frame for
    all its boxes, masks at the decoded size; with random weights a mask may be empty, which is a rejection."""
    from engine.models.sam_hq import SamHqBoxSegmenter

    item, _ = object_item(tmp_path / "v", objects=2, frames=20, boxes_only=(0, 1), dataset="vidstg")
    dataset, stats = _run(tmp_path, [item], FakeChat(fn=good_answer), segmenter=SamHqBoxSegmenter.tiny())
    assert stats.counters["box_segmenter_calls"] == 16
    masklets = from_table(MaskletRecord, dataset.read_table("masklets"))
    rejections = from_table(RejectionRecord, dataset.read_table("rejections"))
    assert all(m.method == "pseudo" and all(f.rle.size == [96, 192] for f in m.frames) for m in masklets)
    assert sum(len(m.frames) for m in masklets) == stats.counters["pseudo_masks"]
    # each object has its pseudo masks, or a rejection saying on how many frames the segmenter found none
    empty = {r.expression for r in rejections if r.reason == "empty_pseudo_mask"}
    assert {m.expression for m in masklets} | empty == {"the red box", "the blue box"}
    assert {r.reason for r in rejections} <= {"empty_pseudo_mask", "single_object", "no_objects"}
