"""UFVideo's data construction (UFVideo §3.3, Appendix B): Box 2's answer format checked, Box 1's templates,
PixRQA/PixHQA/PixTRQA samples with their prompt and label frames and temporal tokens, with a fake chat backend
(named as a fake)."""

from __future__ import annotations

import re

import pytest

from agents.ufvideo_annotator import UFVideoAnnotatorConfig, UFVideoAnnotator, UFVideoJob, BoxedObject, parse, relative_box
from agents.ufvideo_tasks import period, pixhqa, pixrqa, pixtrqa, temp_index
from engine.config import load_config
from engine.runner import Runner
from engine.stats import Stats
from engine.storage import Dataset
from flows import ufvideo
from schemas import MaskletRecord, RejectionRecord, SampleRecord, from_table
from tests.fakes import FakeChat, FakeColorBoxSegmenter
from tests.object_items import FPS, object_item

import numpy as np


def box2_answer(request) -> str:
    text = next(p for p in request.messages[0].content if isinstance(p, str))
    names = sorted(set(re.findall(r"(object_\d+): \[", text)))
    shorts = " ".join(f"{n}: Flat box sliding to the right." for n in names)
    return f"<Short Description>: {shorts} <Long Description>: The boxes, {', '.join(names)}, slide right together across the gray frame."


def _run(tmp_path, items, chat, **kwargs) -> Dataset:
    config = load_config("tiny")
    stats = Stats()
    dataset = Dataset(str(tmp_path / "ds"))
    backends = {"vlm": chat, "box_segmenter": FakeColorBoxSegmenter()}
    Runner(ufvideo.build(config, backends, stats=stats, dataset=dataset, **kwargs), dataset, stats=stats).run(items)
    return dataset


def test_box1_templates_verbatim():
    q, a = pixrqa(["Red box sliding", "Blue box"], "object_1 slides past object_2")
    assert q == ("If object_1 <region> red box sliding, object_2 <region> blue box, what is a likely future event? "
                 "And please generate the mask in every frames.")
    assert a == "object_1 slides past object_2. The segmentation mask: object_1[SEG], object_2[SEG]."
    q, _ = pixhqa(["Red box"], "It slides.", "<Temp-12>")
    assert q == "What object_1 red box are doing in the <Temp-12>, and generate the masks?"
    q, _ = pixhqa(["SUV on a road"], "It drives.", "<Temp-0>")  # mid-sentence lowercase, but an acronym stays
    assert q == "What object_1 SUV on a road are doing in the <Temp-0>, and generate the masks?"
    q, a = pixtrqa(["Red box"], "It slides.", period(3, 40))
    assert q == "What object_1 <region> red box are doing? And please generate the time period and object mask."
    assert a == "The Time is {<Temp-3><Temp-40>}. It slides. The segmentation mask: object_1[SEG]."
    assert period(3, 40, braces=False) == "<Temp-3><Temp-40>"
    assert [temp_index(t, 10.0) for t in (0, 5, 10, 11)] == [0, 50, 99, 99]


def test_box2_answers_are_parsed_and_checked():
    cfg = UFVideoAnnotatorConfig()
    good = ("<Short Description>: `object_1: Blue truck mid-air.` `object_2: Line of trucks.` <Long Description>: "
            "The blue truck, object_1, jumps over object_2, a line of parked trucks.")
    annotation, error = parse(good, 2, cfg)
    assert error is None and annotation.short == ("Blue truck mid-air", "Line of trucks")
    assert annotation.long.startswith("The blue truck, object_1, jumps")
    assert "object_1 to object_2" in parse("<Short Description>: object_1: A. <Long Description>: x y z", 2, cfg)[1]
    assert "object_3, which does not exist" in parse(good.replace("over object_2", "over object_3"), 2, cfg)[1]
    assert "<Long Description>" in parse("object_1: a truck", 1, cfg)[1]
    assert relative_box([10, 20, 50, 40], 100, 200) == (100, 100, 500, 200)


# UFVideo Appendix B, Box 2, copied from the paper below its "Question :" label (a label, not prompt text).
BOX2 = """\
I upload multiple frames of the video as single-frame images, arranged in the original video order. Next, I upload the box positions of single or multiple objects in each frame as lists. Please provide a <Short Description> of about 10 words for each object, and a <Long Description> of all objects and their relationships. Both descriptions apply to the entire video, not individual frame. In the <Long Description>, use the object nouns in the <Short Description> to refer to each object. All descriptions should be in English.

Object box lists: `box_list_prompt`.

Provide your description strictly in the following format: <Short Description>:{object short description prompt} <Long Description>: your long description of all objects and their relationships.

Answer Examples:

Single object answer:

<Short Description>: `object_1: Blue monster truck mid-air during stunt jump`

<Long Description>: The blue monster truck, `object_1`, is captured mid-air, performing a high jump over a dirt track. In the background, several other monster trucks are visible on the ground, including a white one and additional blue ones, positioned along the track as if awaiting their turn or observing the stunt. The scene takes place in an outdoor arena with spectators behind barriers and trees and buildings in the distance, suggesting a live event or competition. The blue monster truck's shadow is cast on the ground below, emphasizing its height and motion.

Multi objects answer:

<Short Description>: `object_1: Blue monster truck soaring through the air. object_2: Line of monster trucks on dirt track.`

<Long Description>: The blue monster truck, `object_1`, is captured mid-air, performing a high jump over the dirt track. Below it, `object_2`, a line of monster trucks, is parked or moving slowly along the track, creating a dynamic contrast between the airborne vehicle and the grounded ones. The scene unfolds at an outdoor event with spectators visible in the background, emphasizing the spectacle of the stunt."""


def test_box2_prompt_is_the_papers_text_whole():
    """The prompt sent for two objects over two frames equals Box 2 with its two slots filled. Normalised: the
    paper's code-font backticks are dropped (around the slot `box_list_prompt`, `object_1`, `object_2` and the
    example short descriptions); the template writes none."""
    frames = (np.zeros((8, 8, 3), np.uint8),) * 2
    job = UFVideoJob(frames, (BoxedObject("object_1", ((0, 0, 10, 10), (5, 5, 20, 20))),
                              BoxedObject("object_2", (None, (500, 100, 900, 1000)))))
    chat = FakeChat(fn=box2_answer)
    UFVideoAnnotator(chat).annotate([job])
    prompt = chat.requests[0].messages[0].content[-1]
    expected = (BOX2
                .replace("`box_list_prompt`", "object_1: [[0, 0, 10, 10], [5, 5, 20, 20]]; object_2: [null, [500, 100, 900, 1000]]")
                .replace("{object short description prompt}",
                         " object_1: <short description of object_1> object_2: <short description of object_2>")
                .replace("`", ""))
    assert prompt == expected


def test_an_invalid_annotation_is_asked_again_with_the_format_then_rejected():
    job = UFVideoJob((np.zeros((8, 8, 3), np.uint8),), (BoxedObject("object_1", ((0, 0, 10, 10),)),))
    chat = FakeChat(["no sections", "still none", "nothing"])
    (failure,) = UFVideoAnnotator(chat, UFVideoAnnotatorConfig(retries=2)).annotate([job])
    assert failure.reason == "invalid_answer" and failure.raw == ("no sections", "still none", "nothing")
    repair = chat.requests[1].messages[-1].content[0]
    assert "<Short Description>: object_1: <short description> <Long Description>:" in repair
    prompt = chat.requests[0].messages[0].content[-1]
    assert "Object box lists: object_1: [[0, 0, 10, 10]].\n" in prompt
    assert prompt.startswith("I upload multiple frames of the video as single-frame images")


def test_pixrqa_pixhqa_pixtrqa_samples(tmp_path):
    # two objects on frames 0-29; a third only on frames 10-19 (one continuous run), a ReVOS-like item
    item, truth = object_item(tmp_path / "v", objects=3, frames=30, present={2: range(10, 20)}, dataset="revos")
    chat = FakeChat(fn=box2_answer)
    dataset = _run(tmp_path, [item], chat)
    samples = from_table(SampleRecord, dataset.read_table("samples"))
    masklets = {m.masklet_id: m for m in from_table(MaskletRecord, dataset.read_table("masklets"))}
    by_type = {t: [s for s in samples if s.data_type == t] for t in ufvideo.DATA_TYPES}
    assert {t: len(v) for t, v in by_type.items()} == {"pixrqa": 1, "pixhqa": 1, "pixtrqa": 1}  # one group of 3
    rqa, hqa, trqa = by_type["pixrqa"][0], by_type["pixhqa"][0], by_type["pixtrqa"][0]
    # PixRQA: a region and a [SEG] per object; the prompt frame is one of the first three shared by all objects
    question, answer = rqa.conversation[0].value, rqa.conversation[1].value
    assert question.count("<region>") == 3 and answer.count("[SEG]") == 3
    assert len(rqa.masklet_ids) == 6 and rqa.masklet_ids[:3] == rqa.masklet_ids[3:]
    prompt = int(rqa.labels["prompt_frame"])
    assert prompt in (10, 11, 12)
    labels = [int(i) for i in rqa.labels["label_frames"].split(",")]
    assert prompt not in labels and sorted(labels + [prompt]) == list(range(30))
    # PixHQA: objects in words, a temporal token, labels inside that time
    q = hqa.conversation[0].value
    assert "<region>" not in q and re.search(r"<Temp-\d+>", q) and hqa.conversation[1].value.count("[SEG]") == 3
    times = [float(t) for t in hqa.labels["time_s"].split(",")]
    hqa_labels = [int(i) for i in hqa.labels["label_frames"].split(",")]
    assert all(times[0] - 5e-4 <= i / FPS <= times[-1] + 5e-4 for i in hqa_labels)  # time_s is to the millisecond
    # PixTRQA: the third object's run bounds the period only where every object is continuous: all three are
    temporal = [int(x) for x in trqa.labels["temporal"].split(",")]
    assert trqa.conversation[1].value.startswith(f"The Time is {{<Temp-{temporal[0]}><Temp-{temporal[1]}>}}.")
    assert temporal == [0, temp_index(29 / FPS, 30 / FPS)] and trqa.labels["time_s"] == f"0.000,{29 / FPS:.3f}"
    for s in samples:  # every masklet named is the item's
        assert set(s.masklet_ids) <= set(masklets)
    assert all(s.window is None for s in samples)


def test_pixtrqa_period_is_the_run_of_the_objects_masks(tmp_path):
    item, _ = object_item(tmp_path / "v", objects=1, frames=30, present={0: range(10, 20)}, dataset="revos")
    dataset = _run(tmp_path, [item], FakeChat(fn=box2_answer), data_types=("pixtrqa",))
    (trqa,) = from_table(SampleRecord, dataset.read_table("samples"))
    assert trqa.labels["temporal"] == f"{temp_index(10 / FPS, 5.0)},{temp_index(19 / FPS, 5.0)}" == "33,63"
    assert trqa.labels["label_frames"] == ",".join(map(str, range(10, 20))) and trqa.labels["prompt_frame"] in "10 11 12"
    assert trqa.conversation[1].value.startswith("The Time is {<Temp-33><Temp-63>}. The boxes, object_1, slide")


def test_dispersed_objects_give_no_pixtrqa_and_groups_hold_at_most_four(tmp_path):
    item, _ = object_item(tmp_path / "v", objects=5, frames=12, present={4: [0, 1, 2, 8, 9]}, dataset="revos")
    dataset = _run(tmp_path, [item], FakeChat(fn=box2_answer), data_types=("pixrqa", "pixtrqa"))
    samples = from_table(SampleRecord, dataset.read_table("samples"))
    rqa = [s for s in samples if s.data_type == "pixrqa"]
    assert sorted(int(s.labels["objects"]) for s in rqa) == [1, 4]
    trqa = [s for s in samples if s.data_type == "pixtrqa"]
    assert [int(s.labels["objects"]) for s in trqa] == [4]  # the fifth object appears twice: dispersed
    assert not [s for s in samples if s.data_type == "pixhqa"]


def test_a_source_other_than_trqa_datasets_gives_no_pixtrqa_and_bad_answers_are_rejections(tmp_path):
    item, _ = object_item(tmp_path / "v", objects=2, frames=10, dataset="mevis")
    dataset = _run(tmp_path, [item], FakeChat(fn=lambda r: "no format"), data_types=("pixrqa",))
    assert not dataset.read_table("samples").num_rows
    (rejection,) = from_table(RejectionRecord, dataset.read_table("rejections"))
    assert rejection.reason == "invalid_answer" and rejection.raw_answer == "no format"


@pytest.mark.parametrize("kwargs", [{"frames": 1}, {"max_objects": 0}, {"period_share": 0}])
def test_config_bounds(kwargs):
    with pytest.raises(ValueError):
        ufvideo.UFVideoConfig(**kwargs)


def test_ufvideo_builds_on_the_engines_own_videorefer_object_qa(tmp_path):
    """UFVideo built PixRQA and PixHQA from VideoRefer-700K: here from a dataset VideoRefer's object QA wrote
    (fake chat backends), opened as a source; the label masks are the release's, pixel for pixel."""
    import json

    from engine.sources import open_source
    from flows import videorefer
    from tests.test_videorefer_pipeline import Models, answer, kind_of

    def describe(request) -> str:  # the Annotator on the boxes' expressions; the Refiner's QA as VideoRefer's tests
        kind = kind_of(request)
        if kind == "dynamic":
            return json.dumps({"moves_or_acts": True, "description": "It slides to the right."})
        return "A flat colored box." if kind == "static" else answer(request)

    item, truth = object_item(tmp_path / "v", objects=2, frames=12)
    refer = Dataset(str(tmp_path / "videorefer"))
    stats, models = Stats(), Models(describe)
    pipeline = videorefer.build(load_config("tiny"), models.backends(), stats=stats, dataset=refer, data_types=("object_qa",))
    Runner(pipeline, refer, stats=stats).run([item])
    qa = [s for s in refer.read_table("samples").to_pylist() if s["data_type"] == "object_qa"]
    assert qa  # the fake Refiner asks about the first region (the red box) only

    items = list(open_source(refer.url))
    assert len(items) == 1 and items[0].dataset == "engine" and items[0].source == item.source
    assert [o.object_id for o in items[0].objects] == sorted({i for s in qa for i in s["masklet_ids"]})
    dataset = _run(tmp_path, items, FakeChat(fn=box2_answer), data_types=("pixrqa",))
    (rqa,) = from_table(SampleRecord, dataset.read_table("samples"))
    masklets = {m.masklet_id: m for m in from_table(MaskletRecord, dataset.read_table("masklets"))}
    by_color = {"the red box": 0, "the blue box": 1}
    from engine import masks as mask_codec

    for masklet_id in rqa.masklet_ids:
        masklet = masklets[masklet_id]
        k = by_color[masklet.expression]
        assert [f.frame_index for f in masklet.frames] == sorted(truth[k].masks)
        for f in masklet.frames:
            assert np.array_equal(mask_codec.decode(f.rle), truth[k].masks[f.frame_index])
