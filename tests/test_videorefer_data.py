"""VideoRefer data a trainer can trust: plural subjects, regions of several objects, windowed captions, the
tiny detector's second noun and the paper profiles.

The defects were found by running the engine end to end against a scripted model server, so the main test
does the same: `engine run videorefer` (its own process, Prefect's ephemeral API) with every chat role on a
scripted OpenAI-compatible server and the tiny random detector and tracker, then `engine export`. Where exact
ground truth is needed (which person each instance's masklet follows), the runner runs in process with the
color fakes, whose detections are the drawn shapes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from engine import masks
from engine.config import load_config
from engine.models.interfaces import ChatRequest, ChatVideo
from engine.runner import Runner
from engine.sources import read_manifest
from engine.stats import Stats
from engine.storage import Dataset
from flows import videorefer
from schemas import MaskletRecord, RejectionRecord, SampleRecord, Window
from tests import synthetic
from tests.fakes import FakeChat, FakeColorBoxSegmenter, FakeColorDetector, FakeColorTracker
from tests.scripted_server import ScriptedServer, completion, scripted_config
from tests.test_videorefer_pipeline import PROMPT_KINDS

PLURAL = "Two dogs chase each other around a bed."
TWO_NOUNS = "A man throws a ball."
PEOPLE = "Two people walk past each other."
ONE_PERSON = "A person walks across the room."
ANALYSIS = {  # caption -> (detailed nouns as (noun, subject, count), short subject, plural)
    PLURAL: ([("dog", True, 2), ("bed", False, 1)], "dog", True),
    TWO_NOUNS: ([("man", True, 1), ("ball", False, 1)], "man", False),
    PEOPLE: ([("person", True, 2)], "person", True),
    ONE_PERSON: ([("person", True, 1)], "person", False),
}
_OBJECT = re.compile(r'(?:Watch|Look at) (?:the object described as "(.+?)"|the (.+?)) in this video')


def kind_of(prompt: str) -> str:
    kind = next((k for start, k in PROMPT_KINDS if prompt.startswith(start)), None)
    assert kind, f"a prompt no VideoRefer agent writes: {prompt[:120]!r}"
    return kind


def analyzer_answer(kind: str, prompt: str) -> str:
    caption = re.search(r'Caption: """(.*?)"""', prompt).group(1)
    nouns, subject, plural = ANALYSIS[caption]
    if kind == "analyzer":
        return json.dumps({"nouns": [{"noun": n, "is_subject": s, "count": c} for n, s, c in nouns]})
    return json.dumps({"subject": subject, "plural": plural})


# -- end to end: the CLI, a scripted model server, tiny random vision models ----------------------------------


def _prompt(body: dict) -> str:
    """The agent's own prompt: the text of the first message (repair turns come after it)."""
    content = body["messages"][0]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def scripted_reply(n: int, body: dict) -> tuple[int, Any, dict, float]:
    """What a well-behaved model answers, except that its first questions about a region of two objects are
    in the singular (the defect as it was found): the Refiner's check must send them back."""
    prompt = _prompt(body)
    kind = kind_of(prompt)
    if kind.startswith("analyzer"):
        text = analyzer_answer(kind, prompt)
    elif kind in ("dynamic", "static"):
        match = _OBJECT.search(prompt)
        name = match.group(1) or match.group(2)
        text = (json.dumps({"moves_or_acts": True, "description": f"The {name} moves around."})
                if kind == "dynamic" else f"The {name} is small.")
    elif kind == "region_caption":
        text = "A small object."
    elif kind == "judge":
        text = json.dumps({"reason": "Both describe a small moving object.", "same_object": True})
    elif kind == "merge":
        name = re.search(r"Object: (.+)", prompt).group(1).strip()
        text = f"The {name} is small and moves around."
    else:
        verb = "is" if len(body["messages"]) == 1 else "are"  # singular at first, plural once told
        pairs = [
            {"kind": "basic", "question": f"What {verb} <region0> doing?", "answer": "<region0> move apart.",
             "regions": [0]},
            {"kind": "reasoning", "question": "Why do <region0> move apart?", "answer": "They are pushed.",
             "regions": [0]},
            {"kind": "future", "question": "Where will <region0> go next?",
             "answer": "<region0> will leave the frame.", "regions": [0]},
        ]
        text = json.dumps({"pairs": pairs})
    return 200, completion(text), {}, 0.0


MW, MH = 64, 48


def mevis_folder(root: Path) -> Path:
    """One MeViS video of 6 frames, two squares moving apart; the expression "both shapes" refers to both."""
    boxes = {"10": lambda i: (4 + 3 * i, 10, 16 + 3 * i, 22), "11": lambda i: (44 - 3 * i, 26, 56 - 3 * i, 38)}
    frames = root / "JPEGImages" / "v1"
    frames.mkdir(parents=True)
    written: dict[str, list] = {obj: [] for obj in boxes}
    for i in range(6):
        image = np.full((MH, MW, 3), 90, dtype=np.uint8)
        for obj, color in (("10", (220, 40, 40)), ("11", (40, 40, 220))):
            x0, y0, x1, y1 = boxes[obj](i)
            mask = np.zeros((MH, MW), dtype=bool)
            mask[y0:y1, x0:x1] = True
            image[mask] = color
            written[obj].append(masks.encode(mask).model_dump())
        Image.fromarray(image).save(frames / f"{i:05d}.jpg", quality=95)
    meta = {"videos": {"v1": {"expressions": {"0": {"exp": "both shapes", "obj_id": [0, 1], "anno_id": [10, 11]}},
                              "frames": [f"{i:05d}" for i in range(6)]}}}
    (root / "meta_expressions.json").write_text(json.dumps(meta))
    (root / "mask_dict.json").write_text(json.dumps(written))
    return root


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`engine run videorefer` over a caption manifest (a plural caption, and a two-noun caption with a
    window) and a MeViS folder, then `engine export`; returns the dataset, the export folder and the
    requests the model server answered."""
    from flows.cli import app

    tmp = tmp_path_factory.mktemp("cli")
    synthetic.entities_video(tmp / "a.mp4")
    manifest = tmp / "captions.jsonl"
    rows = [{"video": "a.mp4", "caption": PLURAL}, {"video": "a.mp4", "caption": TWO_NOUNS, "start": 1.0, "end": 3.0}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mevis = mevis_folder(tmp / "mevis")
    out = tmp / "ds"
    with ScriptedServer(scripted_reply) as server:
        config = scripted_config(  # the tiny detector and tracker as bundled, every chat role on the server
            tmp / "scripted.yaml", server.base_url, chat_roles=("llm", "vlm", "region_captioner", "refiner"),
            settings={"segmentor": {"track_fps": 2.0}, "videorefer": {"annotator_frames": 4}},
        )
        engine = Path(sys.executable).parent / "engine"
        env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "COLUMNS": "200"}
        done = subprocess.run(
            [str(engine), "run", "videorefer", "--source", str(manifest), "--source", str(mevis), "--out", str(out),
             "--profile", "scripted", "--config", str(config)],
            capture_output=True, text=True, timeout=600, env=env,
        )
        requests = [body for _, body in server.requests]
    assert done.returncode == 0, done.stdout + done.stderr
    exported = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp / "json")])
    assert exported.exit_code == 0, exported.output
    return Dataset(str(out)), tmp / "json", requests, done.stdout


def _records(dataset: Dataset):
    from schemas import from_table

    return (from_table(SampleRecord, dataset.read_table("samples")),
            {m.masklet_id: m for m in from_table(MaskletRecord, dataset.read_table("masklets"))},
            from_table(RejectionRecord, dataset.read_table("rejections")))


def _item_video(dataset: Dataset, caption: str) -> str:
    """The video id of the item whose short caption sample answers with `caption`."""
    (video_id,) = {s.video_id for s in _records(dataset)[0] if s.conversation[1].value == caption}
    return video_id


@pytest.mark.integration
def test_cli_plural_subject_is_rejected_and_each_instance_described(cli_run):
    dataset, json_dir, requests, _ = cli_run
    samples, masklets, rejections = _records(dataset)
    # Short captions: the plural subject is skipped with its reason; no sample answers with the plural caption.
    (plural,) = [r for r in rejections if r.reason == "plural_subject"]
    assert plural.stage == "analyzer" and PLURAL in plural.detail
    assert not [s for s in samples if s.conversation[1].value == PLURAL]
    # Detailed captions: one masklet per dog, numbered left to right on the start frame, each described once
    # with its contour on the frames, reviewed and refined; the bed the tiny detector cannot name is rejected.
    video = plural.video_id
    dogs = sorted((m for m in masklets.values() if m.video_id == video and m.noun == "dog"), key=lambda m: m.expression)
    assert [m.expression for m in dogs] == ["dog 1 of 2", "dog 2 of 2"]
    centers = [m.detector_box[0] + m.detector_box[2] for m in dogs]
    assert dogs[0].start_frame == dogs[1].start_frame and centers[0] <= centers[1]
    assert [m.assignment.candidate_index for m in dogs] == [0, 1] and len({m.masklet_id for m in dogs}) == 2
    detailed = {s.masklet_ids[0]: s for s in samples if s.video_id == video and s.data_type == "detailed_caption"}
    assert set(detailed) == {m.masklet_id for m in dogs}
    for sample in detailed.values():
        assert sample.kept and sample.conversation[1].value == "The dog is small and moves around."
        assert sample.refers_to == ["mask"] and sample.window is None  # the whole video
    described = [r for r in requests if kind_of(_prompt(r)) == "dynamic" and "dog" in _prompt(r)]
    assert len(described) == 2 and all("the dog outlined in red" in _prompt(r) for r in described)
    assert [(r.stage, r.reason) for r in rejections if r.video_id == video and r.expression == "bed"] == [
        ("segmentor", "no_detection")]
    entries = json.loads((json_dir / "detailed_caption.json").read_text())
    assert {e["id"] for e in entries} >= {s.sample_id for s in detailed.values()}


@pytest.mark.integration
def test_cli_second_noun_is_segmented_and_windowed_samples_carry_the_window(cli_run):
    """The tiny profile's detector gives a caption's second noun ("ball") boxes of its own, and the samples of
    a manifest row with start/end carry that window: frames 12 to 36 (exclusive) of the 12 fps file."""
    dataset, json_dir, _, _ = cli_run
    samples, masklets, _ = _records(dataset)
    video = _item_video(dataset, TWO_NOUNS)
    assert {m.noun for m in masklets.values() if m.video_id == video} == {"man", "ball"}
    mine = [s for s in samples if s.video_id == video]
    assert Counter(s.data_type for s in mine) == {"detailed_caption": 2, "short_caption": 1}
    window = Window(start_frame=12, end_frame=36, start_s=1.0, end_s=3.0)
    for sample in mine:
        assert sample.window == window and sample.refers_to == ["mask"]
        masklet = masklets[sample.masklet_ids[0]]
        assert all(12 <= f.frame_index < 36 for f in masklet.frames)
    short = json.loads((json_dir / "short_caption.json").read_text())
    assert [e["conversations"][1]["value"] for e in short] == [TWO_NOUNS]
    detailed = json.loads((json_dir / "detailed_caption.json").read_text())
    ids = {s.sample_id for s in mine}
    exported = [e for e in short + detailed if e["id"] in ids]
    assert len(exported) == 3  # each points at its window of the file, not the whole file
    assert all((e["start"], e["end"], e["refers_to"]) == (1.0, 3.0, ["mask"]) for e in exported)


@pytest.mark.integration
def test_cli_region_of_two_objects_is_asked_in_the_plural(cli_run):
    dataset, json_dir, requests, _ = cli_run
    samples, _, _ = _records(dataset)
    qa = {s.task: s for s in samples if s.data_type == "object_qa"}
    assert qa["basic"].conversation[0].value == "<video>\nWhat are <region> and <region> doing?"
    assert qa["basic"].conversation[1].value == "Both shapes move apart."  # not "The both shapes"
    assert qa["future"].conversation[1].value == "Both shapes will leave the frame."
    assert len(qa["basic"].masklet_ids) == 2 and qa["basic"].refers_to == ["mask"]
    asked = [r for r in requests if kind_of(_prompt(r)) == "qa"]
    assert "<region0> (2 objects, plural): both shapes." in _prompt(asked[0])
    assert len(asked) == 2 and "use a plural verb, not 'is'" in asked[1]["messages"][-1]["content"]
    exported = json.loads((json_dir / "object_qa.json").read_text())
    basic = next(e for e in exported if e["id"] == qa["basic"].sample_id)
    assert basic["conversations"][0]["value"].count("<region>") == len(basic["annotation"]) == 2


# -- in process, with the color fakes: exact ground truth -------------------------------------------------------

RED, BLUE = (230, 30, 30), (30, 60, 230)
WHITE = (255, 255, 255)  # the Annotator's contour here: the default red would be the red person's color
COLOR_WORDS = {RED: "red", BLUE: "blue"}


def _color_in(frame: np.ndarray, outline: tuple[int, int, int]) -> str:
    """The color word of the object a contour of `outline` surrounds (its bounding box's middle pixel)."""
    ys, xs = np.nonzero((frame == np.array(outline, dtype=np.uint8)).all(axis=2))
    assert len(ys), "no contour on the frame"
    center = frame[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2].astype(int)
    return COLOR_WORDS[min(COLOR_WORDS, key=lambda c: ((np.array(c) - center) ** 2).sum())]


def fake_answer(request: ChatRequest) -> str:
    prompt = " ".join(p for p in request.messages[0].content if isinstance(p, str))
    kind = kind_of(prompt)
    if kind.startswith("analyzer"):
        return analyzer_answer(kind, prompt)
    if kind in ("dynamic", "static"):
        (video,) = [p for p in request.messages[0].content if isinstance(p, ChatVideo)]
        assert "outlined in white" in prompt, prompt
        colors = {_color_in(f, WHITE) for f in video.frames if (f == WHITE).all(axis=2).any()}
        assert len(colors) == 1, colors  # every marked frame shows the same person
        (color,) = colors
        if kind == "dynamic":
            return json.dumps({"moves_or_acts": True, "description": f"The person in {color} walks."})
        return f"The person wears {color}."
    if kind == "region_caption":
        (image,) = [p for p in request.messages[0].content if not isinstance(p, str)]
        return f"A person in {_color_in(image.pixels, (255, 0, 0))}."
    if kind == "judge":
        region = re.search(r'marked region:\s*"""(.*?)"""', prompt, re.S).group(1)
        same = region.split()[-1].strip(".") in prompt.split("Description B")[1]
        return json.dumps({"reason": "Colors agree." if same else "Colors differ.", "same_object": same})
    assert kind == "merge", kind
    dynamic = re.search(r'What it does: """(.*?)"""', prompt).group(1)
    return dynamic


def test_each_instance_of_a_counted_plural_follows_its_own_person(tmp_path):
    """"Two people walk past each other": two masklets, the red person's and the blue one's (numbered left to
    right where they start), each described from frames that outline it alone, each with its own sample."""
    truth = synthetic.entities_video(tmp_path / "a.mp4")
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": PEOPLE}) + "\n")
    config = load_config("tiny")
    pipeline_settings = {**config.pipeline, "annotator": {"outline_color": WHITE, "outline_color_name": "white"}}
    config = config.model_copy(update={"pipeline": pipeline_settings})
    vlm = FakeChat(fn=fake_answer)
    backends = {
        "llm": FakeChat(fn=fake_answer), "vlm": vlm, "region_captioner": FakeChat(fn=fake_answer),
        "refiner": FakeChat(fn=fake_answer), "box_segmenter": FakeColorBoxSegmenter(),
        "detector": FakeColorDetector({"person": [RED, BLUE]}), "tracker": FakeColorTracker(image_size=160),
    }
    dataset, stats = Dataset(str(tmp_path / "ds")), Stats()
    pipeline = videorefer.build(config, backends, stats=stats, dataset=dataset)
    (outcome,) = Runner(pipeline, dataset, stats=stats).run(read_manifest(str(tmp_path / "m.jsonl")))
    assert outcome.status == "done", outcome.detail

    samples, masklets, rejections = _records(dataset)
    people = sorted(masklets.values(), key=lambda m: m.expression)
    assert [m.expression for m in people] == ["person 1 of 2", "person 2 of 2"]
    for masklet, name in zip(people, ("red person", "blue person")):
        for f in masklet.frames:
            pred, gt = masks.decode(f.rle), truth.mask(name, f.frame_index)
            assert (pred & gt).sum() / (pred | gt).sum() > 0.6, (name, f.frame_index)
    by_masklet = {s.masklet_ids[0]: s for s in samples}
    assert set(by_masklet) == {m.masklet_id for m in people}
    for masklet, color in zip(people, ("red", "blue")):
        sample = by_masklet[masklet.masklet_id]
        assert sample.kept and sample.conversation[1].value == f"The person in {color} walks."
        shown = [int(i) for i in dict(sample.labels)["frames_shown"].split(",")]
        assert shown and set(shown) <= {f.frame_index for f in masklet.frames}
    assert [(r.stage, r.reason) for r in rejections] == [("analyzer", "plural_subject")]  # the short caption
    assert stats.counters["funnel.segmentor.out"] == 2 and stats.counters["funnel.annotator.out"] == 2


def _detailed_run_of_one_red_person(tmp_path, answer, tracker) -> Dataset:
    """The detailed-caption path over tmp_path/m.jsonl, every chat role answered by `answer`, a detector that
    sees one red person; the item must finish (its rejections are the test's)."""
    chat = FakeChat(fn=answer)
    backends = {"llm": chat, "vlm": chat, "region_captioner": chat, "refiner": chat,
                "box_segmenter": FakeColorBoxSegmenter(), "detector": FakeColorDetector({"person": [RED]}),
                "tracker": tracker}
    dataset, stats = Dataset(str(tmp_path / "ds")), Stats()
    pipeline = videorefer.build(load_config("tiny"), backends, stats=stats, dataset=dataset,
                                data_types=["detailed_caption"])
    (outcome,) = Runner(pipeline, dataset, stats=stats).run(read_manifest(str(tmp_path / "m.jsonl")))
    assert outcome.status == "done", outcome.detail
    return dataset


class _LosesEverything(FakeColorTracker):
    """Fake tracker that follows no prompted object on any frame (the color it looks for is nowhere)."""

    def start(self, frames, *, height, width):
        session = super().start(frames, height=height, width=width)
        nowhere = np.array([255.0, 0.0, 255.0])  # magenta: in no frame of the video
        session.add_box = lambda position, obj_id, box: session.colors.__setitem__(obj_id, nowhere)
        session.add_mask = lambda position, obj_id, mask: session.colors.__setitem__(obj_id, nowhere)
        return session


def test_a_track_with_no_mask_on_any_frame_is_rejected_not_a_masklet(tmp_path):
    synthetic.entities_video(tmp_path / "a.mp4")
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": ONE_PERSON}) + "\n")

    def answer(request: ChatRequest) -> str:  # a singular subject is described without an outline
        kind = kind_of(" ".join(p for p in request.messages[0].content if isinstance(p, str)))
        if kind == "dynamic":
            return json.dumps({"moves_or_acts": True, "description": "The person walks."})
        return "The person wears red." if kind == "static" else fake_answer(request)

    dataset = _detailed_run_of_one_red_person(tmp_path, answer, _LosesEverything(image_size=160))
    (rejection,) = dataset.read_records("rejections")
    assert (rejection.stage, rejection.reason, rejection.expression) == ("segmentor", "empty_masklet", "person")
    assert dataset.read_table("masklets").num_rows == 0 and dataset.read_table("samples").num_rows == 0


def test_a_plural_without_the_boxes_it_counts_is_rejected(tmp_path):
    """The caption counts two people; the detector only ever sees one: no instance is made up or lost."""
    synthetic.entities_video(tmp_path / "a.mp4")
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": PEOPLE}) + "\n")
    dataset = _detailed_run_of_one_red_person(tmp_path, fake_answer, FakeColorTracker(image_size=160))
    (rejection,) = dataset.read_records("rejections")
    assert (rejection.stage, rejection.reason, rejection.expression) == ("segmentor", "missing_instances", "person")
    assert "counts 2 'person'" in rejection.detail and "at most 1" in rejection.detail
    assert dataset.read_table("masklets").num_rows == 0 and dataset.read_table("samples").num_rows == 0


# -- the tiny detector and the paper profiles ----------------------------------------------------------------


@pytest.mark.integration
def test_tiny_profile_detector_gives_every_known_noun_of_a_caption_boxes(tmp_path):
    """Random token scores run across the whole prompt; the tiny profile's detector labels each box with the
    phrase of its strongest token, so a caption's second and third nouns get boxes too."""
    import av

    from engine.models import factory

    synthetic.entities_video(tmp_path / "a.mp4")
    with av.open(str(tmp_path / "a.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)][::15]
    config = load_config("tiny")
    detector = factory.build(config, {"detector": "detector"})["detector"]
    settings = config.section("segmentor")
    for nouns in (["man", "ball"], ["dog", "ball", "man"], ["red person", "ball"]):
        found = [{d.label for d in dets} for dets in detector.detect(
            frames, nouns, box_threshold=settings["box_threshold"], text_threshold=settings["text_threshold"])]
        assert all(f == set(nouns) for f in found), (nouns, found)


def test_paper_profiles_give_each_pipeline_its_papers_models():
    from engine.errors import ConfigError
    from engine.config import require_roles
    from engine.models.chat_http import HttpChat
    from flows import strefer

    vr = load_config("paper-videorefer")
    assert set(vr.roles) == set(videorefer.roles(vr))
    models = {role: (spec.backend, spec.model) for role, spec in vr.roles.items()}
    assert models["llm"] == ("vllm", "Qwen/Qwen2-7B-Instruct")  # Analyzer and Reviewer (§3.1.1)
    assert models["vlm"][1] == "OpenGVLab/InternVL2-26B"  # Annotator
    assert models["detector"][1] == "IDEA-Research/grounding-dino-tiny"
    assert models["tracker"] == ("sam2", "facebook/sam2-hiera-large")  # SAM 2
    assert models["refiner"] == ("openai", "gpt-4o")
    assert vr.roles["region_captioner"] == vr.roles["vlm"]  # Osprey's stand-in

    st = load_config("paper-strefer")
    assert set(strefer.roles(st)) <= set(st.roles)  # no entities given: the recognizer and parser run too
    models = {role: (spec.backend, spec.model) for role, spec in st.roles.items()}
    assert models["vlm"][1] == "omni-research/Tarsier-34b"  # Entity Recognizer, Transcriber (§2.2)
    assert models["llm"] == ("vllm", "Qwen/Qwen2.5-32B-Instruct")  # Referring Parser, Instruction Generator
    assert models["tracker"] == ("sam2", "facebook/sam2.1-hiera-large")
    assert models["detector"][1] == "IDEA-Research/grounding-dino-tiny"
    assert models["grounder"][1] == "Qwen/Qwen2.5-VL-7B-Instruct"  # RexSeek-3B's stand-in

    # The served models' clients build from their specs as written (no request is sent).
    for config in (vr, st):
        for role, spec in config.roles.items():
            if spec.backend == "openai":
                client = HttpChat.from_pretrained(spec.model, **spec.options)
                assert client.model_id == spec.model and client.video_as == "frames"
    # A paper profile holds its own pipeline's roles; the other pipeline is told what is missing.
    with pytest.raises(ConfigError, match="grounder.*which pipeline strefer needs"):
        require_roles(vr, list(strefer.roles(vr)), pipeline="strefer")
    with pytest.raises(ConfigError, match="unknown profile 'paper'"):
        load_config("paper")


def test_agents_import_no_model_backend():
    """An agent talks to the interfaces in engine.models.interfaces and engine.chat, never to a backend."""
    code = (
        "import importlib, pkgutil, sys, agents\n"
        "for m in pkgutil.iter_modules(agents.__path__): importlib.import_module('agents.' + m.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('engine.models.') and m != 'engine.models.interfaces'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
