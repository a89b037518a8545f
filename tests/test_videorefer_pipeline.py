"""The VideoRefer pipeline end to end through the shared runner, over real files (a caption manifest of synthetic
videos, a tiny MeViS layout), with a scripted chat model and the color fakes: samples, rejections, funnel
counters, batching, the VideoRefer JSON export read back field by field, reruns and a model fault."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from engine import masks
from engine.config import load_config
from engine.export import export
from engine.models.interfaces import ChatImage, ChatRequest
from engine.runner import Runner
from engine.sources import read_manifest, read_mevis
from engine.stats import Stats
from engine.storage import Dataset
from flows import videorefer
from schemas import MaskletRecord, RejectionRecord, SampleRecord, WorkItem, from_table
from tests import synthetic
from tests.fakes import FakeChat, FakeColorBoxSegmenter, FakeColorDetector, FakeColorTracker

RED, BLUE, YELLOW, GREEN = (230, 30, 30), (30, 60, 230), (240, 220, 30), (40, 200, 60)

# -- the scripted models ---------------------------------------------------------------------------------------

# Three captions of the entities video (a red and a blue "person" crossing, a yellow ball, a green dog). The
# detector knows "man" (red), "woman" (blue), "ball" (yellow) and, wrongly, "cat" as the green dog.
CAPTION_A = "A man in red walks past a cat while a statue stands still."
CAPTION_B = "A woman in blue walks to the left as a yellow ball rolls in."
CAPTION_C = "A green dog trots along the top of the yard."
NOUNS = {
    CAPTION_A: [("man", True), ("statue", True), ("cat", False)],
    CAPTION_B: [("woman", True), ("ball", False)],
    CAPTION_C: [("dog", True)],
}
SUBJECT = {CAPTION_A: "man", CAPTION_B: "woman", CAPTION_C: "dog"}
# What the video LLM says of each object: moves or not, its dynamic and static descriptions, and the merge.
OBJECTS = {
    "man": (True, "The man walks from left to right.", "The man wears a red shirt.",
            "The man wears a red shirt and walks from left to right."),
    "statue": (False, "The statue stays still the whole time.", "", ""),
    "cat": (True, "The cat trots to the left.", "The cat is small and green.", ""),
    "woman": (True, "The woman walks from right to left.", "The woman wears a blue coat.",
              "The woman wears a blue coat and walks from right to left."),
    "ball": (False, "The ball lies still.", "The ball is round and yellow.",
             "The ball is round and yellow and lies still."),
    "dog": (True, "The dog trots left, leaves and comes back.", "The dog is green.",
            "The dog is green; it trots left, leaves and comes back."),
    # MeViS referring expressions
    "the two boxes": (True, "The two boxes slide apart.", "Two flat boxes, one red and one blue.", ""),
    "the box moving down": (True, "The box moves down.", "A blue box.", ""),
    "the still box": (False, "The box stays where it is.", "A green box in the corner.", ""),
}
# The region captioner names the outlined object by its color.
REGION_CAPTIONS = {
    RED: "A man in a red shirt, walking.",
    BLUE: "A woman in a blue coat, walking.",
    YELLOW: "A round yellow ball.",
    GREEN: "A green dog standing on the ground.",
}
OUTLINE = (255, 0, 0)  # ReviewerConfig's default outline color


def prompt_of(request: ChatRequest) -> str:
    return " ".join(p for p in request.messages[0].content if isinstance(p, str))


PROMPT_KINDS = (  # how each VideoRefer agent's prompt starts, and what it asks
    ("List the objects mentioned", "analyzer"),
    ("What is the main subject", "analyzer_short"),
    ("Watch ", "dynamic"),
    ("Look at ", "static"),
    ("One object in this image is outlined", "region_caption"),
    ("Two descriptions were written", "judge"),
    ("Merge two descriptions", "merge"),
    ("You write questions and answers", "qa"),
)


def kind_of(request: ChatRequest) -> str:
    prompt = prompt_of(request)
    kind = next((k for start, k in PROMPT_KINDS if prompt.startswith(start)), None)
    assert kind, f"a prompt no agent of the pipeline writes: {prompt[:120]!r}"
    return kind


def _object_name(prompt: str) -> str:
    match = re.search(r'(?:Watch|Look at) (?:the object described as "(.+?)"|the (.+?)) in this video', prompt)
    assert match, prompt
    return match.group(1) or match.group(2)


def _region_caption(request: ChatRequest) -> str:
    """The color at the middle of the outlined region, as the captioner's words."""
    (image,) = [p for p in request.messages[0].content if isinstance(p, ChatImage)]
    pixels = image.pixels
    ys, xs = np.nonzero((pixels == np.array(OUTLINE, dtype=np.uint8)).all(axis=2))
    assert len(ys), "the region is not outlined"
    center = pixels[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2].astype(float)
    color = min(REGION_CAPTIONS, key=lambda c: ((np.array(c) - center) ** 2).sum())
    return REGION_CAPTIONS[color]


def _judge(prompt: str) -> str:
    region = re.search(r'marked region:\s*"""(.*?)"""', prompt, re.S).group(1)
    noun = re.search(r"about the (.+?):", prompt).group(1)
    words = set(re.findall(r"[a-z]+", region.lower()))
    if noun in words:
        return json.dumps({"reason": f"Both describe a {noun}.", "same_object": True})
    seen = next(w for w in ("man", "woman", "ball", "dog") if w in words)
    return json.dumps({"reason": f"A shows a {seen}, but B is about a {noun}.", "same_object": False})


def _qa(prompt: str) -> str:
    regions = dict(re.findall(r"<region(\d+)>(?: \(\d+ objects, plural\))?: (.+?)\. ", prompt))
    assert regions and set(regions) <= {"0", "1", "2"}, regions
    if len(regions) < 3:
        pairs = [{"kind": k, "question": q, "answer": "It moves.", "regions": [0]} for k, q in (
            ("basic", "What is <region0> doing?"), ("reasoning", "Why does <region0> move?"),
            ("future", "What will <region0> do next?"))]
        return json.dumps({"pairs": pairs})
    pairs = [
        {"kind": "basic", "question": "What are <region0> doing?", "answer": "<region0> slide apart.", "regions": [0]},
        {"kind": "reasoning", "question": "Why is <region2> not moving while <region1> goes down?",
         "answer": "It is not pushed.", "regions": [2, 1]},
        {"kind": "future", "question": "Where will <region1> be relative to <region0> next?",
         "answer": "<region1> will be below <region0>.", "regions": [1, 0]},
    ]
    return json.dumps({"pairs": pairs})


def answer(request: ChatRequest) -> str:
    """What a well-behaved model would answer to each of the pipeline's prompts."""
    kind, prompt = kind_of(request), prompt_of(request)
    caption = re.search(r'Caption: """(.*?)"""', prompt)
    if kind == "analyzer":
        nouns = NOUNS[caption.group(1)]
        return json.dumps({"nouns": [{"noun": n, "is_subject": s, "count": 1} for n, s in nouns]})
    if kind == "analyzer_short":
        return json.dumps({"subject": SUBJECT[caption.group(1)], "plural": False})
    if kind == "dynamic":
        moves, dynamic, _, _ = OBJECTS[_object_name(prompt)]
        return json.dumps({"moves_or_acts": moves, "description": dynamic})
    if kind == "static":
        return OBJECTS[_object_name(prompt)][2]
    if kind == "region_caption":
        return _region_caption(request)
    if kind == "judge":
        return _judge(prompt)
    if kind == "merge":
        name = re.search(r"Object: (.+)", prompt).group(1).strip()
        _, dynamic, static, merged = OBJECTS[name]
        assert dynamic in prompt and static in prompt  # both descriptions reach the Refiner
        return merged
    return _qa(prompt)


class Models:
    """Fake backends for every role; one FakeChat per chat role, so each role's batches can be counted."""

    def __init__(self, fn=answer) -> None:
        self.llm, self.vlm = FakeChat(fn=fn), FakeChat(fn=fn)
        self.region_captioner, self.refiner = FakeChat(fn=fn), FakeChat(fn=fn)
        self.detector = FakeColorDetector({"man": [RED], "woman": [BLUE], "ball": [YELLOW], "cat": [GREEN], "dog": [GREEN]})
        self.box_segmenter = FakeColorBoxSegmenter()
        self.tracker = FakeColorTracker(image_size=160)

    def backends(self) -> dict:
        return {role: getattr(self, role) for role in videorefer.roles(load_config("tiny"))}

    def batches(self, kind: str) -> list[int]:
        """Sizes of the batches of one kind of prompt, over every chat role."""
        chats = (self.llm, self.vlm, self.region_captioner, self.refiner)
        return [len(b) for chat in chats for b in chat.batches if kind_of(b[0]) == kind]


def _runner(dataset: Dataset, models: Models, data_types=videorefer.DATA_TYPES, *, max_side: int | None = None,
            **options) -> Runner:
    config = load_config("tiny")
    if max_side is not None:
        decode = {**config.section("decode"), "max_side": max_side}
        config = config.model_copy(update={"pipeline": {**config.pipeline, "decode": decode}})
    stats = Stats()
    pipeline = videorefer.build(config, models.backends(), stats=stats, dataset=dataset, data_types=data_types)
    return Runner(pipeline, dataset, stats=stats, **options)


# -- inputs: a caption manifest over synthetic videos, a MeViS layout ------------------------------------------


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> tuple[Path, synthetic.GroundTruth]:
    folder = tmp_path_factory.mktemp("captions")
    truth = synthetic.entities_video(folder / "a.mp4")
    data = (folder / "a.mp4").read_bytes()
    (folder / "b.mp4").write_bytes(data + b"\0")  # same frames, other content hashes (other video ids)
    (folder / "c.mp4").write_bytes(data + b"\0\0")
    rows = [{"video": "a.mp4", "caption": CAPTION_A}, {"video": "b.mp4", "caption": CAPTION_B},
            {"video_path": "c.mp4", "caption": CAPTION_C, "extra": 1}]
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, truth


MW, MH = 64, 48
MEVIS_COLORS = {"10": (220, 40, 40), "11": (40, 40, 220), "13": (40, 200, 60)}


def _rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((MH, MW), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture(scope="module")
def mevis(tmp_path_factory) -> tuple[Path, dict[str, dict[int, np.ndarray]], dict[str, list]]:
    """One MeViS video of 6 frames: box 10 moving right, box 11 moving down (not annotated on frame 1), box 13
    still; "the two boxes" refers to 10 and 11. Returns the root, the exact masks, and the written entries."""
    root = tmp_path_factory.mktemp("mevis")
    truth = {
        "10": {i: _rect(2 + 4 * i, 4, 14 + 4 * i, 14) for i in range(6)},
        "11": {i: _rect(40, 2 + 4 * i, 52, 12 + 4 * i) for i in (0, 2, 3, 4, 5)},
        "13": {i: _rect(2, 34, 9, 45) for i in range(6)},
    }
    frames = root / "JPEGImages" / "v1"
    frames.mkdir(parents=True)
    for i in range(6):
        image = np.full((MH, MW, 3), 90, dtype=np.uint8)
        for obj, per_frame in truth.items():
            if i in per_frame:
                image[per_frame[i]] = MEVIS_COLORS[obj]
        Image.fromarray(image).save(frames / f"{i:05d}.jpg", quality=95)

    def uncompressed(mask: np.ndarray) -> dict:  # column-major run lengths, starting with zeros
        flat = mask.flatten(order="F").astype(np.int8)
        changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
        return {"size": [MH, MW], "counts": np.diff(np.concatenate([[0], changes])).tolist()}

    written = {
        "10": [masks.encode(truth["10"][i]).model_dump() for i in range(6)],
        "11": [uncompressed(truth["11"][i]) if i in truth["11"] else None for i in range(6)],
        "13": [masks.encode(truth["13"][i]).model_dump() for i in range(6)],
    }
    meta = {"videos": {"v1": {
        "expressions": {
            "0": {"exp": "the two boxes", "obj_id": [0, 1], "anno_id": [10, 11]},
            "1": {"exp": "the box moving down", "obj_id": [1], "anno_id": [11]},
            "2": {"exp": "the still box", "obj_id": [3], "anno_id": [13]},
        },
        "frames": [f"{i:05d}" for i in range(6)],
    }}}
    (root / "meta_expressions.json").write_text(json.dumps(meta))
    (root / "mask_dict.json").write_text(json.dumps(written))
    return root, truth, written


def _items(manifest_path: Path, mevis_root: Path | None = None) -> list[WorkItem]:
    items = list(read_manifest(str(manifest_path)))
    return items + (list(read_mevis(mevis_root)) if mevis_root else [])


@pytest.fixture(scope="module")
def built(manifest, mevis, tmp_path_factory):
    """One run of the whole pipeline over the three caption items and the MeViS video, into one dataset."""
    dataset = Dataset(str(tmp_path_factory.mktemp("out") / "ds"))
    models = Models()
    runner = _runner(dataset, models)
    outcomes = runner.run(_items(manifest[0], mevis[0]))
    return dataset, runner, models, outcomes


def _samples(dataset: Dataset) -> list[SampleRecord]:
    return from_table(SampleRecord, dataset.read_table("samples"))


def _masklets(dataset: Dataset) -> dict[str, MaskletRecord]:
    return {m.masklet_id: m for m in from_table(MaskletRecord, dataset.read_table("masklets"))}


# -- caption items --------------------------------------------------------------------------------------------


def test_caption_items_give_reviewed_detailed_captions(built, manifest):
    dataset, runner, models, outcomes = built
    _, truth = manifest
    assert [o.status for o in outcomes] == ["done"] * 4, [o.detail for o in outcomes]
    video_of = {o.item.caption: o.video_id for o in outcomes[:3]}
    source_of = {o.video_id: str(manifest[0].parent / name) for o, name in zip(outcomes, ("a.mp4", "b.mp4", "c.mp4"))}
    assert len(set(video_of.values())) == 3
    masklets = _masklets(dataset)
    detailed = {(s.video_id, s.masklet_ids and masklets[s.masklet_ids[0]].noun): s
                for s in _samples(dataset) if s.data_type == "detailed_caption"}
    assert set(detailed) == {(video_of[CAPTION_A], "man"), (video_of[CAPTION_A], "cat"),
                             (video_of[CAPTION_B], "woman"), (video_of[CAPTION_B], "ball"),
                             (video_of[CAPTION_C], "dog")}

    for (video_id, noun), sample in detailed.items():
        human, gpt = sample.conversation
        assert human.role == "human" and gpt.role == "gpt"
        assert human.value.startswith("<video>\n") and human.value.count("<region>") == 1
        assert gpt.value.count("<region>") == 0
        (masklet_id,) = sample.masklet_ids
        masklet = masklets[masklet_id]
        assert (masklet.video_id, masklet.method, masklet.expression) == (video_id, "videorefer", noun)
        (prompt,) = masklet.prompts  # one track, from the frame of the noun's best box
        assert (prompt.frame_index, prompt.reason, prompt.box) == (masklet.start_frame, "start", masklet.detector_box)
        assert masklet.track_fps is not None and masklet.track_fps > 0
        assert sample.review is not None and sample.review.region_caption
        assert sample.review.frame_index in {f.frame_index for f in masklet.frames}
        assert 0 < len(sample.frames) <= 16 and set(sample.frames) <= {f.frame_index for f in masklet.frames}
        assert sample.source == source_of[video_id]
        assert sample.provenance.models["detector"] == "fake/color-detector"
        assert set(sample.provenance.prompt_hashes) >= {"analyzer", "annotator_dynamic", "reviewer", "refiner_caption"}
        if noun != "cat":
            assert sample.kept and sample.review.verdict
            assert gpt.value == OBJECTS[noun][3]  # the Refiner's merged text
            assert sample.review.reason == f"Both describe a {noun}."

    # The detector took the green dog for the "cat"; the Reviewer sees a dog and drops it, with its reason.
    cat = detailed[(video_of[CAPTION_A], "cat")]
    assert not cat.kept and not cat.review.verdict
    assert cat.review.reason == "A shows a dog, but B is about a cat."
    assert cat.review.region_caption == REGION_CAPTIONS[GREEN]
    assert cat.conversation[1].value == "The cat is small and green. The cat trots to the left."  # not refined
    # The masklets are the right objects: the man's is the red person's, not the blue one's.
    man = masklets[detailed[(video_of[CAPTION_A], "man")].masklet_ids[0]]
    middle = man.frames[len(man.frames) // 2]
    pred, gt = masks.decode(middle.rle), truth.mask("red person", middle.frame_index)
    assert (pred & gt).sum() / (pred | gt).sum() > 0.6
    # The static subject is neither described again nor segmented.
    asked = [r for b in models.vlm.batches for r in b if kind_of(r) == "static"]
    assert asked and all("statue" not in prompt_of(r) for r in asked)
    assert all(m.noun != "statue" for m in masklets.values())


def test_static_subject_is_rejected_with_the_raw_answer(built):
    dataset, _, _, outcomes = built
    rejections = from_table(RejectionRecord, dataset.read_table("rejections"))
    (static,) = [r for r in rejections if r.reason == "static_only"]
    assert (static.stage, static.expression, static.video_id) == ("annotator", "statue", outcomes[0].video_id)
    assert json.loads(static.raw_answer) == {"moves_or_acts": False, "description": OBJECTS["statue"][1]}
    assert "statue" in static.detail
    assert len(rejections) == 1  # nothing else was lost
    assert len({r.rejection_id for r in rejections}) == len(rejections)


def test_short_captions_answer_with_the_raw_caption(built):
    dataset, _, _, outcomes = built
    masklets = _masklets(dataset)
    short = [s for s in _samples(dataset) if s.data_type == "short_caption"]
    by_video = {s.video_id: s for s in short}
    assert len(short) == 3 and len(by_video) == 3
    for outcome in outcomes[:3]:
        sample = by_video[outcome.video_id]
        assert sample.conversation[1].value == outcome.item.caption
        assert sample.conversation[0].value.count("<region>") == 1 and sample.kept and sample.review is None
        (masklet_id,) = sample.masklet_ids
        assert masklets[masklet_id].noun == SUBJECT[outcome.item.caption]
    # The short caption's subject shares the detailed caption's masklet: tracked once.
    detailed_ids = {m for s in _samples(dataset) if s.data_type == "detailed_caption" for m in s.masklet_ids}
    assert {s.masklet_ids[0] for s in short} <= detailed_ids
    assert sum(m.method == "videorefer" for m in masklets.values()) == 5


def test_chat_calls_are_batched_over_items_and_objects(built):
    _, _, models, _ = built
    assert models.batches("analyzer") == [3]  # every caption of the run in one call
    assert models.batches("analyzer_short") == [3]
    # Per video: the Annotator's dynamic step in one call for all its nouns, the static step for the survivors.
    assert sorted(models.batches("dynamic")) == [1, 2, 3, 3]  # C, B, A (man, statue, cat), MeViS (3 expressions)
    assert sorted(models.batches("static")) == [1, 2, 2, 3]  # the static statue is not asked again
    assert sorted(models.batches("region_caption")) == [1, 2, 2]
    assert sorted(models.batches("judge")) == [1, 2, 2]
    assert sorted(models.batches("merge")) == [1, 1, 2]  # the dropped cat is not refined
    assert models.batches("qa") == [1]
    assert models.box_segmenter.calls and models.tracker.sessions == models.tracker.closed


def test_funnel_and_sample_counters(built):
    _, runner, _, _ = built
    c = runner.stats.counters
    assert (c["funnel.analyzer.in"], c["funnel.analyzer.out"]) == (6, 6)  # 3 captions x (detailed, short)
    assert (c["funnel.annotator.in"], c["funnel.annotator.out"]) == (9, 8)  # 6 nouns + 3 expressions
    assert c["funnel.annotator.dropped.static_only"] == 1
    assert (c["funnel.segmentor.in"], c["funnel.segmentor.out"]) == (5, 5)
    assert (c["funnel.reviewer.in"], c["funnel.reviewer.out"]) == (5, 4)
    assert c["funnel.reviewer.dropped.not_same_object"] == 1
    assert (c["funnel.refiner.in"], c["funnel.refiner.out"]) == (4 + 1, 4 + 1)  # 4 merges, 1 QA job
    assert c["samples.detailed_caption.kept"] == 4 and c["samples.detailed_caption.dropped"] == 1
    assert c["samples.short_caption.kept"] == 3 and c["samples.short_caption.dropped"] == 0
    assert c["samples.object_qa.kept"] == 3
    dropped = {k for k in c if k.startswith("funnel.") and ".dropped." in k and c[k]}
    assert dropped == {"funnel.annotator.dropped.static_only", "funnel.reviewer.dropped.not_same_object"}
    assert c["items_done"] == 4 and c["frames_decoded"] == 3 * 60 + 6


# -- a mask source -----------------------------------------------------------------------------------------------


def test_mevis_expressions_give_object_qa_on_source_masks(built, mevis):
    dataset, _, _, outcomes = built
    _, truth, written = mevis
    video_id = outcomes[3].video_id
    masklets = {m.noun: m for m in _masklets(dataset).values() if m.video_id == video_id}
    assert set(masklets) == {"10", "11", "13"}
    for obj, m in masklets.items():
        assert m.method == "source" and m.assignment.method == "source" and m.num_frames_tracked == 0
        assert [f.frame_index for f in m.frames] == sorted(truth[obj])
        for f in m.frames:
            assert np.array_equal(masks.decode(f.rle), truth[obj][f.frame_index])
            assert f.timestamp == pytest.approx(f.frame_index / 6.0, abs=1e-6)
            assert f.box == masks.mask_box(truth[obj][f.frame_index])
        if obj != "11":  # compressed RLE in, the same string out
            assert [f.rle.counts for f in m.frames] == [e["counts"] for e in written[obj]]
    assert masklets["10"].expression == "the two boxes" and masklets["13"].expression == "the still box"

    qa = {s.task: s for s in _samples(dataset) if s.video_id == video_id}
    assert set(qa) == {"basic", "reasoning", "future"} and all(s.data_type == "object_qa" for s in qa.values())
    m10, m11, m13 = (masklets[o].masklet_id for o in ("10", "11", "13"))
    expected = {
        "basic": ("What are <region> and <region> doing?", [m10, m11], "The two boxes slide apart."),
        "reasoning": ("Why is <region> not moving while <region> goes down?", [m13, m11], "It is not pushed."),
        "future": ("Where will <region> be relative to <region> and <region> next?", [m11, m10, m11],
                   "The box moving down will be below the two boxes."),
    }
    for task, (question, ids, reply) in expected.items():
        sample = qa[task]
        assert sample.conversation[0].value == f"<video>\n{question}"
        assert sample.masklet_ids == ids  # one per <region>, in token order
        assert sample.conversation[1].value == reply  # regions named in the answer, as the expression says
        assert "<region" not in sample.conversation[1].value
        assert sample.kept and sample.review is None
        assert sample.frames == list(range(6))


def test_source_masks_follow_a_smaller_decode_size(mevis, tmp_path):
    """Frames decoded at half size: the ground truth is resized with them (every mask of a dataset refers to
    the decoded size); masks of a size that is neither are rejected, one row per object."""
    import cv2

    root, truth, _ = mevis
    (item,) = read_mevis(root)
    foreign = {p: masks.encode(np.ones((10, 10), dtype=bool)) for p in range(6)}
    objects = [o if o.object_id == "13" else o.model_copy(update={"masks": foreign}) for o in item.objects]
    item = item.model_copy(update={"objects": objects})
    dataset = Dataset(str(tmp_path / "ds"))
    runner = _runner(dataset, Models(), max_side=32)
    (outcome,) = runner.run([item])
    assert outcome.status == "done", outcome.detail
    (m13,) = dataset.read_records("masklets")
    assert m13.noun == "13" and len(m13.frames) == 6
    for f in m13.frames:
        assert f.rle.size == [24, 32]
        half = cv2.resize(truth["13"][f.frame_index].astype(np.uint8), (32, 24), interpolation=cv2.INTER_NEAREST) > 0
        assert (masks.decode(f.rle) ^ half).sum() <= 0.2 * half.sum()
    assert runner.stats.counters["source_masks_resized"] == 6
    # Objects 10 and 11 share one expression: still one row each, with ids of their own.
    mismatch = [r for r in dataset.read_records("rejections") if r.reason == "mask_size_mismatch"]
    assert sorted(r.detail.split(":")[0] for r in mismatch) == ["object 10", "object 11"]
    assert len({r.rejection_id for r in mismatch}) == 2 and all(r.stage == "segmentor" for r in mismatch)
    # Only "the still box" still has an object: its questions use the resized masks.
    samples = _samples(dataset)
    assert len(samples) == 3 and all(s.masklet_ids == [m13.masklet_id] for s in samples)


# -- export --------------------------------------------------------------------------------------------------


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_export_writes_videorefer_json(built, mevis, manifest, tmp_path):
    dataset, _, _, outcomes = built
    _, truth, _ = mevis
    summary = export(dataset.url, str(tmp_path / "json"))
    assert summary.skipped == Counter({"dropped_by_reviewer": 1})
    files = {Path(p).name: n for p, n in summary.files.items()}
    assert files == {"detailed_caption.json": 4, "short_caption.json": 3, "object_qa.json": 3}

    samples = {s.sample_id: s for s in _samples(dataset)}
    masklets = _masklets(dataset)
    videos = {v["video_id"]: v for v in dataset.read_table("videos").to_pylist()}
    seen = set()
    for name in files:
        entries = json.loads((tmp_path / "json" / name).read_text())
        for entry in entries:
            assert set(entry) == {"id", "video", "conversations", "annotation", "height", "width", "refers_to"}
            sample = samples[entry["id"]]
            seen.add(entry["id"])
            assert sample.kept and f"{sample.data_type}.json" == name
            video = videos[sample.video_id]
            assert entry["video"] == sample.source == video["source"]
            assert (entry["height"], entry["width"]) == (video["decode_height"], video["decode_width"])
            assert entry["conversations"] == [{"from": t.role, "value": t.value} for t in sample.conversation]
            regions = entry["conversations"][0]["value"].count("<region>")
            assert len(entry["annotation"]) == regions == len(sample.masklet_ids)
            for annotation, masklet_id in zip(entry["annotation"], sample.masklet_ids):
                masklet = masklets[masklet_id]
                stored = {f.frame_index: f.rle for f in masklet.frames}
                assert annotation and all(re.fullmatch(r"\d+", k) for k in annotation)
                assert {int(k) for k in annotation} == set(sample.frames) & set(stored)
                for key, value in annotation.items():
                    rle = value["segmentation"]
                    assert rle["size"] == [entry["height"], entry["width"]]
                    mask = _decode(rle)
                    assert mask.shape == (entry["height"], entry["width"]) and mask.any()
                    assert rle["counts"] == stored[int(key)].counts
                    if masklet.method == "source":  # ground truth comes out bit for bit
                        assert np.array_equal(mask, truth[masklet.noun][int(key)])
    assert seen == {s.sample_id for s in samples.values() if s.kept}
    qa = json.loads((tmp_path / "json" / "object_qa.json").read_text())
    basic = next(e for e in qa if samples[e["id"]].task == "basic")
    assert [sorted(map(int, a)) for a in basic["annotation"]] == [list(range(6)), [0, 2, 3, 4, 5]]
    assert (basic["height"], basic["width"]) == (MH, MW)

    everything = export(dataset.url, str(tmp_path / "all"), include_dropped=True)
    assert not everything.skipped
    detailed = json.loads((tmp_path / "all" / "detailed_caption.json").read_text())
    assert len(detailed) == 5 and any(not samples[e["id"]].kept for e in detailed)


# -- reruns and faults ------------------------------------------------------------------------------------------


def test_rerun_of_the_same_items_is_skipped(built, manifest, mevis, tmp_path):
    dataset, _, _, _ = built
    copy = Dataset(str(tmp_path / "ds"))
    shutil.copytree(dataset.root, copy.root)
    rows = {t: copy.read_table(t).num_rows for t in ("samples", "masklets", "rejections", "videos")}
    models = Models()
    runner = _runner(copy, models)
    outcomes = runner.run(_items(manifest[0], mevis[0]))
    assert [o.status for o in outcomes] == ["skipped"] * 4
    assert not any(chat.batches for chat in (models.llm, models.vlm, models.region_captioner, models.refiner))
    assert not models.detector.calls and models.tracker.sessions == 0
    assert {t: copy.read_table(t).num_rows for t in rows} == rows


def test_a_model_fault_rejects_only_its_item(manifest, tmp_path):
    """The Analyzer's batch fails because of one caption: that item is rejected (internal_error), the others
    complete. A judge answer that never validates is a dropped sample counted under its own reason."""

    def faulty(request: ChatRequest) -> str:
        prompt = prompt_of(request)
        if kind_of(request) in ("analyzer", "analyzer_short") and CAPTION_C in prompt:
            raise RuntimeError("CUDA error: device-side assert triggered\nsecond line")
        if kind_of(request) == "judge" and "about the ball:" in prompt:
            return "The same, I think."
        return answer(request)

    dataset = Dataset(str(tmp_path / "ds"))
    models = Models(faulty)
    runner = _runner(dataset, models)
    outcomes = runner.run(_items(manifest[0]))
    assert [o.status for o in outcomes] == ["done", "done", "rejected"], [o.detail for o in outcomes]
    (rejection,) = outcomes[2].outputs.rejections
    assert rejection.reason == "internal_error" and rejection.source == outcomes[2].item.source
    assert outcomes[2].detail == "RuntimeError: CUDA error: device-side assert triggered"
    stored = from_table(RejectionRecord, dataset.read_table("rejections"))
    assert {(r.reason, r.source) for r in stored} >= {("internal_error", outcomes[2].item.source)}
    samples = _samples(dataset)
    assert {s.video_id for s in samples} == {outcomes[0].video_id, outcomes[1].video_id}
    assert sum(s.data_type == "short_caption" for s in samples) == 2

    ball = next(s for s in samples if s.data_type == "detailed_caption" and "ball" in s.conversation[1].value.lower())
    assert not ball.kept and ball.review.reason.startswith("invalid_judge_answer")
    c = runner.stats.counters
    assert c["funnel.reviewer.dropped.invalid_judge_answer"] == 1 and c["funnel.reviewer.dropped.not_same_object"] == 1
    assert c["items_failed"] == 1 and c["items_done"] == 2
    # The failed item is retried on the next run; the others are skipped.
    rerun = _runner(dataset, Models()).run(_items(manifest[0]))
    assert [o.status for o in rerun] == ["skipped", "skipped", "done"]
    assert not [r for r in dataset.read_records("rejections") if r.reason == "internal_error"]


def test_a_caption_window_keeps_the_source_frame_indexes(manifest, tmp_path):
    """A manifest row with start/end (Panda-70M clips): masks and exported keys are frame indexes of the whole
    file, and each mask is the object's on that frame."""
    path, truth = manifest
    window = tmp_path / "window.jsonl"
    window.write_text(json.dumps({"video": str(path.parent / "a.mp4"), "caption": CAPTION_A, "start": 1.0, "end": 3.0}))
    dataset = Dataset(str(tmp_path / "ds"))
    (outcome,) = _runner(dataset, Models(), data_types=["short_caption"]).run(read_manifest(str(window)))
    assert outcome.status == "done", outcome.detail
    (masklet,) = dataset.read_records("masklets")
    indexes = [f.frame_index for f in masklet.frames]
    assert indexes and 12 <= min(indexes) and max(indexes) < 36  # 12 fps: frames 12 to 35
    for f in masklet.frames:
        pred, gt = masks.decode(f.rle), truth.mask("red person", f.frame_index)
        assert (pred & gt).sum() / (pred | gt).sum() > 0.6, f.frame_index
        assert f.timestamp == pytest.approx(f.frame_index / 12, abs=1e-6)
    export(dataset.url, str(tmp_path / "json"))
    (entry,) = json.loads((tmp_path / "json" / "short_caption.json").read_text())
    assert {int(k) for k in entry["annotation"][0]} <= set(indexes)


def test_two_captions_of_one_video_both_give_samples(manifest, tmp_path):
    path, _ = manifest
    rows = tmp_path / "two.jsonl"
    rows.write_text("".join(json.dumps({"video": str(path.parent / "a.mp4"), "caption": c}) + "\n"
                            for c in (CAPTION_A, CAPTION_B)))
    dataset = Dataset(str(tmp_path / "ds"))
    outcomes = _runner(dataset, Models(), data_types=["short_caption"]).run(read_manifest(str(rows)))
    assert [o.status for o in outcomes] == ["done", "done"]
    # Each item is analyzed with its own caption, and its samples have ids of their own ...
    assert [[s.conversation[1].value for s in o.outputs.samples] for o in outcomes] == [[CAPTION_A], [CAPTION_B]]
    assert len({s.sample_id for o in outcomes for s in o.outputs.samples}) == 2
    # ... and both are committed.
    assert sorted(s.conversation[1].value for s in _samples(dataset)) == sorted([CAPTION_A, CAPTION_B])


def test_analyzer_failures_are_rejected_once_per_mode(manifest, tmp_path):
    """A caption the Analyzer never answers validly: one rejection per mode (detailed, short), each with its
    raw answer and its own id; nothing downstream is asked."""

    def junk(request: ChatRequest) -> str:
        return "Sure! Here are the objects: a man." if kind_of(request).startswith("analyzer") else answer(request)

    models = Models(junk)
    dataset = Dataset(str(tmp_path / "ds"))
    runner = _runner(dataset, models)
    (outcome,) = runner.run(_items(manifest[0])[:1])
    assert outcome.status == "done"
    rejections = dataset.read_records("rejections")
    assert [(r.stage, r.reason) for r in rejections] == [("analyzer", "invalid_answer")] * 2
    assert len({r.rejection_id for r in rejections}) == 2
    assert all(r.raw_answer == "Sure! Here are the objects: a man." for r in rejections)
    assert sorted(r.detail.split(" caption")[0] for r in rejections) == ["detailed", "short"]
    assert runner.stats.counters["funnel.analyzer.dropped.invalid_answer"] == 2
    assert models.batches("analyzer") == [1, 1, 1]  # asked, then re-asked twice with the error
    assert not models.vlm.batches and not models.detector.calls
    assert dataset.read_table("samples").num_rows == 0


def test_data_types_choose_the_work(manifest, mevis, tmp_path):
    """Short captions alone: no Annotator, Reviewer or Refiner call, only the subject is tracked; a mask source
    has nothing to give them, and says so in a rejection instead of spending model calls."""
    models = Models()
    dataset = Dataset(str(tmp_path / "ds"))
    items = _items(manifest[0], mevis[0])
    outcomes = _runner(dataset, models, data_types=["short_caption"]).run([items[0], items[3]])
    assert [o.status for o in outcomes] == ["done", "done"]
    assert [s.data_type for s in _samples(dataset)] == ["short_caption"]
    assert models.batches("analyzer_short") == [1] and not models.batches("analyzer")
    assert not models.vlm.batches and not models.region_captioner.batches and not models.refiner.batches
    assert [m.noun for m in _masklets(dataset).values()] == ["man"]
    (rejection,) = dataset.read_records("rejections")
    assert (rejection.reason, rejection.source) == ("nothing_to_annotate", items[3].source)
    with pytest.raises(ValueError, match="data types must be among"):
        _runner(dataset, models, data_types=["dialogue"])


@pytest.mark.integration
def test_the_prefect_flow_writes_all_three_data_types_and_exports_them(manifest, mevis, tmp_path, monkeypatch):
    """build-videorefer-700k as Prefect runs it (flow, one task per batch, stats merged, manifest and card),
    over a caption manifest and a MeViS folder. The models are the fakes above (the factory is patched to
    return them): random tiny models cannot produce every data type."""
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from prefect.testing.utilities import prefect_test_harness

    from engine.models import factory
    from flows.prefect_flows import build_videorefer_flow

    models = Models()
    monkeypatch.setattr(factory, "build", lambda config, roles, pipeline="": {r: getattr(models, r) for r in roles})
    out = tmp_path / "ds"
    with prefect_test_harness():
        result = build_videorefer_flow(
            source=[str(manifest[0]), str(mevis[0])], out=str(out), profile="tiny", batch_size=2
        )
    assert result["items"] == {"done": 4} and result["version"] == 1
    counters = result["stats"]["counters"]
    assert counters["analyzer_backend_calls"] == 4  # two batches, detailed and short mode each
    samples = _samples(Dataset(str(out)))
    assert {s.data_type for s in samples if s.kept} == {"detailed_caption", "short_caption", "object_qa"}
    manifest_json = json.loads((out / "manifest.json").read_text())
    assert manifest_json["tables"]["samples"]["rows"] == len(samples) and (out / "README.md").exists()
    summary = export(str(out), str(tmp_path / "json"))
    assert {Path(p).name for p in summary.files} == {"detailed_caption.json", "short_caption.json", "object_qa.json"}
    for path, n in summary.files.items():
        entries = json.loads(Path(path).read_text())
        assert len(entries) == n > 0
        for entry in entries:
            assert entry["conversations"][0]["value"].count("<region>") == len(entry["annotation"])
            for region in entry["annotation"]:
                for frame, ann in region.items():
                    rle = ann["segmentation"]
                    assert int(frame) >= 0 and rle["size"] == [entry["height"], entry["width"]]
                    assert mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).any()
