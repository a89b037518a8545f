"""Masklet completeness scenarios: synthetic videos with exact ground truth where the paper's single start
frame loses entities, or where look-alikes cross and a tracker switches identity, run through the real
clip-and-track runner with oracle fakes (they read the scenes' ground truth; they are not models). Shared by
the completeness tests and the masklet benchmark.

The oracle tracker can switch identity as SAM 2 does (`switch_share`: once another object covers that share
of the followed object's box, it follows the other one). The embedder fake gives look-alikes embeddings about
as close as two views of one object, so appearance alone cannot tell them apart.

Coverage of an entity is the share of the frames where it is visible whose masklet mask has IoU >= 0.5 with
the truth (tracking every frame: `track_fps` 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from tests.synthetic import Center, GroundTruth, SceneSpec, ShapeSpec, _linear, make_video

W, H, FPS, N = 160, 120, 10, 60
GREY = (90, 90, 90)
MEMORY = 10  # frames the oracle tracker keeps an absent object before losing it for the pass
SWITCH_SHARE = 1 / 3  # with switches on, the tracker follows whatever covers this share of its object's box
MODES = ("strefer", "strefer-no-identity", "strefer-paper", "grounded-sam2")


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
# look-alikes: one noun, nearly one color, slightly different sizes
BRICK, RUST, CLAY = (200, 50, 40), (215, 65, 50), (190, 60, 55)


def _video(scenes, *shapes, width: int = W, num_frames: int = N):
    return lambda path: make_video(
        path, width=width, height=H, fps=FPS, num_frames=num_frames, scenes=scenes, shapes=shapes
    )


def _passing(i: int) -> Center | None:
    """Across a 160-pixel frame in front of the middle, frames 20-56."""
    return (-12 + 184 * (i - 20) / 36, 64) if 20 <= i <= 56 else None


def _weaving(i: int) -> Center:
    """Right to left at 3.6 px a frame across a 320-pixel frame, drifting from the top lane's edge (frame 25,
    where it meets the first walker) to the bottom lane's (frame 65, the second) in between."""
    u = min(max((i - 31) / 28, 0.0), 1.0)
    return 325 - 3.6 * i, 50 + 24 * (1 - math.cos(math.pi * u)) / 2


def _walker(meets: int, y: float) -> Callable[[int], Center]:
    """Left to right at 1 px a frame, where the weaver is at frame `meets`."""
    return lambda i: (325 - 3.6 * meets + (i - meets), y)


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
    Scenario(
        "lookalikes-crossing",
        "two people of nearly one color walking into each other and on (the one behind is covered at the middle)",
        _video([SceneSpec(0, GREY)],
               ShapeSpec("right", "person", BRICK, "rect", (24, 24), _linear((10, 56), (230, 56), N)),
               ShapeSpec("left", "person", RUST, "rect", (22, 26), _linear((230, 64), (10, 64), N)), width=240),
        (Entity("person walking right", "person", "right"), Entity("person walking left", "person", "left")),
    ),
    Scenario(
        "passes-in-front",
        "a person runs past in front of a look-alike standing in the middle, frames 20-56",
        _video([SceneSpec(0, GREY)],
               ShapeSpec("standing", "person", BRICK, "rect", (24, 24), lambda i: (80, 60)),
               ShapeSpec("running", "person", RUST, "rect", (22, 26), _passing), num_frames=90),
        (Entity("person standing", "person", "standing"), Entity("person running past", "person", "running")),
    ),
    Scenario(
        "three-weaving",
        "three look-alikes: one weaves right to left between two walking left to right, in front of the first "
        "and behind the second",
        _video([SceneSpec(0, GREY)],
               ShapeSpec("top", "person", BRICK, "rect", (24, 24), _walker(25, 42)),
               ShapeSpec("weaver", "person", RUST, "rect", (22, 26), _weaving),
               ShapeSpec("bottom", "person", CLAY, "rect", (26, 22), _walker(65, 82)), width=320, num_frames=90),
        (Entity("person in the top lane", "person", "top"), Entity("person weaving", "person", "weaver"),
         Entity("person in the bottom lane", "person", "bottom")),
    ),
)
SWITCH_SCENES = ("two-of-one-noun", "lookalikes-crossing", "passes-in-front", "three-weaving")


@dataclass
class ScenarioRun:
    truth: GroundTruth
    masklets: dict[str, dict[str, object]]  # mode -> expression -> MaskletRecord
    coverage: dict[str, dict[str, float]]  # mode -> expression -> coverage (0 without a masklet)
    tracker: object  # the oracle tracker, for what it saw
    counters: dict[str, int]
    seconds: dict[str, float]


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


def uncovered_share(truth: GroundTruth, shape: str, share: float) -> float:
    """Share of the shape's visible frames in which no other shape covers `share` of its box: where a tracker
    that switches at `share` can hold it, short of a prompt on that very frame."""
    from tests.fakes import SceneTruth

    scene = SceneTruth(truth)
    visible = [i for i in range(truth.num_frames) if truth.visible(shape, i)]
    covered = [i for i in visible if any(scene.covered_share(shape, o, i) >= share for o in scene.names if o != shape)]
    return 1 - len(covered) / len(visible) if visible else 0.0


def strefer_mode(*, redetect: bool, identity: bool) -> str:
    if not redetect:
        return "strefer-paper"
    return "strefer" if identity else "strefer-no-identity"


def run_scenario(
    scenario: Scenario,
    tmp: Path,
    *,
    redetect: bool,
    baseline: bool = True,
    identity: bool = True,
    switch_share: float | None = None,
    override: Mapping[str, object] | None = None,
) -> ScenarioRun:
    """One scenario through the clip-and-track runner (real decode, real clipper, oracle fakes); with
    `baseline`, the grounded-sam2 baseline runs on the same decode. `identity` turns the identity checks on
    (they run with re-detection only); `switch_share` makes the tracker switch identity at overlaps;
    `override` replaces fakes by role."""
    from agents.masklet_generator import MaskletConfig
    from engine.runner import Runner
    from engine.stats import Stats
    from engine.storage import Dataset
    from flows import clip_and_track, pipelines
    from schemas import EntityRef, WorkItem
    from tests.fakes import FakeRegionEmbedder, FakeSwitchingTracker, FakeTruthDetector, FakeTruthGrounder, SceneTruth

    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{scenario.name}.mp4"
    truth = scenario.build(path)
    config = pipelines.load("tiny")
    # the tiny profile bounds candidates and sessions for its random models; the oracles need the defaults
    defaults = {k: getattr(MaskletConfig(), k) for k in ("max_candidates_per_noun", "max_sessions_per_shot")}
    masklets = {
        **config.section("masklets"), **defaults, "track_fps": 0, "redetect": redetect, "num_sample_frames": 8,
        "identity_checks": identity,
    }
    config = config.model_copy(update={"pipeline": {**config.pipeline, "masklets": masklets}})
    shapes: dict[str, list[str]] = {}
    for shape in truth.shapes:
        shapes.setdefault(shape.category, []).append(shape.name)
    for e in scenario.entities:
        shapes[e.expression] = [e.shape]  # the baseline prompts the detector with the expression
    scene = SceneTruth(truth)
    tracker = FakeSwitchingTracker(scene, image_size=128, memory=MEMORY, switch_share=switch_share)
    backends = {
        "detector": FakeTruthDetector(scene, shapes),
        "tracker": tracker,
        "grounder": FakeTruthGrounder(scene, {e.expression: e.shape for e in scenario.entities}),
        "embedder": FakeRegionEmbedder([s.background for s in truth.scenes]),
        **(override or {}),
    }
    stats = Stats()
    dataset = Dataset(str(tmp / f"{scenario.name}-{redetect}-{identity}-{switch_share}"))
    entities = [EntityRef(expression=e.expression, noun=e.noun) for e in scenario.entities]
    pipeline = clip_and_track.build(config, backends, stats=stats, dataset=dataset, entities=entities, baseline=baseline)
    (outcome,) = Runner(pipeline, dataset, stats=stats, force=True).run([WorkItem(source=str(path))])
    if outcome.status != "done":
        raise RuntimeError(f"scenario {scenario.name}: {outcome.status}: {outcome.detail}")
    modes = {"strefer": strefer_mode(redetect=redetect, identity=identity), "grounded-sam2": "grounded-sam2"}
    by_mode: dict[str, dict[str, object]] = {}
    for m in outcome.outputs.masklets:
        by_mode.setdefault(modes[m.method], {})[m.expression] = m
    ran = [modes["strefer"]] + ([modes["grounded-sam2"]] if baseline else [])
    cover = {
        mode: {e.expression: coverage(truth, e.shape, by_mode.get(mode, {}).get(e.expression)) for e in scenario.entities}
        for mode in ran
    }
    return ScenarioRun(truth, by_mode, cover, tracker, dict(stats.counters), dict(stats.seconds))
