"""`engine run sama` and `engine run ufvideo` end to end, as a user runs them: a MeViS release on disk, the VLM
on an OpenAI-compatible loopback server whose answers the test scripts, Prefect's flow, the Delta tables, then
`engine export --format sama|ufvideo|hf` read back with masks compared pixel by pixel to the release's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engine import masks
from flows.cli import app
from schemas import Rle
from tests.scripted_server import ScriptedServer, completion, scripted_config
from tests.test_sources import mevis_layout

runner = CliRunner()


def _prompt(body: dict) -> str:
    content = body["messages"][0]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def _reply(n: int, body: dict):
    prompt = _prompt(body)
    if prompt.startswith("You are shown"):  # SAMA's annotator
        tags = list(dict.fromkeys(re.findall(r"^- \[(obj\d+)\]", prompt, flags=re.M)))
        answer = {
            "descriptions": [{"tag": t, "description": f"A small flat box, {t}, on a plain background."} for t in tags],
            "dialogue": [{"question": f"What does [{tags[0]}] do?", "answer": f"<p>the first box</p> [{tags[0]}] "
                          f"slides right past <p>the second box</p> [{tags[1]}]."}] * 4,
        }
        return 200, completion(json.dumps(answer)), {}, 0.0
    assert prompt.startswith("I upload multiple frames"), prompt[:100]
    names = sorted(set(re.findall(r"(object_\d+): \[", prompt)))
    shorts = " ".join(f"{n}: Small flat box sliding across the frame." for n in names)
    text = f"<Short Description>: {shorts} <Long Description>: The boxes {', '.join(names)} move past each other slowly."
    return 200, completion(text), {}, 0.0


def _decoded(rle: dict) -> np.ndarray:
    return masks.decode(Rle(**rle))


@pytest.mark.integration
def test_sama_and_ufvideo_run_and_export(tmp_path):
    truth = mevis_layout(tmp_path / "mevis")
    with ScriptedServer(_reply) as server:
        config = scripted_config(tmp_path / "scripted.yaml", server.base_url, chat_roles=("vlm",))
        # The installed command in its own process, as a user runs it: a flow run configures Prefect's logging
        # for the whole process, which must not leak into the other tests.
        engine = Path(sys.executable).parent / "engine"
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "COLUMNS": "200"}
        for pipeline in ("sama", "ufvideo"):
            done = subprocess.run(
                [str(engine), "run", pipeline, "--source", str(tmp_path / "mevis"), "--profile", "scripted", "--config",
                 str(config), "--out", str(tmp_path / pipeline)], capture_output=True, text=True, timeout=600, env=env,
            )
            assert done.returncode == 0, done.stdout + done.stderr
    from engine.storage import Dataset

    sama = Dataset(str(tmp_path / "sama"))
    reasons = sorted((r["stage"], r["reason"]) for r in sama.read_table("rejections").to_pylist())
    # v2 has one object; anno id 12 is never annotated (a problem of v1's item, written by the runner)
    assert ("sama_annotator", "single_object") in reasons and ("input", "no_annotation") in reasons, reasons
    source_mask = {"10": truth["10"], "11": truth["11"]}

    # sama: records point into the mask dictionary; every token's masks are the release's, frame by frame
    out = tmp_path / "export"
    assert runner.invoke(app, ["export", str(tmp_path / "sama"), "--format", "sama", "--out", str(out)]).exit_code == 0
    mask_dict = json.loads((out / "sama" / "mask_dict.json").read_text())
    (dialogue,) = json.loads((out / "sama" / "grounded_dialogue.json").read_text())
    descriptions = json.loads((out / "sama" / "object_description.json").read_text())
    assert len(descriptions) == 2 and dialogue["video"].endswith("JPEGImages/v1")
    text = " ".join(t["value"] for t in dialogue["conversations"])
    assert len(re.findall(r"<region>|\[SEG\]", text)) == len(dialogue["masks"]) == 12
    expressions = {m["masklet_id"]: m["noun"] for m in sama.read_table("masklets").to_pylist()}
    samples = {s["sample_id"]: s for s in sama.read_table("samples").to_pylist()}
    for record in [dialogue, *descriptions]:
        ids = samples[record["id"]]["masklet_ids"]
        for key, masklet_id in zip(record["masks"], ids):
            anno = expressions[masklet_id]
            for frame, rle in zip(record["frames"], mask_dict[key]):
                if frame in source_mask[anno]:
                    assert np.array_equal(_decoded(rle), source_mask[anno][frame]), (anno, frame)
                else:
                    assert rle is None or not _decoded(rle).any() or frame - 1 in source_mask[anno]  # held

    # ufvideo: prompt masks on the prompt frame, label masks on the others
    assert runner.invoke(app, ["export", str(tmp_path / "ufvideo"), "--format", "ufvideo", "--out", str(out)]).exit_code == 0
    ufvideo = Dataset(str(tmp_path / "ufvideo"))
    expressions = {m["masklet_id"]: m["noun"] for m in ufvideo.read_table("masklets").to_pylist()}
    samples = {s["sample_id"]: s for s in ufvideo.read_table("samples").to_pylist()}
    rqa = json.loads((out / "ufvideo" / "pixrqa.json").read_text())
    hqa = json.loads((out / "ufvideo" / "pixhqa.json").read_text())
    # v2's one object has a mask on one frame only: no frame is left to segment after the prompt's
    assert [r["video"][-2:] for r in rqa] == ["v1"] and hqa and not (out / "ufvideo" / "pixtrqa.json").exists()
    for record in rqa + hqa:
        ids = samples[record["id"]]["masklet_ids"]
        regions = ids[: len(record["prompt_masks"])]
        labelled = ids[len(record["prompt_masks"]):]
        assert len(labelled) == len(record["label_masks"]) == record["conversations"][1]["value"].count("[SEG]")
        for masklet_id, per_frame in [*zip(regions, record["prompt_masks"]), *zip(labelled, record["label_masks"])]:
            anno = expressions[masklet_id]
            expected = source_mask.get(anno, {0: masks.decode(masks.encode(_corner()))})
            for frame, rle in per_frame.items():
                assert np.array_equal(_decoded(rle), expected[int(frame)]), (anno, frame)

    # hf: the datasets library reads the layout
    assert runner.invoke(app, ["export", str(tmp_path / "ufvideo"), "--format", "hf", "--out", str(out)]).exit_code == 0
    import datasets

    loaded = datasets.load_dataset(str(out / "hf"), "ufvideo", cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(loaded["train"]["data_type"]) == sorted(s["data_type"] for s in samples.values())


def _corner() -> np.ndarray:
    from tests.test_sources import rect

    return rect(0, 0, 4, 4)
