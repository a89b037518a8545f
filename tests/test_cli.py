"""The `engine` command end to end, with the real backends built as tiny random models (no network)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.probe import probe_video
from engine.decode import DecodeLimits
from flows import cli
from flows.cli import app
from tests import synthetic

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
runner = CliRunner()
cli.console.width = cli.err.width = 240  # rich tables would wrap cells at the runner's 80 columns


def _run(*args: str):
    result = runner.invoke(app, list(args))
    return result


@pytest.fixture(scope="module")
def entities_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "entities.mp4"
    synthetic.entities_video(path)
    return path


def test_help_imports_no_heavy_library():
    code = (
        "import sys, flows.cli; heavy = [m for m in ('torch', 'transformers', 'sam2', 'av', 'pyarrow', 'scipy', "
        "'prefect', 'cv2') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    result = _run("--help")
    assert result.exit_code == 0 and "clip-and-track" in result.output


def test_info_and_one_line_errors(entities_video, tmp_path):
    result = _run("info", str(entities_video))
    assert result.exit_code == 0 and "320x240" in result.output
    result = _run("info", str(tmp_path / "nope.mp4"))
    assert result.exit_code == 2 and "not found" in result.output and "Traceback" not in result.output
    result = _run("clip-and-track", str(entities_video), "--entity", ":x", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "empty expression" in result.output
    (tmp_path / "file").write_text("")
    result = _run("clip-and-track", str(entities_video), "-e", "x", "--profile", "tiny", "--out", str(tmp_path / "file" / "o"))
    assert result.exit_code == 2 and "cannot write a dataset" in result.output and "Traceback" not in result.output


def test_models_lists_roles_and_missing_weights_fail_fast(entities_video, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    from engine.models import weights

    weights.hub_reachable.cache_clear()
    result = _run("models", "--offline")
    assert result.exit_code == 0
    for role in ("detector", "tracker", "box_segmenter", "embedder", "grounder"):
        assert role in result.output
    assert "missing" in result.output and "built from config" in result.output
    result = _run("clip-and-track", str(entities_video), "-e", "dog", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "missing model weights" in result.output and "IDEA-Research/grounding-dino-tiny" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o" / "masklets").exists()


@pytest.mark.integration
def test_clip_and_track_tiny_on_synthetic(entities_video, tmp_path):
    out = tmp_path / "run"
    args = ["clip-and-track", str(entities_video), "-e", "red person:person", "-e", "ball", "--profile", "tiny",
            "--out", str(out), "--render", "--baseline", "grounded-sam2"]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert "random-weight models" in result.output  # the engine says tiny outputs are meaningless
    import pyarrow.parquet as pq

    masklets = pq.read_table(out / "masklets").to_pylist()
    rejections = pq.read_table(out / "rejections").to_pylist()
    # every entity of every method is accounted for: a masklet or a rejection with its reason
    accounted = {(m["method"], m["expression"]) for m in masklets} | {
        (r["detail"].split("]")[0].strip("["), r["expression"]) for r in rejections if r["expression"]
    }
    assert accounted == {(m, e) for m in ("strefer", "grounded-sam2") for e in ("red person", "ball")}
    for m in masklets:
        assert all(f["rle"]["size"] == [240, 320] for f in m["frames"])
    assert pq.read_table(out / "clips").num_rows >= 1
    (render,) = (out / "renders").glob("*.mp4")
    assert probe_video(str(render), limits=DecodeLimits()).num_frames == 60
    assert "README.md" in {p.name for p in out.iterdir()} and (out / "manifest.json").exists()

    again = _run(*args)  # a rerun skips the complete video
    assert again.exit_code == 0 and "skipped" in again.output
    show = _run("dataset", "show", str(out))
    assert show.exit_code == 0 and "masklets" in show.output


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_VIDEOS.is_dir(), reason=f"real videos not found at {SHARED_VIDEOS}")
def test_clip_and_track_tiny_on_real_video(tmp_path):
    video = SHARED_VIDEOS / "03_blocks.mp4"
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    result = _run("clip-and-track", str(bad), str(video), "-e", "block", "--profile", "tiny", "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    videos = pq.read_table(tmp_path / "r" / "videos").to_pylist()
    assert len(videos) == 1 and videos[0]["source"] == str(video)
    info = probe_video(str(video), limits=DecodeLimits())
    assert videos[0]["num_frames"] == info.num_frames
    reasons = {r["source"]: r["reason"] for r in pq.read_table(tmp_path / "r" / "rejections").to_pylist()}
    assert reasons[str(bad)] == "unreadable_video"


PARAGRAPH = "A person in red walks to the right. A yellow ball rolls in along the ground."
PARSED = {"expressions": ["person in red", "yellow ball"], "nouns": ["person", "ball"], "categories": ["person", "ball"]}


def _entity_reply(n: int, body: dict):
    """The Entity Recognizer, the Referring Parser and the grounder, as a well-behaved model answers them."""
    from tests.scripted_server import completion

    content = body["messages"][0]["content"]
    prompt = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
    if prompt.startswith('What "active" scene entities'):
        text = PARAGRAPH
    elif prompt.startswith('Below is a description of the "active" entities'):
        assert PARAGRAPH in prompt
        text = __import__("json").dumps(PARSED)
    else:
        assert "Please detect" in prompt, prompt[:200]
        text = "0"
    return 200, completion(text), {}, 0.0


@pytest.mark.integration
def test_clip_and_track_without_entities_finds_them(entities_video, tmp_path):
    """No --entity: the Entity Recognizer and Referring Parser (on a scripted model server) find the
    entities, and each one the parser listed is tracked under its generalized category."""
    from engine.storage import Dataset
    from tests.scripted_server import ScriptedServer, scripted_config

    out = tmp_path / "found"
    with ScriptedServer(_entity_reply) as server:
        config = scripted_config(tmp_path / "scripted.yaml", server.base_url, chat_roles=("vlm", "llm", "grounder"),
                                 settings={"masklets": {"track_fps": 2.0}})
        result = _run("clip-and-track", str(entities_video), "--profile", "scripted", "--config", str(config),
                      "--out", str(out))
        prompts = [body["messages"][0]["content"] for _, body in server.requests]
    assert result.exit_code == 0, result.output
    assert "Entity Recognizer and Referring Parser" in result.output
    recognizer = [c for c in prompts if 'What "active" scene entities' in str(c)]
    assert len(recognizer) == 1 and sum(p["type"] == "image_url" for p in recognizer[0]) > 1  # shown the frames
    assert sum('Below is a description of the "active" entities' in str(c) for c in prompts) == 1
    masklets = Dataset(str(out)).read_table("masklets").to_pylist()
    rejections = Dataset(str(out)).read_table("rejections").to_pylist()
    found = {m["expression"]: m["noun"] for m in masklets}
    assert found == {"person in red": "person", "yellow ball": "ball"}, (found, rejections)
    for m in masklets:
        assignment = m["assignment"]
        assert assignment["method"] in ("grounder", "sole-candidate"), assignment
        if assignment["method"] == "grounder":
            assert assignment["grounder_answer"] == "0"


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_VIDEOS.is_dir(), reason=f"real videos not found at {SHARED_VIDEOS}")
def test_run_strefer_through_prefect_and_export(tmp_path):
    import json

    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "blocks.mp4").symlink_to(SHARED_VIDEOS / "03_blocks.mp4")
    out = tmp_path / "st"
    # The installed command in its own process, as a user runs it: a flow run configures Prefect's logging
    # for the whole process, which must not leak into the other tests.
    engine = Path(sys.executable).parent / "engine"
    env = {**__import__("os").environ, "PREFECT_HOME": str(tmp_path / "prefect"), "COLUMNS": "200"}
    done = subprocess.run(
        [str(engine), "run", "strefer", "--source", str(videos), "--out", str(out), "--profile", "tiny", "-e", "hand:hand"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "task type" in done.stdout and "G1" in done.stdout  # the Table 1 style summary: group and task type
    from engine.storage import Dataset

    samples = Dataset(str(out)).read_table("samples").to_pylist()
    forms = {dict(s["labels"]).get("time_format") for s in samples}  # Arrow map: pairs
    assert samples and None in forms and forms <= {None, "timestamp", "tokens"}  # time-free samples: once, unlabelled
    exported = _run("export", str(out), "--out", str(tmp_path / "json"))
    assert exported.exit_code == 0, exported.output
    entries = json.loads((tmp_path / "json" / "strefer.json").read_text())
    kept = [s for s in samples if s["kept"] and dict(s["labels"]).get("time_format", "timestamp") == "timestamp"]
    assert len(entries) == len(kept)  # the default --time-format, and every time-free sample
    for entry in entries:
        human = entry["conversations"][0]["value"]
        assert human.startswith("<video>\n") and len(entry["annotation"]) == human.count("<region>")
        assert entry["video"] == str(videos / "blocks.mp4") and entry["height"] and entry["width"]
