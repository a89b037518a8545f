"""The sama, ufvideo and hf exports read back field by field from a small dataset of SAMA, UFVideo and VideoRefer
samples written as the sample contract says, masks compared pixel by pixel with the synthetic video's truth."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from engine import masks
from engine.decode import DecodeLimits
from engine.errors import BadInputError
from engine.export import FORMATS, export
from engine.ids import stable_id
from engine.probe import probe_video
from engine.storage import Dataset
from engine.writer import TableWriter
from flows import registry
from flows.cli import app
from schemas import (
    Assignment,
    FrameMask,
    ItemRecord,
    MaskletRecord,
    Provenance,
    SampleRecord,
    Turn,
    VersionRecord,
    VideoRecord,
    Window,
)
from tests import synthetic

FPS = 12
SAMA = Provenance(engine_version="0", profile="tiny", models={"vlm": "gemini-2.5-pro"},
                  prompt_hashes={"sama_annotator": "5a5a5a"}, config_hash="c")
UFVIDEO = Provenance(engine_version="0", profile="tiny", models={"llm": "Qwen3-VL-8B"},
                     prompt_hashes={"ufvideo_annotator": "0f0f0f"}, config_hash="c")
VIDEOREFER = Provenance(engine_version="0", profile="tiny", models={"llm": "Qwen2-7B-Instruct"}, config_hash="c")
SIXTEEN = [round(k * 23 / 15) for k in range(16)]  # 16 frames sampled uniformly from 24
DISC_FRAMES = range(0, 20, 2)  # the disc's tracked frames: every other one (track_fps 6), gone after frame 19
CLIP = Window(start_frame=12, end_frame=24, start_s=1.0, end_s=2.0)


class Built:
    """The dataset and its truth: square on every frame; disc tracked on even frames up to 18."""

    def __init__(self, root: Path, truth: synthetic.GroundTruth) -> None:
        self.truth = truth
        info = probe_video(str(truth.path), limits=DecodeLimits())
        self.video = VideoRecord(
            video_id=stable_id(info.path), source=info.path, content_sha256="0" * 64, duration_s=info.duration_s,
            fps=info.fps, num_frames=info.num_frames, width=info.width, height=info.height, rotation=0,
            codec=info.codec, decode_width=info.decode_width, decode_height=info.decode_height,
        )
        self.square = self.masklet("the square", range(24), track_fps=0)
        self.disc = self.masklet("the disc", DISC_FRAMES, track_fps=6)
        self.dataset = Dataset(str(root / "ds"))
        self.samples: dict[str, SampleRecord] = {}  # every sample written, by id
        self.write("videorefer", [self.sample(
            "vr", "videorefer", "detailed_caption", ["<video>\nDescribe <region>.", "A white square."], [self.square],
            [2, 9], VIDEOREFER,
        )], masklets=True)
        self.first = self.publish("r1")
        tags = {"tags": "obj0,obj1", "tag_masklets": f"{self.square.masklet_id},{self.disc.masklet_id}"}
        self.write("sama", [
            self.sample("describe", "sama", "object_description",
                        ["<video>\nDescribe <region> [obj0] in detail.", "A white square glides to the right."],
                        [self.square], SIXTEEN, SAMA, labels=tags),
            self.sample("dialogue", "sama", "grounded_dialogue", [
                "<video>\nWhat is <region> doing?",
                "<p> The square </p> [SEG] glides past <p> the disc </p> [SEG].",
                "And what about <region>?",
                "<p> It </p> [SEG] stays, then leaves.",
            ], [self.square, self.square, self.disc, self.disc, self.disc], SIXTEEN, SAMA, labels=tags),
            self.sample("dropped", "sama", "object_description", ["<video>\nDescribe <region>.", "A disc."],
                        [self.disc], SIXTEEN, SAMA, labels=tags, kept=False),
        ])
        self.write("ufvideo", [
            self.sample("rqa", "ufvideo", "pixrqa", [
                "<video>\nWhat is <region> doing?", "It glides right. The segmentation mask: object1[SEG].",
            ], [self.square, self.square], [4, 5, 8, 12], UFVIDEO, labels={"prompt_frame": "5", "label_frames": "4,8,12"}),
            self.sample("hqa", "ufvideo", "pixhqa", [
                "<video>\nWhat moves right during <Temp-25><Temp-75>?", "The square. The segmentation mask: object1[SEG].",
            ], [self.square], [6, 12, 18], UFVIDEO, refers_to=("mask", "timestamp"),
                labels={"label_frames": "6,12,18", "temporal": "25,75", "time_s": "0.5,1.5"}),
            self.sample("trqa", "ufvideo", "pixtrqa", [
                "<video>\nWhen is <region> beside the square?",
                "The Time is {<Temp-10><Temp-90>}. The segmentation mask: object1[SEG], object2[SEG].",
            ], [self.disc, self.disc, self.square], [13, 14, 16, 20], UFVIDEO, window=CLIP,
                labels={"prompt_frame": "14", "label_frames": "13,16,20", "temporal": "10,90", "time_s": "0.1,0.9"}),
            self.sample("unlabelled", "ufvideo", "pixrqa", [
                "<video>\nWhat is <region> doing?", "Gliding. The segmentation mask: object1[SEG].",
            ], [self.square, self.square], [4], UFVIDEO),
        ])
        self.second = self.publish("r2")

    def masklet(self, name: str, frames: range, *, track_fps: float) -> MaskletRecord:
        return MaskletRecord(
            masklet_id=stable_id(self.video.video_id, name), video_id=self.video.video_id, expression=name,
            noun=name.split()[-1], method="source", start_frame=frames[0], start_time=frames[0] / FPS,
            detector_score=1.0, detector_box=[0, 0, 1, 1],
            assignment=Assignment(method="source", candidate_index=0, num_candidates=1, score=1.0),
            num_frames_tracked=len(frames), track_fps=track_fps,
            frames=[FrameMask(frame_index=i, timestamp=i / FPS, rle=masks.encode(self.truth.mask(name, i)), box=[0, 0, 1, 1])
                    for i in frames],
            provenance=VIDEOREFER,
        )

    def sample(self, name, pipeline, data_type, turns, masklets_, frames, provenance, *, labels=None, window=None,
               kept=True, refers_to=("mask",)) -> SampleRecord:
        return SampleRecord(
            sample_id=stable_id(name), video_id=self.video.video_id, source=self.video.source, pipeline=pipeline,
            data_type=data_type, labels=labels or {},
            conversation=[Turn(role="human" if k % 2 == 0 else "gpt", value=v) for k, v in enumerate(turns)],
            masklet_ids=[m.masklet_id for m in masklets_], frames=frames, window=window, kept=kept, provenance=provenance,
            refers_to=list(refers_to),
        )

    def write(self, pipeline: str, samples: list[SampleRecord], *, masklets: bool = False) -> None:
        item = ItemRecord(item_id=pipeline, pipeline=pipeline, item_key=pipeline, variant="v", source=self.video.source,
                          status="done", video_id=self.video.video_id, run_hash="h", write_id="", run_id="",
                          engine_version="", committed_at="")
        self.samples.update((s.sample_id, s) for s in samples)
        rows = {"videos": [self.video], "samples": samples}
        if masklets:
            rows["masklets"] = [self.square, self.disc]
        with TableWriter(self.dataset, pipeline) as writer:
            writer.add(item, rows)

    def publish(self, run_id: str) -> int:
        return self.dataset.publish(VersionRecord(run_id=run_id, kind="run", published_at="", engine_version="0",
                                                  tables={}, settings=[], counts={}, stats="{}"))

    def check_turns(self, record_id: str, exported: list[dict]) -> None:
        """An exported record's conversation is its sample's, turn by turn and field by field: the ufvideo and
        hf formats change no token, they only rename `role` to `from`."""
        stored = self.samples[record_id].conversation
        assert len(exported) == len(stored), record_id
        for turn, want in zip(exported, stored):
            assert set(turn) == {"from", "value"}, (record_id, turn)
            assert (turn["from"], turn["value"]) == (want.role, want.value), record_id

    def expected(self, masklet_id: str, frame: int) -> np.ndarray | None:
        """The mask an export holds on `frame`: the disc's skipped frames hold the earlier tracked one, within
        half a tracking interval (one frame)."""
        if masklet_id == self.square.masklet_id:
            return self.truth.mask("the square", frame)
        near = next((j for j in (frame, frame - 1, frame + 1) if j in DISC_FRAMES), None)
        return None if near is None else self.truth.mask("the disc", near)

    def check(self, masklet_id: str, frame: int, rle: dict | None) -> None:
        want = self.expected(masklet_id, frame)
        if want is None:
            assert rle is None, (masklet_id, frame)
            return
        assert rle["size"] == [48, 80]
        assert np.array_equal(masks.decode(masks.Rle(size=rle["size"], counts=rle["counts"])), want), (masklet_id, frame)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("formats")
    square = synthetic.ShapeSpec("the square", "square", (250, 250, 250), "rect", (12, 12), lambda i: (10 + 2 * i, 14))
    disc = synthetic.ShapeSpec("the disc", "disc", (240, 200, 30), "circle", (14, 14), lambda i: (60 - i, 34))
    truth = synthetic.make_video(root / "two.mp4", width=80, height=48, fps=FPS, num_frames=24,
                                 scenes=[synthetic.SceneSpec(0, (20, 40, 160))], shapes=[square, disc])
    return Built(root, truth)


def load(out: Path, *args: str, split: str) -> Any:
    """`<out>/hf` as `datasets` reads it, cached beside it: in the user's cache, an earlier run's export to
    another folder named `hf` was served instead."""
    import datasets

    return datasets.load_dataset(str(out / "hf"), *args, split=split, cache_dir=str(out / "hf-cache"))


def turns(sample_turns: list[dict]) -> list[str]:
    return [t["value"] for t in sample_turns]


# -- sama --------------------------------------------------------------------------------------------------------


def test_sama_records_point_into_one_mask_dictionary(built, tmp_path):
    summary = export(built.dataset.url, str(tmp_path), fmt="sama")
    folder = tmp_path / "sama"
    assert summary.skipped == {"dropped_by_reviewer": 1, "other_data_type": 5}
    assert summary.files == {str(folder / "object_description.json"): 1, str(folder / "grounded_dialogue.json"): 1,
                             str(folder / "mask_dict.json"): 2}
    (describe,) = json.loads((folder / "object_description.json").read_text())
    (dialogue,) = json.loads((folder / "grounded_dialogue.json").read_text())
    mask_dict = json.loads((folder / "mask_dict.json").read_text())
    assert describe["id"] == stable_id("describe") and dialogue["id"] == stable_id("dialogue")
    for record in (describe, dialogue):
        assert record["video"] == str(built.truth.path) and (record["height"], record["width"]) == (48, 80)
        assert record["frames"] == SIXTEEN and "start" not in record
        assert [t["from"] for t in record["conversations"]] == ["human", "gpt"] * (len(record["conversations"]) // 2)
    assert turns(dialogue["conversations"])[1] == "<p> The square </p> [SEG] glides past <p> the disc </p> [SEG]."
    # One key per token; the square on the same 16 frames is one entry for both records.
    square_key, disc_key = describe["masks"][0], dialogue["masks"][2]
    assert dialogue["masks"] == [square_key, square_key, disc_key, disc_key, disc_key]
    assert set(mask_dict) == {square_key, disc_key}
    for key, masklet in ((square_key, built.square), (disc_key, built.disc)):
        assert len(mask_dict[key]) == len(SIXTEEN)
        for frame, rle in zip(SIXTEEN, mask_dict[key]):
            built.check(masklet.masklet_id, frame, rle)
    assert mask_dict[disc_key][-1] is None  # frame 23: the disc is gone

    summary = export(built.dataset.url, str(tmp_path / "all"), fmt="sama", include_dropped=True)
    assert "dropped_by_reviewer" not in summary.skipped
    ids = {r["id"] for r in json.loads((tmp_path / "all" / "sama" / "object_description.json").read_text())}
    assert ids == {stable_id("describe"), stable_id("dropped")}


# -- ufvideo -----------------------------------------------------------------------------------------------------


def test_ufvideo_records_carry_prompt_and_label_masks_and_temporal_tokens(built, tmp_path):
    summary = export(built.dataset.url, str(tmp_path), fmt="ufvideo")
    assert summary.skipped == {"labels_missing": 1, "other_data_type": 4}
    got = {t: json.loads((tmp_path / "ufvideo" / f"{t}.json").read_text()) for t in ("pixrqa", "pixhqa", "pixtrqa")}
    (rqa,), (hqa,), (trqa,) = got["pixrqa"], got["pixhqa"], got["pixtrqa"]
    assert (rqa["id"], hqa["id"], trqa["id"]) == (stable_id("rqa"), stable_id("hqa"), stable_id("trqa"))
    for record in (rqa, hqa, trqa):
        assert record["video"] == str(built.truth.path)
        assert (record["height"], record["width"], record["fps"]) == (48, 80, FPS)
        assert turns(record["conversations"])[0].startswith("<video>\n")
        built.check_turns(record["id"], record["conversations"])

    assert [list(m) for m in rqa["prompt_masks"]] == [["5"]] and [list(m) for m in rqa["label_masks"]] == [["4", "8", "12"]]
    assert (rqa["temporal_tokens"], rqa["time_s"]) == ([], []) and "start" not in rqa
    assert hqa["prompt_masks"] == [] and [list(m) for m in hqa["label_masks"]] == [["6", "12", "18"]]
    assert (hqa["temporal_tokens"], hqa["time_s"]) == (["<Temp-25>", "<Temp-75>"], [0.5, 1.5])
    # A window: its seconds; the disc has no mask on label frame 20 (gone after 19), frame 13 holds frame 12's.
    assert (trqa["start"], trqa["end"]) == (1.0, 2.0)
    assert [list(m) for m in trqa["prompt_masks"]] == [["14"]]
    assert [list(m) for m in trqa["label_masks"]] == [["13", "16"], ["13", "16", "20"]]
    assert (trqa["temporal_tokens"], trqa["time_s"]) == (["<Temp-10>", "<Temp-90>"], [0.1, 0.9])
    for record, prompts, labels in (
        (rqa, [built.square], [built.square]), (hqa, [], [built.square]), (trqa, [built.disc], [built.disc, built.square])
    ):
        for group, masklets_ in ((record["prompt_masks"], prompts), (record["label_masks"], labels)):
            for by_frame, masklet in zip(group, masklets_, strict=True):
                for frame, rle in by_frame.items():
                    built.check(masklet.masklet_id, int(frame), rle)


    # --cut-clips: the window's own file, frames counted from its first (12).
    export(built.dataset.url, str(tmp_path / "cut"), fmt="ufvideo", cut_clips=True, video_root=str(tmp_path / "cut"))
    (trqa,) = json.loads((tmp_path / "cut" / "ufvideo" / "pixtrqa.json").read_text())
    assert trqa["video"].startswith("clips/") and (tmp_path / "cut" / trqa["video"]).is_file() and "start" not in trqa
    built.check_turns(trqa["id"], trqa["conversations"])
    assert [list(m) for m in trqa["prompt_masks"]] == [["2"]]
    assert [list(m) for m in trqa["label_masks"]] == [["1", "4"], ["1", "4", "8"]]
    for by_frame, masklet in zip(trqa["label_masks"], (built.disc, built.square)):
        for frame, rle in by_frame.items():
            built.check(masklet.masklet_id, 12 + int(frame), rle)


# -- hf ----------------------------------------------------------------------------------------------------------


def test_hf_export_loads_with_datasets_and_its_card_counts_the_samples(built, tmp_path):
    summary = export(built.dataset.url, str(tmp_path), fmt="hf")
    assert summary.skipped == {"dropped_by_reviewer": 1}
    assert summary.files == {str(tmp_path / "hf" / "data" / p / "train-00000.parquet"): n
                             for p, n in (("videorefer", 1), ("sama", 2), ("ufvideo", 4))}
    rows = load(tmp_path, split="train")
    assert len(rows) == 7
    assert set(rows.column_names) == {
        "id", "pipeline", "data_type", "task", "video_id", "video", "start", "end", "height", "width", "fps", "frames",
        "conversations", "masklet_ids", "masks", "labels", "refers_to", "kept",
    }
    by_id = {r["id"]: r for r in rows}
    dialogue = by_id[stable_id("dialogue")]
    assert (dialogue["pipeline"], dialogue["data_type"], dialogue["video"]) == ("sama", "grounded_dialogue", str(built.truth.path))
    assert [t["from"] for t in dialogue["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert json.loads(dialogue["labels"])["tags"] == "obj0,obj1" and dialogue["frames"] == SIXTEEN
    assert len(dialogue["masks"]) == 5  # one per token
    assert by_id[stable_id("hqa")]["refers_to"] == ["mask", "timestamp"] and dialogue["refers_to"] == ["mask"]
    assert set(by_id) == {i for i, s in built.samples.items() if s.kept}
    for row in rows:
        built.check_turns(row["id"], row["conversations"])
        assert len(row["masks"]) == len(row["masklet_ids"]) and row["kept"]
        for masklet_id, frames in zip(row["masklet_ids"], row["masks"]):
            # frames=sample (the default) does not hold masks: the disc is on its tracked frames only
            tracked = range(24) if masklet_id == built.square.masklet_id else DISC_FRAMES
            assert frames and [f["frame"] for f in frames] == [i for i in row["frames"] if i in tracked]
            for f in frames:
                built.check(masklet_id, f["frame"], f["rle"])
    trqa = by_id[stable_id("trqa")]
    assert (trqa["start"], trqa["end"], trqa["frames"]) == (1.0, 2.0, [13, 14, 16, 20])
    assert (by_id[stable_id("vr")]["start"], by_id[stable_id("vr")]["end"]) == (None, None)
    assert len(load(tmp_path, "ufvideo", split="train")) == 4

    card = (tmp_path / "hf" / "README.md").read_text()
    counted = dict(((p, t), int(n)) for p, t, n in re.findall(r"^\| (\w+) \| (\w+) \| (\d+) \|$", card, re.M))
    assert counted == {("sama", "object_description"): 1, ("sama", "grounded_dialogue"): 1, ("ufvideo", "pixrqa"): 2,
                       ("ufvideo", "pixhqa"): 1, ("ufvideo", "pixtrqa"): 1, ("videorefer", "detailed_caption"): 1}
    assert "| sama | vlm | gemini-2.5-pro |" in card and "| ufvideo | llm | Qwen3-VL-8B |" in card
    assert "| sama | sama_annotator | 5a5a5a |" in card and "| ufvideo | ufvideo_annotator | 0f0f0f |" in card
    assert f"dataset version {built.second}" in card


def test_version_picks_what_is_exported(built, tmp_path):
    """Version 1 holds only the VideoRefer sample: the SAMA export is empty, the hf one has one row."""
    summary = export(built.dataset.url, str(tmp_path), fmt="sama", version=built.first)
    assert summary.files == {} and summary.skipped == {"other_data_type": 1}
    export(built.dataset.url, str(tmp_path), fmt="hf", version=built.first)
    (row,) = load(tmp_path, split="train")
    assert row["id"] == stable_id("vr")
    built.check_turns(row["id"], row["conversations"])
    assert f"dataset version {built.first} " in (tmp_path / "hf" / "README.md").read_text()


# -- the command -------------------------------------------------------------------------------------------------


def test_every_format_a_pipeline_declares_is_exported_by_the_command(built, tmp_path):
    declared = registry.export_formats()
    assert "hf" in declared and set(declared) <= set(FORMATS)
    for fmt in declared:
        result = CliRunner().invoke(app, ["export", built.dataset.url, "--out", str(tmp_path / fmt), "--format", fmt])
        assert result.exit_code == 0, result.output
        assert "samples" in result.output
    assert (tmp_path / "hf" / "hf" / "README.md").is_file() and (tmp_path / "videorefer" / "detailed_caption.json").is_file()


def test_an_unknown_format_is_one_clear_error(built, tmp_path):
    with pytest.raises(BadInputError, match="unknown export format 'coco'; formats: videorefer, sama, ufvideo, hf"):
        export(built.dataset.url, str(tmp_path), fmt="coco")
    result = CliRunner().invoke(app, ["export", built.dataset.url, "--out", str(tmp_path), "--format", "coco"])
    assert result.exit_code == 2 and "coco" in result.output
    assert not list(tmp_path.iterdir())
