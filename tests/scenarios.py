"""Masklet completeness scenarios: synthetic videos with exact ground truth where the paper's single start
frame loses entities, run through the real clip-and-track runner with oracle fakes (they read the scenes'
flat colors; they are not models). Shared by the completeness tests and the masklet benchmark.

Coverage of an entity is the share of the frames where it is visible whose masklet mask has IoU >= 0.5 with
the truth (tracking every frame: `track_fps` 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tests.synthetic import GroundTruth, SceneSpec, ShapeSpec, _linear, make_video

W, H, FPS, N = 160, 120, 10, 60
GREY = (90, 90, 90)
MEMORY = 10  # frames the oracle tracker keeps an absent object before losing it for the pass
MODES = ("strefer", "strefer-paper", "grounded-sam2")


@dataclass(frozen=True)
class Entity:
    expression: str
    noun: str
    shape: str  # the ground-truth shape it refers to


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    build: Callable[[Path], GroundTruth]
    entities: tuple[Entity, ...]


def _moving(name: str, noun: str, color, start, end, visible: Callable[[int], bool] = lambda i: True) -> ShapeSpec:
    path = _linear(start, end, N)
    return ShapeSpec(name, noun, color, "rect", (24, 24), lambda i: path(i) if visible(i) else None)


RED, BLUE, GREEN, YELLOW, MAGENTA = (230, 30, 30), (30, 60, 230), (40, 200, 60), (240, 220, 30), (230, 30, 200)


def _video(scenes, *shapes):
    return lambda path: make_video(path, width=W, height=H, fps=FPS, num_frames=N, scenes=scenes, shapes=shapes)


SCENARIOS = (
    Scenario(
        "enters-late",
        "a ball enters at frame 40, after the middle frame",
        _video([SceneSpec(0, GREY)], _moving("car", "car", RED, (20, 40), (140, 40)),
               _moving("ball", "ball", YELLOW, (130, 90), (40, 90), lambda i: i >= 40)),
        (Entity("red car", "car", "car"), Entity("yellow ball", "ball", "ball")),
    ),
    Scenario(
        "leaves-returns",
        f"a dog leaves at 15 and returns at 45: 30 frames, beyond the tracker's memory of {MEMORY}",
        _video([SceneSpec(0, GREY)], _moving("car", "car", RED, (20, 40), (140, 40)),
               _moving("dog", "dog", GREEN, (140, 90), (20, 90), lambda i: not 15 <= i < 45)),
        (Entity("red car", "car", "car"), Entity("green dog", "dog", "dog")),
    ),
    Scenario(
        "never-together",
        "a car in frames 0-29, a dog in frames 30-59",
        _video([SceneSpec(0, GREY)], _moving("car", "car", RED, (20, 40), (140, 40), lambda i: i < 30),
               _moving("dog", "dog", GREEN, (140, 90), (20, 90), lambda i: i >= 30)),
        (Entity("red car", "car", "car"), Entity("green dog", "dog", "dog")),
    ),
    Scenario(
        "hard-cut",
        "a square on both sides of a hard cut at frame 30",
        _video([SceneSpec(0, (30, 60, 200)), SceneSpec(30, (230, 200, 40))],
               _moving("square", "box", MAGENTA, (20, 60), (140, 60))),
        (Entity("magenta square", "box", "square"),),
    ),
    Scenario(
        "two-of-one-noun",
        "two people, told apart by color, crossing",
        _video([SceneSpec(0, GREY)], _moving("red person", "person", RED, (20, 40), (140, 70)),
               _moving("blue person", "person", BLUE, (140, 40), (20, 70))),
        (Entity("person in red", "person", "red person"), Entity("person in blue", "person", "blue person")),
    ),
)


@dataclass
class ScenarioRun:
    truth: GroundTruth
    masklets: dict[str, dict[str, object]]  # mode -> expression -> MaskletRecord
    coverage: dict[str, dict[str, float]]  # mode -> expression -> coverage (0 without a masklet)
    tracker: object  # the oracle tracker, for what it saw
    counters: dict[str, int]


def coverage(truth: GroundTruth, shape: str, masklet) -> float:
    """Share of the frames where `shape` is visible that the masklet covers with mask IoU >= 0.5."""
    from engine.masks import decode

    visible = [i for i in range(truth.num_frames) if truth.visible(shape, i)]
    if masklet is None or not visible:
        return 0.0
    by_frame = {f.frame_index: f.rle for f in masklet.frames}
    good = 0
    for i in visible:
        if i in by_frame:
            pred, gt = decode(by_frame[i]), truth.mask(shape, i)
            good += (pred & gt).sum() / max((pred | gt).sum(), 1) >= 0.5
    return good / len(visible)


def run_scenario(scenario: Scenario, tmp: Path, *, redetect: bool, baseline: bool = True) -> ScenarioRun:
    """One scenario through the clip-and-track runner (real decode, real clipper, oracle fakes); with
    `baseline`, the grounded-sam2 baseline runs on the same decode."""
    from engine.runner import Runner
    from engine.stats import Stats
    from engine.storage import Dataset
    from flows import clip_and_track, pipelines
    from schemas import EntityRef, WorkItem
    from tests.fakes import FakeColorDetector, FakeColorGrounder, FakeColorTracker, FakeEmbedder

    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{scenario.name}.mp4"
    truth = scenario.build(path)
    colors = {s.name: s.color for s in truth.shapes}
    config = pipelines.load("tiny")
    masklets = {**config.section("masklets"), "track_fps": 0, "redetect": redetect, "num_sample_frames": 8}
    config = config.model_copy(update={"pipeline": {**config.pipeline, "masklets": masklets}})
    phrases: dict[str, list] = {}
    for e in scenario.entities:
        phrases.setdefault(e.noun, []).append(colors[e.shape])
        phrases[e.expression] = [colors[e.shape]]  # the baseline prompts the detector with the expression
    tracker = FakeColorTracker(image_size=128, memory=MEMORY)
    backends = {
        "detector": FakeColorDetector(phrases),
        "tracker": tracker,
        "grounder": FakeColorGrounder({e.expression: colors[e.shape] for e in scenario.entities}),
        "embedder": FakeEmbedder([scene.background for scene in truth.scenes]),
    }
    stats, dataset = Stats(), Dataset(str(tmp / f"{scenario.name}-{redetect}"))
    entities = [EntityRef(expression=e.expression, noun=e.noun) for e in scenario.entities]
    pipeline = clip_and_track.build(config, backends, stats=stats, dataset=dataset, entities=entities, baseline=baseline)
    (outcome,) = Runner(pipeline, dataset, stats=stats, force=True).run([WorkItem(source=str(path))])
    if outcome.status != "done":
        raise RuntimeError(f"scenario {scenario.name}: {outcome.status}: {outcome.detail}")
    modes = {"strefer": "strefer" if redetect else "strefer-paper", "grounded-sam2": "grounded-sam2"}
    by_mode: dict[str, dict[str, object]] = {}
    for m in outcome.outputs.masklets:
        by_mode.setdefault(modes[m.method], {})[m.expression] = m
    ran = [modes["strefer"]] + ([modes["grounded-sam2"]] if baseline else [])
    cover = {
        mode: {e.expression: coverage(truth, e.shape, by_mode.get(mode, {}).get(e.expression)) for e in scenario.entities}
        for mode in ran
    }
    return ScenarioRun(truth, by_mode, cover, tracker, dict(stats.counters))
