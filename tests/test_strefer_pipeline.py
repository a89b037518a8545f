"""The Strefer instruction engine end to end through the shared runner, over a synthetic video with a hard cut
(two clips), with a scripted chat model and the color fakes: entities found (or given), masklets, the
transcript per clip, samples of the 11 task types with their groups (in both time forms where a time appears),
counters, a rerun, a window of a file, the instruction LLM failing, and the Strefer JSON export read back field
by field."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from agents.instruction_generator import LETTERS, MASK_PREFIX
from agents.timecodes import find_timestamps, parse_timestamp
from engine.config import load_config
from engine.export import export, held_masks
from engine.models.interfaces import ChatRequest, ChatVideo
from engine.runner import Runner
from engine.stats import Stats
from engine.storage import Dataset
from flows import strefer
from flows.clip_and_track import EntityStage
from schemas import EntityRef, MaskletRecord, SampleRecord, Window, WorkItem, from_table
from tests import synthetic
from tests.fakes import FakeChat, FakeColorDetector, FakeColorGrounder, FakeColorTracker, FakeEmbedder, color_mask
from tests.synthetic import SceneSpec, ShapeSpec

RED, BLUE, YELLOW, GREEN = (230, 30, 30), (30, 60, 230), (240, 220, 30), (40, 200, 60)
BACKGROUNDS = ((60, 60, 60), (200, 200, 200))  # scene 0, scene 1
FPS, N, CUT = 12, 72, 36  # 6 s, a hard cut at 3 s: clips [0, 36) and [36, 72)

# -- the video: two persons (one leaves at the cut), a ball entering late, a dog entering, leaving, returning --

SHAPES = {  # name -> (color, frames where it is visible); drawn in this order, they never overlap
    "red person": (RED, range(0, N)),
    "dog": (GREEN, [*range(30, 44), *range(56, N)]),
    "blue person": (BLUE, range(0, CUT)),
    "ball": (YELLOW, range(18, N)),
}
PATHS = {  # name -> (category, shape, size, center at frame 0, center at the last frame)
    "red person": ("person", "rect", (30, 60), (40, 40), (280, 40)),
    "dog": ("dog", "rect", (50, 30), (260, 110), (60, 110)),
    "blue person": ("person", "rect", (30, 60), (280, 160), (40, 160)),
    "ball": ("ball", "circle", (30, 30), (40, 215), (280, 215)),
}


def scenes_video(path: Path) -> synthetic.GroundTruth:
    def track(name: str):
        line, visible = synthetic._linear(PATHS[name][3], PATHS[name][4], N), set(SHAPES[name][1])
        return lambda i: line(i) if i in visible else None

    return synthetic.make_video(
        path, width=320, height=240, fps=FPS, num_frames=N,
        scenes=[SceneSpec(0, BACKGROUNDS[0]), SceneSpec(CUT, BACKGROUNDS[1])],
        shapes=[ShapeSpec(name, category, SHAPES[name][0], shape, size, track(name))
                for name, (category, shape, size, _, _) in PATHS.items()],
    )


# -- what the models say ---------------------------------------------------------------------------------------

MAN, WOMAN, BALL, PUPPY = "man in a red shirt", "woman in a blue coat", "yellow ball", "green puppy"
EXPRESSIONS = (MAN, WOMAN, BALL, PUPPY)
NOUNS = ("man", "woman", "ball", "puppy")
CATEGORIES = ("person", "person", "ball", "dog")  # what the detector is prompted with
SHAPE_OF = {MAN: "red person", WOMAN: "blue person", BALL: "ball", PUPPY: "dog"}
COLOR_OF = {e: SHAPES[SHAPE_OF[e]][0] for e in EXPRESSIONS}
PARAGRAPH = (
    "A man in a red shirt walks to the right along the top. A woman in a blue coat walks to the left and leaves. "
    "A yellow ball rolls in. A green puppy runs in, runs off and comes back."
)
ACTIONS = {  # expression -> what it does in clip 0, clip 1
    MAN: ("walks to the right along the top", "keeps walking to the right"),
    WOMAN: ("walks to the left along the bottom", "is gone"),
    BALL: ("rolls in from the left", "rolls on to the right"),
    PUPPY: ("runs in from the right", "runs off and comes back"),
}


def description(expression: str, clip: int) -> str:
    return f"The {expression} {ACTIONS[expression][clip]}."


def q(task_type, form, question, answer, *, options=(), coarse=None, relation=None, entities=(), mask=None):
    return {"task_type": task_type, "form": form, "question": question, "answer": answer, "options": list(options),
            "coarse_range": coarse, "relation": relation, "entities": list(entities),
            "mask_entity": mask[0] if mask else None, "mask_question": f"{MASK_PREFIX} {mask[1]}" if mask else None}


# One open and one multiple-choice question of each type 7-11, times inside 4 s (the window test's length too).
LLM_QUESTIONS = [
    q(7, "open", f"What does the {MAN} do between 00:00:01.000 and 00:00:02.500?", "He walks to the right.",
      entities=[MAN], mask=(MAN, "What does he do between 00:00:01.000 and 00:00:02.500?")),
    q(7, "multiple_choice", "What happens between 00:00:02.000 and 00:00:04.000?", f"The {PUPPY} runs in.",
      options=[f"The {PUPPY} runs in.", f"The {BALL} flies away.", "Nothing moves."], entities=[PUPPY]),
    q(8, "open", f"What does the {WOMAN} do in the beginning of the video?", "She walks to the left.",
      coarse="beginning", entities=[WOMAN], mask=(WOMAN, "What does she do in the beginning of the video?")),
    q(8, "multiple_choice", "What happens at the end of the video?", f"The {PUPPY} comes back.",
      options=[f"The {PUPPY} comes back.", f"The {WOMAN} comes back.", "The video fades out."], coarse="end"),
    q(9, "open", f"During which part of the video does the {BALL} roll in?", "The beginning.", coarse="beginning",
      entities=[BALL], mask=(BALL, "During which part of the video does this object roll in?")),
    q(9, "multiple_choice", f"When does the {PUPPY} come back?", "The end.",
      options=["The beginning.", "The middle.", "The end."], coarse="end", entities=[PUPPY]),
    q(10, "open", f"What is the {PUPPY} doing after the {WOMAN} leaves?", "It runs off and comes back.",
      relation="after", entities=[PUPPY, WOMAN], mask=(PUPPY, f"What is this animal doing after the {WOMAN} leaves?")),
    q(10, "multiple_choice", f"What is the {MAN} doing while the {BALL} rolls in?", "Walking to the right.",
      options=["Walking to the right.", "Sitting down.", "Jumping."], relation="during", entities=[MAN, BALL]),
    q(11, "open", f"Who walks along the top while the {BALL} rolls in?", f"The {MAN}.", relation="during",
      entities=[MAN, BALL], mask=(BALL, "Who walks along the top while this object rolls in?")),
    q(11, "multiple_choice", f"Who leaves before the {PUPPY} comes back?", f"The {WOMAN}.",
      options=[f"The {WOMAN}.", f"The {MAN}.", f"The {BALL}."], relation="before", entities=[WOMAN, PUPPY]),
]
MASK_STEMS = {x["mask_question"]: x["mask_entity"] for x in LLM_QUESTIONS if x["mask_entity"]}


def prompt_of(request: ChatRequest) -> str:
    return " ".join(p for p in request.messages[0].content if isinstance(p, str))


def video_of(request: ChatRequest) -> ChatVideo:
    (video,) = [p for p in request.messages[0].content if isinstance(p, ChatVideo)]
    return video


def clip_of(frame: np.ndarray) -> int:
    """The scene a frame belongs to, by its background (the top-left pixel, which no shape covers)."""
    pixel = frame[0, 0].astype(float)
    return int(np.argmin([((pixel - np.array(bg)) ** 2).sum() for bg in BACKGROUNDS]))


def kind_of(request: ChatRequest) -> str:
    prompt = prompt_of(request)
    for start, kind in (
        ('What "active" scene entities', "recognizer"),
        ("Below is a description of the \"active\" entities", "parser"),
        ("Is there a ", "presence" if len(request.messages) == 1 else "behaviour"),
        ("You write question-answer pairs", "instructions"),
    ):
        if prompt.startswith(start):
            return kind
    raise AssertionError(f"a prompt no agent of the pipeline writes: {prompt[:120]!r}")


class Models:
    """Fake backends for every role: the chat roles answer as a well-behaved model would, presence by the
    colors of the frames shown; every presence answer given is recorded per (expression, clip)."""

    def __init__(self, instructions=None) -> None:
        self.vlm, self.llm = FakeChat(fn=self._vlm), FakeChat(fn=self._llm)
        self.detector = FakeColorDetector({"person": [RED, BLUE], "ball": [YELLOW], "dog": [GREEN]})
        self.tracker = FakeColorTracker(image_size=96)
        self.grounder = FakeColorGrounder(COLOR_OF)
        self.embedder = FakeEmbedder(BACKGROUNDS)
        self.instructions = instructions or (lambda request: json.dumps({"questions": LLM_QUESTIONS}))
        self.presence: dict[tuple[str, int], bool] = {}

    def backends(self) -> dict:
        return {role: getattr(self, role) for role in strefer.roles(load_config("tiny"))}

    def _vlm(self, request: ChatRequest) -> str:
        kind = kind_of(request)
        if kind == "recognizer":
            return PARAGRAPH
        expression = re.match(r"Is there a (.+?)\? Answer", prompt_of(request)).group(1)
        video = video_of(request)
        clip = clip_of(video.frames[0])
        if kind == "presence":
            seen = any(color_mask(f, COLOR_OF[expression]).sum() >= 20 for f in video.frames)
            self.presence[(expression, clip)] = seen
            return "Yes." if seen else "No."
        return description(expression, clip)

    def _llm(self, request: ChatRequest) -> str:
        if kind_of(request) == "parser":
            assert PARAGRAPH in prompt_of(request)
            return json.dumps({"expressions": list(EXPRESSIONS), "nouns": list(NOUNS), "categories": list(CATEGORIES)})
        return self.instructions(request)

    def kinds(self, chat: FakeChat) -> list[tuple[str, int]]:
        """(kind, size) of each batch a chat role was sent; a batch is of one kind."""
        out = []
        for batch in chat.batches:
            kinds = {kind_of(r) for r in batch}
            assert len(kinds) == 1, kinds
            out.append((kinds.pop(), len(batch)))
        return out


def _runner(dataset: Dataset, models: Models, entities=(), **options) -> Runner:
    stats = Stats()
    pipeline = strefer.build(load_config("tiny"), models.backends(), stats=stats, dataset=dataset, entities=entities)
    return Runner(pipeline, dataset, stats=stats, **options)


def _capture_transcripts(runner: Runner) -> list:
    """The Video Transcriber's output (kept in the item's working state only), recorded as it is made."""
    (stage,) = [s for s in runner.pipeline.stages if isinstance(s, strefer.TranscriberStage)]
    transcribe, seen = stage.transcriber.transcribe, []

    def recording(jobs):
        out = transcribe(jobs)
        seen.extend(out)
        return out

    stage.transcriber.transcribe = recording
    return seen


def present_in_truth(expression: str, clip: int) -> bool:
    frames = range(0, CUT) if clip == 0 else range(CUT, N)
    return bool(set(frames) & set(SHAPES[SHAPE_OF[expression]][1]))


# -- runs, shared by the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "scenes.mp4"
    return path, scenes_video(path)


@pytest.fixture(scope="module")
def built(video, tmp_path_factory):
    """One run without entities: the Entity Recognizer and Referring Parser find them."""
    dataset = Dataset(str(tmp_path_factory.mktemp("out") / "ds"))
    models = Models()
    runner = _runner(dataset, models)
    transcripts = _capture_transcripts(runner)
    (outcome,) = runner.run([WorkItem(source=str(video[0]))])
    assert outcome.status == "done", outcome.detail
    return dataset, runner, models, outcome, transcripts


def _masklets(dataset: Dataset) -> dict[str, MaskletRecord]:
    return {m.expression: m for m in from_table(MaskletRecord, dataset.read_table("masklets"))}


def _samples(dataset: Dataset) -> list[SampleRecord]:
    return from_table(SampleRecord, dataset.read_table("samples"))


def _human(sample: SampleRecord) -> str:
    human, gpt = sample.conversation
    assert (human.role, gpt.role) == ("human", "gpt") and human.value.startswith("<video>\n")
    return human.value[len("<video>\n"):]


def _clip_index(sample: SampleRecord) -> int:
    start = parse_timestamp(sample.labels["span"].split("-")[0])
    return 0 if start < CUT / FPS - 1e-3 else 1


def _named(text: str) -> str:
    """The one entity whose expression the text names."""
    (name,) = [e for e in EXPRESSIONS if e in text]
    return name


def _entity_of(sample: SampleRecord) -> str:
    """The entity a mask-referring sample points at: the scripted mask question's entity (LLM types), or the one
    its answer names (template types answer with the entity's description)."""
    if sample.labels["generator"] == "llm":
        (entity,) = [e for stem, e in MASK_STEMS.items() if _untimed(_human(sample)).startswith(_untimed(stem))]
        return entity
    return _named(sample.conversation[1].value)


def _untimed(text: str) -> str:
    """The text with every time, timestamp or temporal token, as T: the same in both time forms."""
    return re.sub(r"<\d+>", "T", re.sub(r"\d{2}:\d{2}:\d{2}\.\d{3}", "T", text))


def _form_free(labels: dict) -> dict:
    return {k: v for k, v in labels.items() if k not in ("time_format", "temporal_tokens")}


def _one_form(samples: list[SampleRecord]) -> list[SampleRecord]:
    """One sample per instruction: the timestamp form of a timed one, the single row of a time-free one."""
    return [s for s in samples if s.labels.get("time_format", "timestamp") == "timestamp"]


def _forms(samples: list[SampleRecord]) -> list[tuple[SampleRecord, ...]]:
    """The samples of each instruction, in order: a (timestamp, tokens) pair, or a time-free sample alone."""
    out, pending = [], None
    for s in samples:
        form = s.labels.get("time_format")
        if form == "tokens":
            out.append((pending, s))
            pending = None
        elif form == "timestamp":
            pending = s
        else:
            out.append((s,))
    return out


def _options(question: str) -> list[str]:
    return re.findall(r"^\([A-H]\) (.+)$", question, flags=re.M)


# -- entities ------------------------------------------------------------------------------------------------------


def test_entities_are_recognized_parsed_and_tracked(built, video):
    dataset, runner, models, outcome, _ = built
    _, truth = video
    # The recognizer and the parser run first, one request each, before the transcriber and the instruction LLM.
    assert models.kinds(models.vlm)[0] == ("recognizer", 1)
    assert models.kinds(models.llm) == [("parser", 1), ("instructions", 1)]
    assert sum(kind_of(r) == "recognizer" for r in models.vlm.requests) == 1
    recognized = video_of(models.vlm.requests[0])
    assert len(recognized.frames) == 16 and {clip_of(f) for f in recognized.frames} == {0, 1}  # the whole video
    # EntityRef.noun is the generalized category: it prompts the detector and is the masklet's noun.
    phrases = {p for call in models.detector.phrases for p in call}
    assert models.detector.phrases and phrases == {"person", "ball", "dog"}
    masklets = _masklets(dataset)
    assert {e: m.noun for e, m in masklets.items()} == dict(zip(EXPRESSIONS, CATEGORIES))
    assert all(m.method == "strefer" for m in masklets.values())
    # one tracking session per shot (no track crosses the hard cut), forward and backward; nothing unexplained
    assert models.tracker.session_frames == [CUT * 5 // FPS, (N - CUT) * 5 // FPS]
    assert len(models.tracker.passes) == 4
    for expression, m in masklets.items():
        shape = SHAPE_OF[expression]
        got, visible = {f.frame_index for f in m.frames}, set(SHAPES[shape][1])
        assert got <= visible, expression  # never where it is absent
        assert all(any(abs(v - g) <= 3 for g in got) for v in visible), expression  # tracked at 5 of 12 fps
        f = m.frames[len(m.frames) // 2]
        pred = mask_utils.decode({"size": f.rle.size, "counts": f.rle.counts.encode()}).astype(bool)
        gt = truth.mask(shape, f.frame_index)
        assert (pred & gt).sum() / (pred | gt).sum() > 0.7, expression
    assert {f.frame_index for f in masklets[WOMAN].frames} < set(range(CUT))  # leaves at the cut
    dog = {f.frame_index for f in masklets[PUPPY].frames}
    assert min(dog) >= 30 and not dog & set(range(44, 56)) and max(dog) >= 60  # leaves and comes back
    assert not outcome.outputs.rejections
    hashes = next(iter(masklets.values())).provenance.prompt_hashes
    assert set(hashes) >= {"entity_recognizer", "referring_parser", "transcriber_presence", "transcriber_behavior",
                           "instruction_llm", "grounder"}


def test_given_entities_skip_the_recognizer_and_the_parser(built, video, tmp_path):
    path, _ = video
    dataset = Dataset(str(tmp_path / "ds"))
    models = Models()
    entities = [EntityRef(expression=e, noun=c) for e, c in zip(EXPRESSIONS, CATEGORIES)]
    runner = _runner(dataset, models, entities)
    assert not any(isinstance(s, EntityStage) for s in runner.pipeline.stages)
    (outcome,) = runner.run([WorkItem(source=str(path))])
    assert outcome.status == "done", outcome.detail
    assert [k for k, _ in models.kinds(models.vlm)] == ["presence", "behaviour"]  # no recognizer request
    assert [k for k, _ in models.kinds(models.llm)] == ["instructions"]  # no parser request
    assert not any(k.startswith(("recognizer_", "parser_")) for k in runner.stats.counters)
    assert {e: m.noun for e, m in _masklets(dataset).items()} == dict(zip(EXPRESSIONS, CATEGORIES))
    kinds = Counter((s.task, s.labels["group"], s.labels["referring"]) for s in _samples(dataset))
    assert kinds == Counter((s.task, s.labels["group"], s.labels["referring"]) for s in _samples(built[0]))


# -- the transcript ------------------------------------------------------------------------------------------------


def test_transcript_follows_the_presence_answers_clip_by_clip(built):
    _, runner, models, outcome, transcripts = built
    clips = outcome.outputs.clips
    assert [(c.start_frame, c.end_frame) for c in clips] == [(0, CUT), (CUT, N)] and clips[0].method == "content"
    # The fake answered from the frames it was shown; those agree with the ground truth.
    pairs = {(e, c) for e in EXPRESSIONS for c in (0, 1)}
    assert set(models.presence) == pairs
    assert models.presence == {p: present_in_truth(*p) for p in pairs}
    assert not models.presence[(WOMAN, 1)] and sum(models.presence.values()) == 7
    # Every check of the video in ONE batch, then one batch of behaviour questions for the present ones only.
    assert models.kinds(models.vlm)[1:] == [("presence", 8), ("behaviour", 7)]
    for request in models.vlm.requests:
        if kind_of(request) == "presence":
            video = video_of(request)
            clip = clip_of(video.frames[0])
            assert {clip_of(f) for f in video.frames} == {clip}  # only that clip's frames
            # clip_frames of its own, spread over its 3 s (kept at 8 fps during the decode)
            # 8 frames from the clip's first frame to its last: 35 frame intervals
            assert len(video.frames) == 8 and video.fps == pytest.approx(7 / (35 / FPS))
            assert video.frames[0].shape == (240, 320, 3)
    asked = set()
    for request in models.vlm.requests:
        if kind_of(request) == "behaviour":
            expression = re.match(r"Is there a (.+?)\?", prompt_of(request)).group(1)
            assert request.messages[1].role == "assistant" and request.messages[1].content == ("Yes.",)
            assert f"What clearly happens to the {expression}?" in request.messages[2].content[0]
            asked.add((expression, clip_of(video_of(request).frames[0])))
    assert asked == {p for p, yes in models.presence.items() if yes}
    (transcript,) = transcripts
    assert transcript.video_id == outcome.video_id
    assert [e.expression for e in transcript.entities] == list(EXPRESSIONS)
    for entity in transcript.entities:
        assert [c.clip_index for c in entity.clips] == [0, 1]
        for entry in entity.clips:
            present = models.presence[(entity.expression, entry.clip_index)]
            assert entry.present == present
            assert entry.description == (description(entity.expression, entry.clip_index) if present else None)
            assert (entry.start_time, entry.end_time) == ((0.0, 3.0) if entry.clip_index == 0 else (3.0, 6.0))
    c = runner.stats.counters
    assert (c["transcriber_present"], c["transcriber_absent"], c["transcriber_presence_backend_calls"]) == (7, 1, 1)
    # The instruction LLM is shown that transcript.
    (request,) = [r for r in models.llm.requests if kind_of(r) == "instructions"]
    prompt = prompt_of(request)
    assert f"- {WOMAN}: not visible" in prompt and description(PUPPY, 1) in prompt
    assert "[00:00:03.000 - 00:00:06.000]" in prompt and "The video lasts 00:00:06.000" in prompt


# -- samples -------------------------------------------------------------------------------------------------------

# Table 1's groups, per task type and referring, written out here (not read from the agent).
EXPECTED_KINDS = {
    ("type1", "G1", "language"), ("type1", "G1", "mask"), ("type2", "G1", "language"), ("type3", "G1", "language"),
    ("type4", "G1", "language"), ("type5", "G2", "language"), ("type6", "G5", "language"), ("type6", "G8", "mask"),
    ("type7", "G3", "language"), ("type7", "G6", "mask"),
    *((f"type{t}", "G4", "language") for t in (8, 9, 10, 11)), *((f"type{t}", "G7", "mask") for t in (8, 9, 10, 11)),
}


def test_every_task_type_with_its_group(built):
    dataset, _, models, outcome, _ = built
    samples = _one_form(_samples(dataset))
    assert {(s.task, s.labels["group"], s.labels["referring"]) for s in samples} == EXPECTED_KINDS
    n = Counter((s.task, s.labels["referring"]) for s in samples)
    present = sum(models.presence.values())
    assert n[("type1", "language")] == n[("type1", "mask")] == present == 7
    assert n[("type2", "language")] == 1 and n[("type3", "language")] == n[("type4", "language")] == 8
    assert n[("type5", "language")] == 1 and n[("type6", "language")] == n[("type6", "mask")] == 8  # 2 per entity
    for t in range(7, 12):
        assert n[(f"type{t}", "language")] == 2 and n[(f"type{t}", "mask")] == 1
    video_frames = set(range(N))
    for s in samples:
        t = int(s.task.removeprefix("type"))
        assert (s.pipeline, s.data_type, s.video_id, s.kept) == ("strefer", "strefer", outcome.video_id, True)
        assert s.labels["generator"] == ("template" if t <= 6 else "llm")
        if t <= 4:  # clip frames only, and the clip's window
            clip = _clip_index(s)
            assert s.labels["frames"] == "clip" and set(s.frames) <= set(range(clip * CUT, (clip + 1) * CUT))
            assert s.window == Window(start_frame=clip * CUT, end_frame=(clip + 1) * CUT, start_s=3.0 * clip,
                                      end_s=3.0 * (clip + 1))
        else:
            assert s.labels["frames"] == "video" and s.frames[0] == 0 and s.frames[-1] == N - 1
            assert s.window is None
        assert set(s.frames) <= video_frames and len(s.frames) <= 32
        if s.labels["form"] == "multiple_choice":
            options = _options(_human(s))
            letter = re.fullmatch(r"\(([A-H])\)", s.conversation[1].value).group(1)
            assert len(options) == len(set(options)) >= 3 and LETTERS.index(letter) < len(options)

    # Types 1-4 answer from the transcript, per entity and clip.
    for s in samples:
        if s.task in ("type1", "type2", "type3", "type4") and s.labels["referring"] == "language":
            entity, clip, answer = _named(_human(s)), _clip_index(s), s.conversation[1].value
            present = models.presence[(entity, clip)]
            if s.task == "type1":
                assert present and answer == description(entity, clip)
            elif s.task == "type2":
                assert not present and entity in answer and "gone" not in answer
            elif s.task == "type3":
                assert answer.startswith("Yes") == present and (description(entity, clip) in answer) == present
            else:
                assert answer == ("Yes." if present else "No.")
        if s.task == "type6" and s.labels["referring"] == "language":
            entity = _named(_human(s))
            t0, t1 = find_timestamps(_human(s))
            assert t0 in (0.0, 3.0) and t1 in (3.0, 6.0) and t0 < t1
            described = [description(entity, c) for c in (0, 1) if t0 <= 3.0 * c < t1 and models.presence[(entity, c)]]
            answer = s.conversation[1].value
            if described:
                assert answer == " ".join(described)
            else:  # absent throughout the range: it says so, and describes nothing
                assert entity in answer and re.search(r"\b(not|don't)\b", answer) and ACTIONS[entity][1] not in answer


def test_type5_answer_is_the_first_appearance_order(built):
    dataset, _, _, _, _ = built
    masklets = _masklets(dataset)
    first = {e: min(f.frame_index for f in m.frames) for e, m in masklets.items()}
    type5 = [s for s in _samples(dataset) if s.task == "type5"]
    assert len(type5) == 1 and "time_format" not in type5[0].labels  # one question, with no time in it
    for s in type5:
        options = _options(_human(s))
        letter = re.fullmatch(r"\(([A-H])\)", s.conversation[1].value).group(1)
        correct = options[LETTERS.index(letter)].split(", ")
        assert len(correct) >= 3 and set(correct) <= set(EXPRESSIONS)
        assert {BALL, PUPPY} <= set(correct)  # the two that enter late are always far enough apart
        assert sorted(correct, key=first.get) == correct
        assert all(first[a] / FPS + 0.5 <= first[b] / FPS for a, b in zip(correct, correct[1:]))
        # ... which is also the order of the ground truth.
        truth_first = {e: min(SHAPES[SHAPE_OF[e]][1]) for e in correct}
        assert sorted(correct, key=truth_first.get) == correct
        for option in options:
            assert sorted(option.split(", ")) == sorted(correct)


def test_mask_referring_samples_point_at_their_masklet(built):
    dataset, _, _, _, _ = built
    masklets = _masklets(dataset)
    mask = [s for s in _samples(dataset) if s.labels["referring"] == "mask"]
    assert {s.task for s in mask} == {"type1", "type6", "type7", "type8", "type9", "type10", "type11"}
    for s in mask:
        human = _human(s)
        assert human.startswith(f"{MASK_PREFIX} ") and human.count("<region>") == 1
        entity = _entity_of(s)
        assert s.masklet_ids == [masklets[entity].masklet_id]
        assert entity not in human and entity.split()[-1] not in human.lower()  # words give way to a pronoun
    for s in _samples(dataset):
        if s.labels["referring"] == "language":
            assert not s.masklet_ids and "<region" not in _human(s)
    # The LLM's mask questions come out as it wrote them, one per question with a mask_entity.
    llm_mask = [s for s in _one_form(mask) if s.labels["generator"] == "llm"]
    assert sorted(_entity_of(s) for s in llm_mask) == sorted(MASK_STEMS.values())


def test_both_time_forms_convert_within_one_token(built, video):
    dataset, _, _, outcome, _ = built
    (record,) = dataset.read_table("videos").to_pylist()
    length = record["duration_s"]
    assert length == pytest.approx(N / FPS)
    samples = outcome.outputs.samples
    assert len(samples) == dataset.read_table("samples").num_rows
    timed = 0
    for forms in _forms(samples):
        if len(forms) == 1:  # no time in it: written once, for either format
            (alone,) = forms
            assert not any(find_timestamps(t.value) or re.search(r"<\d+>", t.value) for t in alone.conversation)
            assert "timestamp" not in alone.refers_to
            continue
        stamp, token = forms
        assert token.labels["temporal_tokens"] == "32" and "temporal_tokens" not in stamp.labels
        assert (stamp.task, _form_free(stamp.labels), stamp.masklet_ids, stamp.frames, stamp.refers_to) == (
            token.task, _form_free(token.labels), token.masklet_ids, token.frames, token.refers_to)
        assert stamp.sample_id != token.sample_id and "timestamp" in stamp.refers_to
        for a, b in zip(stamp.conversation, token.conversation):
            times, tokens = find_timestamps(a.value), [int(k) for k in re.findall(r"<(\d+)>", b.value)]
            assert not re.findall(r"<\d+>", a.value) and not find_timestamps(b.value)
            assert len(times) == len(tokens)
            for t, k in zip(times, tokens):
                assert 0 <= k <= 31 and abs(length * k / 31 - t) <= length / 31, (a.value, b.value)
                timed += 1
            assert _untimed(a.value) == _untimed(b.value)  # apart from the times, the texts are the same
    assert timed >= 8 * 2 * 2 + 3 * 2  # type 6 ranges (language and mask) and type 7
    # Only types 6 and 7 name times here: the others are written once.
    assert {s.task for s in samples if "time_format" in s.labels} == {"type6", "type7"}


# -- counters, rerun, export ---------------------------------------------------------------------------------------


def test_sample_counters(built, video):
    dataset, runner, _, outcome, _ = built
    c = runner.stats.counters
    written = Counter(f"samples.strefer.{s.labels['group']}.{s.task}" for s in _one_form(outcome.outputs.samples))
    assert {k: v for k, v in c.items() if k.startswith("samples.strefer.")} == written
    assert c["samples.strefer.G1.type1"] == 14 and c["samples.strefer.G2.type5"] == 1
    assert c["samples.strefer.G7.type8"] == 1 and c["samples.strefer.G4.type8"] == 2
    timed = sum(s.labels.get("time_format") == "tokens" for s in outcome.outputs.samples)
    assert sum(written.values()) + timed == dataset.read_table("samples").num_rows
    assert c["instruction_llm_requests"] == 1 and c["instruction_llm_failed"] == 0
    assert c["instructions_type7"] == 3 and c["instructions_group_G6"] == 1
    assert c["items_done"] == 1 and c["frames_decoded"] == N
    cost = dataset.completion("strefer", WorkItem(source=str(video[0])).key)["counters"]
    assert {k: v for k, v in cost.items() if k.startswith("samples.strefer.")} == written


def test_rerun_is_skipped(built, video, tmp_path):
    dataset, _, _, _, _ = built
    copy = Dataset(str(tmp_path / "ds"))
    shutil.copytree(dataset.root, copy.root)
    rows = {t: copy.read_table(t).num_rows for t in ("samples", "masklets", "clips", "videos", "rejections")}
    models = Models()
    runner = _runner(copy, models)
    (outcome,) = runner.run([WorkItem(source=str(video[0]))])
    assert outcome.status == "skipped"
    assert not models.vlm.batches and not models.llm.batches and not models.detector.calls
    assert models.tracker.sessions == 0
    assert {t: copy.read_table(t).num_rows for t in rows} == rows


def test_export_writes_strefer_json(built, video, tmp_path):
    dataset, _, _, _, _ = built
    _, truth = video
    summary = export(dataset.url, str(tmp_path / "json"))
    samples = _one_form(_samples(dataset))  # the default format: timestamps, and every time-free sample
    assert {Path(p).name: n for p, n in summary.files.items()} == {"strefer.json": len(samples)}
    tokens = sum(s.labels.get("time_format") == "tokens" for s in _samples(dataset))
    assert summary.skipped == {"other_time_format": tokens} and tokens == 19  # types 6 and 7: 8 + 8 + 3
    masklets = {m.masklet_id: m for m in _masklets(dataset).values()}
    (video_row,) = dataset.read_table("videos").to_pylist()
    entries = json.loads((tmp_path / "json" / "strefer.json").read_text())
    assert len(entries) == len(samples)
    unique = {json.dumps({k: v for k, v in e.items() if k != "id"}, sort_keys=True) for e in entries}
    assert len(unique) == len(entries)  # no entry twice, word for word
    for entry, sample in zip(entries, samples):  # every sample, in the table's order
        assert set(entry) - {"start", "end"} == {"id", "video", "conversations", "annotation", "height", "width", "refers_to"}
        if sample.window is not None:  # a clip's sample says which seconds of the video it is about
            assert (entry["start"], entry["end"]) == pytest.approx((sample.window.start_s, sample.window.end_s))
        assert entry["id"] == sample.sample_id
        assert entry["video"] == sample.source == video_row["source"] == str(video[0])
        assert (entry["height"], entry["width"]) == (video_row["decode_height"], video_row["decode_width"])
        assert (entry["height"], entry["width"]) == (240, 320)
        assert entry["conversations"] == [{"from": t.role, "value": t.value} for t in sample.conversation]
        regions = entry["conversations"][0]["value"].count("<region>")
        assert len(entry["annotation"]) == regions == len(sample.masklet_ids)
        assert regions == (1 if sample.labels["referring"] == "mask" else 0)
        for annotation, masklet_id in zip(entry["annotation"], sample.masklet_ids):
            masklet = masklets[masklet_id]
            stored = {f.frame_index: f.rle for f in masklet.frames}
            assert {int(k) for k in annotation} == set(sample.frames) & set(stored) != set()
            for key, value in annotation.items():
                rle = value["segmentation"]
                assert rle["size"] == [240, 320] and rle["counts"] == stored[int(key)].counts
                pred = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
                gt = truth.mask(SHAPE_OF[masklet.expression], int(key))
                assert (pred & gt).sum() / (pred | gt).sum() > 0.6, (masklet.expression, key)


def test_export_can_annotate_every_tracked_or_every_frame(built, tmp_path):
    dataset = built[0]
    masklets = {m.masklet_id: m for m in _masklets(dataset).values()}
    (video_row,) = dataset.read_table("videos").to_pylist()
    entries = {}
    for choice in ("tracked", "all"):
        export(dataset.url, str(tmp_path / choice), frames=choice)
        entries[choice] = json.loads((tmp_path / choice / "strefer.json").read_text())
    held = 0
    for tracked, every, sample in zip(entries["tracked"], entries["all"], _one_form(_samples(dataset))):
        # a region is annotated inside the sample's scope only: its clip, or the whole video
        scope = range(sample.window.start_frame, sample.window.end_frame) if sample.window else range(N)
        for ann_t, ann_a, masklet_id in zip(tracked["annotation"], every["annotation"], sample.masklet_ids):
            masklet = masklets[masklet_id]
            assert 0 < masklet.track_fps < video_row["fps"]  # the tracker skipped frames
            stored = {f.frame_index: f.rle.counts for f in masklet.frames if f.frame_index in scope}
            assert {int(k): v["segmentation"]["counts"] for k, v in ann_t.items()} == stored
            assert set(ann_t) < set(ann_a) and {int(k) for k in ann_a} <= set(scope)
            for key, value in ann_a.items():  # a held frame carries a tracked neighbour's mask
                near = min(stored, key=lambda j: (abs(j - int(key)), j))
                assert value["segmentation"]["counts"] == stored[near]
                held += int(key) not in stored
    assert held


def test_held_masks_fill_only_within_half_a_tracking_interval():
    masked = {0: "a", 4: "b", 20: "c"}  # tracked every 4th frame (10 fps video, 2.5 fps tracking)
    held = held_masks(masked, fps=10, track_fps=2.5)
    assert held == {0: "a", 1: "a", 2: "a", 3: "b", 4: "b", 5: "b", 6: "b", 18: "c", 19: "c", 20: "c", 21: "c", 22: "c"}
    assert held_masks(masked, fps=10, track_fps=0) == masked  # every frame was tracked: nothing to hold
    assert held_masks({}, fps=10, track_fps=2.5) == {}


def test_sample_ids_are_unique(built):
    dataset, _, _, _, _ = built
    ids = Counter(s.sample_id for s in _samples(dataset))
    assert not {i: n for i, n in ids.items() if n > 1}


# -- faults and windows ----------------------------------------------------------------------------------------------


def test_a_failing_instruction_llm_keeps_the_template_types(video, tmp_path):
    path, _ = video
    dataset = Dataset(str(tmp_path / "ds"))
    models = Models(instructions=lambda request: "Sure, here are some questions!")
    entities = [EntityRef(expression=e, noun=c) for e, c in zip(EXPRESSIONS, CATEGORIES)]
    runner = _runner(dataset, models, entities)
    (outcome,) = runner.run([WorkItem(source=str(path))])
    assert outcome.status == "done", outcome.detail
    assert models.kinds(models.llm) == [("instructions", 1)] * 3  # asked, then re-asked twice with the error
    (rejection,) = dataset.read_records("rejections")
    assert (rejection.stage, rejection.reason) == ("instructions", "invalid_answer")
    assert rejection.video_id == outcome.video_id
    assert "Sure, here are some questions!" in rejection.raw_answer
    tasks = {s.task for s in _samples(dataset)}
    assert tasks == {f"type{t}" for t in range(1, 7)}
    assert runner.stats.counters["instruction_llm_failed"] == 1
    assert not any(k.startswith("samples.strefer.") and k.split(".")[-1] in {f"type{t}" for t in range(7, 12)}
                   for k in runner.stats.counters)


@pytest.fixture(scope="module")
def windowed(video, tmp_path_factory):
    """Seconds 1 to 5 of the video (frames 12 to 59) as one item, entities given."""
    dataset = Dataset(str(tmp_path_factory.mktemp("window") / "ds"))
    models = Models()
    entities = [EntityRef(expression=e, noun=c) for e, c in zip(EXPRESSIONS, CATEGORIES)]
    runner = _runner(dataset, models, entities)
    (outcome,) = runner.run([WorkItem(source=str(video[0]), start_s=1.0, end_s=5.0)])
    return dataset, models, outcome


def test_a_window_counts_its_times_from_its_start(windowed):
    dataset, models, outcome = windowed
    assert outcome.status == "done", outcome.detail
    (request,) = [r for r in models.llm.requests if kind_of(r) == "instructions"]
    assert "The video lasts 00:00:04.000" in prompt_of(request)
    samples = outcome.outputs.samples
    assert {s.task for s in samples} == {f"type{t}" for t in range(1, 12)}
    masklets = {m.masklet_id: m for m in outcome.outputs.masklets}
    for forms in _forms(samples):
        stamp, token = forms if len(forms) == 2 else forms * 2
        assert set(stamp.frames) <= set(range(12, 60)) and stamp.frames == token.frames
        if stamp.labels["frames"] == "video":
            assert (stamp.frames[0], stamp.frames[-1]) == (12, 59) and stamp.window is None
        else:  # a clip of the window: its frames and seconds counted in the whole file
            assert (stamp.window.start_frame, stamp.window.end_frame) in ((12, CUT), (CUT, 60))
            assert (stamp.window.start_s, stamp.window.end_s) in ((1.0, 3.0), (3.0, 5.0))
        for a, b in zip(stamp.conversation, token.conversation):
            times, tokens = find_timestamps(a.value), [int(k) for k in re.findall(r"<(\d+)>", b.value)]
            assert all(0 <= t <= 4.0 for t in times)
            assert all(abs(4.0 * k / 31 - t) <= 4.0 / 31 for t, k in zip(times, tokens))
        for masklet_id in stamp.masklet_ids:  # the region's masks are on the frames the sample lists
            assert set(stamp.frames) & {f.frame_index for f in masklets[masklet_id].frames}
    (type5,) = [s for s in samples if s.task == "type5"]
    letter = re.fullmatch(r"\(([A-H])\)", type5.conversation[1].value).group(1)
    correct = _options(_human(type5))[LETTERS.index(letter)].split(", ")
    first = {m.expression: min(f.frame_index for f in m.frames) for m in masklets.values()}
    assert sorted(correct, key=first.get) == correct


def test_a_window_is_clipped_at_its_true_cut(windowed):
    _, _, outcome = windowed
    clips = [(c.start_frame, c.end_frame, c.start_time, c.end_time) for c in outcome.outputs.clips]
    assert clips == [(12, CUT, 1.0, 3.0), (CUT, 60, 3.0, 5.0)]
