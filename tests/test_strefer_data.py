"""Strefer's samples as a trainer reads them, checked the way a user runs the engine: `engine run strefer` in its
own process, every chat role on a scripted OpenAI-compatible server (`openai` backend), the vision roles the
color fakes (registered as backends of that process), over a synthetic video of three shots, 15 fps, with hard
cuts at frames 31 and 62 (31/15*15 and 62/15*15 both exceed their integer in floating point). Then
`engine export --time-format`.

What must hold: each clip is described on frames of its own; a clip's samples list only its frames and carry
its window; a mask version only where the masklet has a mask in the clip; a time-free sample written once;
`refers_to` says what each sample points at; groups as Table 1 prints them."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from agents.timecodes import find_timestamps, timestamps_to_tokens
from engine.storage import Dataset
from flows.cli import app
from schemas import ClipRecord, MaskletRecord, SampleRecord, Window, from_table
from tests import synthetic
from tests.fakes import FakeColorDetector, FakeColorTracker, FakeEmbedder, color_mask
from tests.scripted_server import ScriptedServer, completion
from tests.synthetic import SceneSpec, ShapeSpec

REPO = Path(__file__).resolve().parents[1]
FPS, N, CUTS = 15, 150, (31, 62)  # 10 s: clips [0, 31), [31, 62), [62, 150)
CLIPS = ((0, 31), (31, 62), (62, N))
BACKGROUNDS = ((60, 60, 60), (200, 200, 200), (30, 60, 200))
RED, YELLOW, GREEN = (230, 30, 30), (240, 220, 30), (40, 200, 60)
PERSON, BALL, DOG = "red person", "yellow ball", "green dog"
COLOR_OF = {PERSON: RED, BALL: YELLOW, DOG: GREEN}
MASK_PREFIX = "Please answer the following question about the <region>."


def scenes_video(path: Path) -> synthetic.GroundTruth:
    """A person walking through all three shots, a ball in the first two, a dog only in the third."""
    person = synthetic._linear((20, 30), (140, 30), N)
    ball = synthetic._linear((30, 90), (130, 90), N)
    dog = synthetic._linear((140, 80), (40, 80), N)
    return synthetic.make_video(
        path, width=160, height=120, fps=FPS, num_frames=N,
        scenes=[SceneSpec(0, BACKGROUNDS[0]), SceneSpec(CUTS[0], BACKGROUNDS[1]), SceneSpec(CUTS[1], BACKGROUNDS[2])],
        shapes=[
            ShapeSpec("person", "person", RED, "rect", (16, 30), person),
            ShapeSpec("ball", "ball", YELLOW, "circle", (18, 18), lambda i: ball(i) if i < CUTS[1] else None),
            ShapeSpec("dog", "dog", GREEN, "rect", (28, 16), lambda i: dog(i) if i >= CUTS[1] else None),
        ],
    )


# -- the vision roles: the color fakes, built the way the engine builds a backend -------------------------------


class ServedColorDetector(FakeColorDetector):
    @classmethod
    def from_pretrained(cls, model: str, **_: object) -> "ServedColorDetector":
        return cls({"person": [RED], "ball": [YELLOW], "dog": [GREEN]})


class ServedColorTracker(FakeColorTracker):
    @classmethod
    def from_pretrained(cls, model: str, **_: object) -> "ServedColorTracker":
        return cls(image_size=96)


class ServedEmbedder(FakeEmbedder):
    @classmethod
    def from_pretrained(cls, model: str, **_: object) -> "ServedEmbedder":
        return cls(BACKGROUNDS)


# `engine` as installed, with the fakes registered as backends of its process (no network, no weights).
LAUNCH = """
import sys
from engine.models import factory
for name, kind, cls in (("fake-color-detector", "detector", "ServedColorDetector"),
                        ("fake-color-tracker", "tracker", "ServedColorTracker"),
                        ("fake-embedder", "embedder", "ServedEmbedder")):
    factory.BACKENDS[name] = factory.Backend(kind, "tests.test_strefer_data", cls, needs_weights=False)
from flows.cli import app
app(sys.argv[1:], prog_name="engine")
"""


# -- the chat roles: a scripted server ----------------------------------------------------------------------------


def q(task_type, form, question, answer, *, options=(), coarse=None, relation=None, entities=(), mask=None):
    return {"task_type": task_type, "form": form, "question": question, "answer": answer, "options": list(options),
            "coarse_range": coarse, "relation": relation, "entities": list(entities),
            "mask_entity": mask[0] if mask else None, "mask_question": f"{MASK_PREFIX} {mask[1]}" if mask else None}


LLM_QUESTIONS = [  # one open and one multiple-choice question of each type 7-11, times inside the 10 s
    q(7, "open", f"What does the {PERSON} do between 00:00:01.000 and 00:00:03.000?", "It walks to the right.",
      entities=[PERSON], mask=(PERSON, "What does this person do between 00:00:01.000 and 00:00:03.000?")),
    q(7, "multiple_choice", "What happens between 00:00:04.000 and 00:00:06.000?", f"The {DOG} runs in.",
      options=[f"The {DOG} runs in.", "Nothing moves.", "The lights go out."], entities=[DOG]),
    q(8, "open", f"What does the {DOG} do at the end of the video?", "It runs to the left.", coarse="end",
      entities=[DOG], mask=(DOG, "What does this animal do at the end of the video?")),
    q(8, "multiple_choice", "What happens in the beginning of the video?", f"The {BALL} rolls.", coarse="beginning",
      options=[f"The {BALL} rolls.", f"The {DOG} sleeps.", "Nothing moves."]),
    q(9, "open", f"During which part of the video does the {DOG} run?", "The end.", coarse="end", entities=[DOG],
      mask=(DOG, "During which part of the video does this animal run?")),
    q(9, "multiple_choice", f"When does the {BALL} roll?", "The beginning.", coarse="beginning", entities=[BALL],
      options=["The beginning.", "The middle.", "The end."]),
    q(10, "open", f"What is the {PERSON} doing while the {DOG} runs?", "Walking to the right.", relation="during",
      entities=[PERSON, DOG], mask=(PERSON, f"What is this person doing while the {DOG} runs?")),
    q(10, "multiple_choice", f"What does the {DOG} do after the {BALL} is gone?", "It runs in.", relation="after",
      options=["It runs in.", "It sleeps.", "It jumps."], entities=[DOG, BALL]),
    q(11, "open", f"Who walks along the top while the {BALL} rolls?", f"The {PERSON}.", relation="during",
      entities=[PERSON, BALL], mask=(BALL, "Who walks along the top while this object rolls?")),
    q(11, "multiple_choice", f"Who runs in after the {BALL} is gone?", f"The {DOG}.", relation="after",
      options=[f"The {DOG}.", f"The {PERSON}.", f"The {BALL}."], entities=[DOG, BALL]),
]


def texts(body: dict) -> list[str]:
    out = []
    for message in body["messages"]:
        content = message["content"]
        parts = [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
        out += parts
    return out


def images(body: dict) -> list[np.ndarray]:
    """The RGB frames of the request's first message."""
    out = []
    for part in body["messages"][0]["content"]:
        if part["type"] == "image_url":
            data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            out.append(cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    return out


def shot_of(frame: np.ndarray) -> int:
    """The shot a frame belongs to, by its background (the top-left pixel, which no shape covers)."""
    pixel = frame[0, 0].astype(float)
    return int(np.argmin([((pixel - np.array(bg)) ** 2).sum() for bg in BACKGROUNDS]))


def reply(n: int, body: dict):
    """A well-behaved model, except that its video LLM also sees the ball where it is not (it left with the
    second shot): the transcript then says present where the ball's masklet has no mask."""
    first = texts(body)[0]
    if "Answer the question with object indexes" in first:
        return 200, completion("0"), {}, 0.0  # each noun has one object: one box
    if first.startswith("You write question-answer pairs"):
        return 200, completion(json.dumps({"questions": LLM_QUESTIONS})), {}, 0.0
    expression = re.match(r"Is there a (.+?)\? Answer", first).group(1)
    if len(body["messages"]) == 1:
        seen = expression == BALL or any(color_mask(f, COLOR_OF[expression]).sum() >= 20 for f in images(body))
        return 200, completion("Yes." if seen else "No."), {}, 0.0
    return 200, completion(f"The {expression} moves in shot {shot_of(images(body)[0])}."), {}, 0.0


# -- one run through the CLI, shared by the tests ---------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strefer-data")
    video = tmp / "shots.mp4"
    scenes_video(video)
    out = tmp / "ds"
    with ScriptedServer(reply) as server:
        chat = f"{{backend: openai, model: scripted, options: {{base_url: '{server.base_url}'}}}}"
        config = tmp / "config.yaml"
        config.write_text(
            "profiles:\n  scripted:\n"
            "    detector: {backend: fake-color-detector, model: fake/color-detector}\n"
            "    tracker: {backend: fake-color-tracker, model: fake/color-tracker}\n"
            "    embedder: {backend: fake-embedder, model: fake/embedder}\n"
            f"    vlm: {chat}\n    llm: vlm\n    grounder: vlm\n"
        )
        args = ["run", "strefer", "--source", str(video), "--out", str(out), "--profile", "scripted",
                "--config", str(config), "-e", f"{PERSON}:person", "-e", f"{BALL}:ball", "-e", f"{DOG}:dog"]
        env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "COLUMNS": "200"}
        done = subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        requests = [body for _, body in server.requests]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    dataset = Dataset(str(out))
    return {
        "out": out,
        "requests": requests,
        "clips": from_table(ClipRecord, dataset.read_table("clips")),
        "masklets": {m.masklet_id: m for m in from_table(MaskletRecord, dataset.read_table("masklets"))},
        "samples": from_table(SampleRecord, dataset.read_table("samples")),
        "counters": json.loads(dataset.versions()[-1].record.stats)["counters"],
    }


def clip_of(sample: SampleRecord) -> int:
    """The clip a clip-scoped sample is about, from its span label (written before windows were)."""
    start = sample.labels["span"].split("-")[0]
    seconds = sum(float(x) * 60**k for k, x in enumerate(reversed(start.split(":"))))
    return max(i for i, (first, _) in enumerate(CLIPS) if first / FPS <= seconds + 1e-3)


def shot_of_frame(index: int) -> int:
    return next(i for i, (first, end) in enumerate(CLIPS) if first <= index < end)


def test_the_run_finds_the_three_shots_and_tracks_each_entity(run):
    assert [(c.start_frame, c.end_frame, c.method) for c in run["clips"]] == [(*c, "content") for c in CLIPS]
    shots = {m.expression: {shot_of_frame(f.frame_index) for f in m.frames} for m in run["masklets"].values()}
    assert shots == {PERSON: {0, 1, 2}, BALL: {0, 1}, DOG: {2}}


def test_each_clip_is_described_on_frames_of_its_own(run):
    presence = [b for b in run["requests"] if len(b["messages"]) == 1 and texts(b)[0].startswith("Is there a ")]
    asked = Counter()
    for body in presence:
        frames = images(body)
        shots = {shot_of(f) for f in frames}
        assert len(shots) == 1, shots  # only that clip's frames
        assert len(frames) >= 8  # clip_frames, even for a 2 s clip of a 10 s video
        asked[shots.pop()] += 1
    assert asked == {0: 3, 1: 3, 2: 3}  # every entity in every clip


def test_clip_samples_list_their_own_frames_and_carry_their_window(run):
    by_index = {c.clip_index: c for c in run["clips"]}
    clip_samples = [s for s in run["samples"] if s.labels["frames"] == "clip"]
    assert {s.task for s in clip_samples} == {"type1", "type2", "type3", "type4"}  # G1: Table 7's clip types
    for s in clip_samples:
        clip = by_index[clip_of(s)]
        # never a frame of the next shot (62/15*15 = 62.00000000000001 once listed frame 62 for clip 1)
        assert set(s.frames) <= set(range(clip.start_frame, clip.end_frame)), (s.task, s.frames)
        assert s.window == Window(start_frame=clip.start_frame, end_frame=clip.end_frame,
                                  start_s=clip.start_time, end_s=clip.end_time)
    # Type 2 says the dog is absent from the first two clips: against those clips, not the whole video.
    absent = sorted((s.window.start_frame, s.window.end_frame) for s in clip_samples if s.task == "type2")
    assert absent == [CLIPS[0], CLIPS[1]]
    assert all(s.window is None for s in run["samples"] if s.labels["frames"] == "video")


def test_a_mask_version_only_where_the_masklet_has_a_mask_in_the_clip(run):
    masklets = run["masklets"]
    type1 = [s for s in run["samples"] if s.task == "type1"]
    for s in type1:
        if s.masklet_ids:
            (masklet_id,) = s.masklet_ids
            masked = {f.frame_index for f in masklets[masklet_id].frames}
            assert masked & set(range(*CLIPS[clip_of(s)])), (s.labels["span"], s.conversation)
    # The ball, said to be present in the third clip where it has no mask: a language sample, no mask version.
    ball_in_third = [s for s in type1 if clip_of(s) == 2 and BALL in s.conversation[1].value]
    assert [s.labels["referring"] for s in ball_in_third] == ["language"]
    assert run["counters"]["instructions_mask_skipped_not_in_clip"] == 1
    # Said present: the person in 3 clips, the ball in 3, the dog in 1; the ball's third has no mask version.
    languages = Counter((clip_of(s), s.conversation[1].value) for s in type1 if not s.masklet_ids)
    masks = Counter((clip_of(s), s.conversation[1].value) for s in type1 if s.masklet_ids)
    assert sum(languages.values()) == len(languages) == 7 and sum(masks.values()) == len(masks) == 6
    assert set(languages) - set(masks) == {(2, f"The {BALL} moves in shot 2.")}


def test_a_time_free_sample_is_written_once(run):
    samples = run["samples"]
    assert len({s.sample_id for s in samples}) == len(samples)
    content = Counter(
        (s.task, s.conversation[0].value, s.conversation[1].value, tuple(s.masklet_ids), s.window) for s in samples
    )
    assert max(content.values()) == 1  # no sample word for word twice
    timed = Counter()
    for s in samples:
        text = " ".join(t.value for t in s.conversation)
        form = s.labels.get("time_format")
        if form is None:  # no time in it: once, whatever format is exported
            assert not find_timestamps(text) and not re.search(r"<\d+>", text) and "temporal_tokens" not in s.labels
        else:
            assert bool(find_timestamps(text)) == (form == "timestamp") and "timestamp" in s.refers_to
            as_tokens = timestamps_to_tokens(text, N / FPS)  # the timestamp form, converted: the tokens form
            timed[(s.task, s.labels["referring"], as_tokens, tuple(s.masklet_ids))] += 1
    assert set(timed.values()) == {2}  # a timed instruction in both forms
    assert {key[0] for key in timed} == {"type6", "type7"}


def test_refers_to_says_what_each_sample_points_at_and_groups_follow_table_1(run):
    groups = {  # Table 1, written out: (task type, referring) -> group
        **{(t, "language"): "G1" for t in (1, 2, 3, 4)}, (1, "mask"): "G1", (5, "language"): "G2",
        (7, "language"): "G3", **{(t, "language"): "G4" for t in (8, 9, 10, 11)}, (6, "language"): "G5",
        (7, "mask"): "G6", **{(t, "mask"): "G7" for t in (8, 9, 10, 11)}, (6, "mask"): "G8",
    }
    seen = set()
    for s in run["samples"]:
        t, human = int(s.task.removeprefix("type")), s.conversation[0].value
        assert s.labels["group"] == groups[(t, s.labels["referring"])]
        expected = ["mask"] * ("<region>" in human)
        expected += ["timestamp"] * bool(find_timestamps(" ".join(x.value for x in s.conversation))
                                         or re.search(r"<\d+>", human))
        expected += ["coarse_time"] * (t in (8, 9)) + ["event"] * (t in (10, 11))
        assert s.refers_to == expected, (s.task, human)
        seen.add((s.labels["group"], tuple(s.refers_to)))
    # G3 holds timestamps without masks and G7 masks without timestamps: the labels tell a user which is which.
    assert ("G3", ("timestamp",)) in seen and ("G6", ("mask", "timestamp")) in seen
    assert ("G7", ("mask", "coarse_time")) in seen and ("G7", ("mask", "event")) in seen


def test_export_picks_one_time_format(run, tmp_path):
    entries = {}
    for form in ("timestamp", "tokens"):
        result = CliRunner().invoke(app, ["export", str(run["out"]), "--out", str(tmp_path / form), "--time-format", form])
        assert result.exit_code == 0, result.output
        entries[form] = {e["id"]: e for e in json.loads((tmp_path / form / "strefer.json").read_text())}
    samples = {s.sample_id: s for s in run["samples"]}
    for form, got in entries.items():
        assert set(got) == {i for i, s in samples.items() if s.labels.get("time_format", form) == form}
    shared = set(entries["timestamp"]) & set(entries["tokens"])
    assert shared == {i for i, s in samples.items() if "time_format" not in s.labels} != set()
    assert all(entries["timestamp"][i] == entries["tokens"][i] for i in shared)
    for i, entry in entries["tokens"].items():
        if i not in shared:
            assert re.search(r"<\d+>", entry["conversations"][0]["value"] + entry["conversations"][1]["value"])
    for got in entries.values():  # a clip's sample points at its clip of the file, and says what it refers to
        for i, entry in got.items():
            window = samples[i].window
            assert (entry.get("start"), entry.get("end")) == ((window.start_s, window.end_s) if window else (None, None))
            assert entry["refers_to"] == samples[i].refers_to
    assert any(samples[i].task == "type2" and "start" in entry for i, entry in entries["tokens"].items())


def test_clip_frames_keep_a_bounded_dense_sample_and_pick_each_clips_own():
    from engine.frame_store import ClipFrames

    pool = ClipFrames(fps=4.0, width=320, height=180, max_side=160, memory_mb=0.004)  # a few frames in memory
    for i in range(40):  # 4 s at 10 fps, each frame a flat gray that names it
        if pool.wants(i, i / 10):
            pool.consume(i, i / 10, np.full((180, 320, 3), 5 * i, np.uint8))
    assert pool.frame_index == [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28, 30, 33, 35, 38]  # 4 per second
    assert pool.store.spilled > 0 and pool.store.nbytes <= 0.004 * 2**20  # the rest waits on disk
    video = pool.chat_video(10, 31, 4)  # a clip of frames 10-30: 4 of its own 9 kept frames, spread over it
    shown = [int(round(f.mean() / 5)) for f in video.frames]
    assert shown == [10, 18, 23, 30] and all(f.shape == (90, 160, 3) for f in video.frames)  # its aspect
    assert video.fps == pytest.approx(3 / 2.0)
    assert pool.positions(10, 31, 40) == list(range(4, 13))  # fewer kept than asked: all of them
    assert pool.chat_video(11, 13, 4) is None  # no kept frame inside: nothing borrowed from a neighbour
    pool.close()
    assert len(pool.store) == 0


def test_the_shortest_scene_the_clipper_cuts_still_gets_clip_frames_of_its_own():
    from engine.frame_store import ClipFrames
    from flows.strefer import StreferConfig, pool_fps

    cfg = StreferConfig()  # 8 frames a clip, kept at 8 fps by default
    assert pool_fps(cfg, 30.0, 15) == pytest.approx(16.0)  # a 15-frame scene at 30 fps lasts 0.5 s
    assert pool_fps(cfg, 4.0, 15) == 8.0  # never below clip_sample_fps
    assert pool_fps(cfg, 30.0, 4) == 30.0  # scenes shorter than clip_frames: every frame, never denser
    assert pool_fps(cfg, 0.0, 15) == 8.0  # a stream without a rate
    pool = ClipFrames(fps=pool_fps(cfg, 30.0, 15), width=64, height=64, max_side=64)
    for i in range(90):  # 3 s at 30 fps
        if pool.wants(i, i / 30):
            pool.consume(i, i / 30, np.full((64, 64, 3), 2 * i, np.uint8))
    for start in (0, 31, 60, 75):  # every 15-frame scene, wherever it starts
        video = pool.chat_video(start, start + 15, cfg.clip_frames)
        assert len(video.frames) == cfg.clip_frames
        assert all(start <= round(f.mean() / 2) < start + 15 for f in video.frames)  # its own frames only
    pool.close()
