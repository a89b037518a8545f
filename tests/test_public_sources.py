"""Public mask datasets as their releases unpack, in tiny fixtures: masks back pixel-exact, boxes exact, frame
positions, categories and expressions, and every kind of bad annotation as a problem of its item."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from engine import masks
from engine.errors import BadInputError
from engine.sources import (
    open_source,
    read_a2d_sentences,
    read_lvvis,
    read_objects,
    read_revos,
    read_sav,
    read_vidstg,
)
from tests import synthetic
from tests.test_sources import COLORS, H, W, flat, mevis_layout, rect, write_frames


def rle(mask: np.ndarray) -> dict:
    return masks.encode(mask).model_dump()


def reasons(item) -> set[tuple[str, str | None]]:
    return {(p.reason, p.object_id) for p in item.problems}


def exact(obj, truth: dict[int, np.ndarray]) -> bool:
    return sorted(obj.masks) == sorted(truth) and all(
        obj.masks[p].size == list(truth[p].shape) and np.array_equal(masks.decode(obj.masks[p]), truth[p])
        for p in truth
    )


# -- LV-VIS ---------------------------------------------------------------------------------------------------


def lvvis_layout(root: Path, *, inside: bool = False) -> tuple[dict[int, np.ndarray], Path]:
    """A train split; its instances JSON beside train/ or, as OV2Seg keeps LVVIS/val/val_instances.json, in it."""
    write_frames(root / "train" / "JPEGImages" / "00001", [flat(COLORS[i]) for i in range(3)])
    truth = {0: rect(1, 1, 8, 8), 2: rect(3, 2, 10, 9)}
    data = {
        "videos": [{"id": 1, "file_names": [f"00001/{i:05d}.jpg" for i in range(3)], "height": H, "width": W, "length": 3}],
        "annotations": [
            {"id": 7, "video_id": 1, "category_id": 3, "segmentations": [rle(truth[0]), None, rle(truth[2])]},
            {"id": 8, "video_id": 1, "category_id": 4, "segmentations": [{"size": [48, 64], "counts": "0"}, None,
                                                                          rle(rect(0, 0, 4, 4))]},
            {"id": 9, "video_id": 1, "category_id": 3, "segmentations": [None, None]},
        ],
        "categories": [{"id": 3, "name": "zebra"}, {"id": 4, "name": "kite"}],
    }
    path = root / "train" / "train_instances.json" if inside else root / "train_instances.json"
    path.write_text(json.dumps(data))
    return truth, path


@pytest.mark.parametrize("inside", [False, True], ids=["beside-split", "in-split"])
def test_lvvis_objects_carry_masks_and_categories(tmp_path: Path, inside: bool) -> None:
    truth, path = lvvis_layout(tmp_path, inside=inside)
    (item,) = list(open_source(str(tmp_path)))
    assert (item.dataset, item.source, item.frame_rate) == ("lv-vis", str(tmp_path / "train" / "JPEGImages" / "00001"), 5)
    assert [(o.object_id, o.category) for o in item.objects] == [("7", "zebra"), ("8", "kite")]
    assert exact(item.objects[0], truth) and list(item.objects[1].masks) == [2]
    assert item.expressions == []
    assert reasons(item) == {("mask_size_mismatch", "8"), ("frame_count_mismatch", "9")}
    with pytest.raises(BadInputError, match="has no LV-VIS split 'val'"):
        read_lvvis(tmp_path, split="val")
    path.write_text(json.dumps({"videos": []}))
    with pytest.raises(BadInputError, match='must be an object with "videos", "annotations" and "categories"'):
        read_lvvis(tmp_path)
    with pytest.raises(BadInputError, match="is not LV-VIS"):
        read_lvvis(tmp_path / "train")


# -- SA-V -----------------------------------------------------------------------------------------------------


def test_sav_masklets_at_every_4th_frame_with_ref_sav_expressions(tmp_path: Path) -> None:
    folder = tmp_path / "sav_000"
    folder.mkdir()
    a, b = rect(2, 2, 9, 9), rect(10, 5, 20, 15)
    empty = rle(np.zeros((H, W), dtype=bool))
    manual = {
        # whole numbers written as floats, as in SAM 2's sav_dataset/example/sav_000001_manual.json
        "video_id": "sav_000001", "video_frame_count": 8.0, "video_height": float(H), "video_width": float(W),
        "masklet_id": [0, 1],
        "masklet": [[rle(a), empty], [rle(a), rle(b)], [rle(b), {"size": [H, W + 1], "counts": "0"}]],
    }
    (folder / "sav_000001_manual.json").write_text(json.dumps(manual))
    (folder / "sav_000001.mp4").write_bytes(b"")
    refs = {"videos": {"sav_000001": {"expressions": {
        "0": {"exp": "the left  square", "obj_id": 0}, "1": {"exp": "a ghost", "obj_id": 5}}}}}
    (tmp_path / "meta_expressions.json").write_text(json.dumps(refs))
    (item,) = list(open_source(str(tmp_path)))
    assert (item.dataset, item.source) == ("sa-v", str(folder / "sav_000001.mp4"))
    assert [o.object_id for o in item.objects] == ["0", "1"]
    assert exact(item.objects[0], {0: a, 4: a}) and exact(item.objects[1], {4: b})  # frame 8 is past the end
    assert [(e.expression, e.object_ids) for e in item.expressions] == [("the left square", ["0"])]
    assert reasons(item) == {("frame_out_of_range", "0"), ("mask_size_mismatch", "1"), ("unknown_object", "5")}
    assert next(read_sav(folder)).expressions == []  # no expressions file beside this folder
    (folder / "sav_000001_manual.json").write_text(json.dumps({**manual, "video_height": H + 0.5}))
    with pytest.raises(BadInputError, match="needs whole-number video_frame_count, video_height, video_width"):
        next(read_sav(folder))
    with pytest.raises(BadInputError, match="is not SA-V"):
        read_sav(tmp_path / "nowhere")


# -- VidSTG ---------------------------------------------------------------------------------------------------


def vidor_box(tid: int, x: float) -> dict:
    """A VidOR trajectory box."""
    return {"tid": tid, "bbox": {"xmin": x, "ymin": 2, "xmax": x + 10, "ymax": 12}, "generated": 0, "tracker": "none"}


def vidstg_layout(root: Path) -> dict:
    """A VidSTG train entry (no boxes, as in Guaranteer/VidSTG-Dataset) beside VidOR's video/ and annotation/,
    where its boxes are: annotation/training/<folder>/<vid>.json, `trajectories` a list of boxes per frame."""
    (root / "video" / "0001").mkdir(parents=True)
    (root / "video" / "0001" / "42.mp4").write_bytes(b"")
    trajectories = [[vidor_box(0, f), vidor_box(1, 5)] for f in range(20)]
    trajectories[10] = [vidor_box(0, 10), {"tid": 1, "bbox": {"xmin": 5, "ymin": 8, "xmax": 5, "ymax": 9}}]
    trajectories[14] = [vidor_box(0, -4), vidor_box(1, 90)]  # clipped to the frame; wholly outside
    objects = [{"tid": 0, "category": "dog"}, {"tid": 1, "category": "ball"}]
    vidor = {
        "version": "VERSION 1.0", "video_id": "42", "video_path": "0001/42.mp4", "frame_count": 20, "fps": 10.0,
        "width": W, "height": H, "subject/objects": objects, "trajectories": trajectories, "relation_instances": [],
    }
    (root / "annotation" / "training" / "0001").mkdir(parents=True)
    (root / "annotation" / "training" / "0001" / "42.json").write_text(json.dumps(vidor))
    return {
        "vid": "42", "fps": 10.0, "frame_count": 20, "width": W, "height": H,
        "used_segment": {"begin_fid": 6, "end_fid": 16}, "temporal_gt": {"begin_fid": 6, "end_fid": 16},
        "subject/objects": objects,
        "used_relation": {"subject_tid": 0, "object_tid": 1, "predicate": "chase", "begin_fid": 6, "end_fid": 16},
        "captions": [{"type": "subject", "target_id": 0, "description": "a dog  runs"},
                     {"type": "object", "target_id": 3, "description": "a cat"}],
        "questions": [{"type": "object", "target_id": 1, "description": "what does the dog chase?"}],
    }


def test_vidstg_boxes_on_every_4th_frame_of_the_segment(tmp_path: Path) -> None:
    entry = vidstg_layout(tmp_path)
    (tmp_path / "train_annotations.json").write_text(json.dumps([entry]))
    (item,) = list(open_source(str(tmp_path)))
    assert (item.dataset, item.source) == ("vidstg", str(tmp_path / "video" / "0001" / "42.mp4"))
    assert (item.start_s, item.end_s) == (0.55, 1.55)  # frames 6..15 whatever the rounding
    dog, ball = item.objects
    assert (dog.category, ball.category) == ("dog", "ball") and dog.masks == {}
    assert dog.boxes == {0: [6.0, 2.0, 16.0, 12.0], 4: [10.0, 2.0, 20.0, 12.0], 8: [0.0, 2.0, 6.0, 12.0]}
    assert ball.boxes == {0: [5.0, 2.0, 15.0, 12.0]}
    assert [(e.expression, e.object_ids) for e in item.expressions] == [("a dog runs", ["0"])]
    assert reasons(item) == {("bad_box", "1"), ("unknown_object", "3")}
    # a second sentence about the same segment: one item (one key) with both sentences
    second = {**entry, "captions": [{"type": "object", "target_id": 1, "description": "a red ball"}]}
    (tmp_path / "train_annotations.json").write_text(json.dumps([entry, second]))
    (item,) = list(open_source(str(tmp_path)))
    assert [(e.expression, e.object_ids) for e in item.expressions] == [("a dog runs", ["0"]), ("a red ball", ["1"])]
    entry["used_segment"]["end_fid"] = 30
    (tmp_path / "train_annotations.json").write_text(json.dumps([entry]))
    assert ("frame_out_of_range", None) in reasons(next(read_vidstg(tmp_path)))
    (tmp_path / "train_annotations.json").write_text(json.dumps([{"vid": "42"}]))
    with pytest.raises(BadInputError, match="entry 0 \\(vid 42\\): fps must be a positive number"):
        read_vidstg(tmp_path)
    with pytest.raises(BadInputError, match="is not VidSTG"):
        read_vidstg(tmp_path / "video")


def test_vidstg_missing_or_bad_vidor_annotation_is_a_problem_of_its_item(tmp_path: Path) -> None:
    entry = vidstg_layout(tmp_path)
    missing = {**entry, "vid": "43"}  # no annotation/*/*/43.json
    bad = {**entry, "vid": "44"}
    (tmp_path / "annotation" / "validation" / "0002").mkdir(parents=True)
    (tmp_path / "annotation" / "validation" / "0002" / "44.json").write_text("{not json")
    (tmp_path / "val_annotations.json").write_text(json.dumps([missing, entry, bad]))
    first, good, third = read_vidstg(tmp_path, split="val")
    assert first.objects == [] and first.expressions == []
    assert reasons(first) == {("missing_annotation", None), ("no_annotation", "0"), ("unknown_object", "3")}
    assert "43.json" in next(p.detail for p in first.problems if p.reason == "missing_annotation")
    assert [o.object_id for o in good.objects] == ["0", "1"]  # the other items read on
    assert third.objects == [] and ("bad_annotation", None) in reasons(third)
    # an entry that carries its own trajectories (a preprocessed copy) needs no VidOR file
    inline = {**missing, "trajectories": [[vidor_box(0, 1)] for _ in range(20)]}
    (tmp_path / "val_annotations.json").write_text(json.dumps([inline]))
    (item,) = read_vidstg(tmp_path, split="val")
    assert [(o.object_id, sorted(o.boxes)) for o in item.objects] == [("0", [0, 4, 8])]
    assert item.source == str(tmp_path / "video" / "43.mp4")  # no such video: the runner rejects it


# -- A2D-Sentences --------------------------------------------------------------------------------------------


def test_a2d_sentences_h5_masks_transposed_and_1_based(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    clips = tmp_path / "Release" / "clips320H"
    clips.mkdir(parents=True)
    truth = synthetic.short_video(clips / "vidA.mp4", seconds=1.0)  # 96x64, 10 frames
    vh, vw = truth.height, truth.width
    with open(tmp_path / "Release" / "videoset.csv", "w", newline="") as file:
        csv.writer(file).writerows([["vidA", 11, 0, 1, 240, 320, 10, 2, 0], ["vidB", 11, 0, 1, 240, 320, 10, 1, 1]])
    text = tmp_path / "text_annotations"
    (text / "a2d_annotation_with_instances" / "vidA").mkdir(parents=True)
    with open(text / "a2d_annotation.txt", "w", newline="") as file:
        csv.writer(file).writerows([["video_id", "instance_id", "query"], ["vidA", "1", "man  walking"],
                                    ["vidA", "2", "a dog"], ["vidA", "1 (copy)", "again"], ["vidB", "0", "x"]])
    one = np.zeros((vh, vw), dtype=bool)
    one[5:20, 10:30] = True
    two = np.zeros((vh, vw), dtype=bool)
    two[30:40, 50:90] = True
    with h5py.File(text / "a2d_annotation_with_instances" / "vidA" / "00003.h5", "w") as f:
        f["instance"] = np.array([1, 2])
        f["reMask"] = np.stack([one.T, two.T]).astype(np.uint8)
    with h5py.File(text / "a2d_annotation_with_instances" / "vidA" / "00007.h5", "w") as f:
        f["instance"] = np.array([2])
        f["reMask"] = np.zeros((vw, vh), dtype=np.uint8)  # empty
    with h5py.File(text / "a2d_annotation_with_instances" / "vidA" / "00012.h5", "w") as f:
        f["instance"] = np.array([1])
        f["reMask"] = one.T.astype(np.uint8)  # frame 12 of a 10-frame clip
    (item,) = list(open_source(str(tmp_path), split="train"))
    assert (item.dataset, item.source) == ("a2d-sentences", str(clips / "vidA.mp4"))
    assert exact(item.objects[0], {2: one}) and exact(item.objects[1], {2: two})
    assert [(e.expression, e.object_ids) for e in item.expressions] == [("man walking", ["1"]), ("a dog", ["2"])]
    assert reasons(item) == {("empty_mask", "2"), ("frame_out_of_range", "1"), ("unknown_object", "1 (copy)")}
    with pytest.raises(BadInputError, match="A2D-Sentences release with splits train, test: give the split"):
        read_a2d_sentences(tmp_path)
    with pytest.raises(BadInputError, match="is not A2D-Sentences"):
        read_a2d_sentences(tmp_path / "Release")


# -- ReVOS ----------------------------------------------------------------------------------------------------


def test_revos_reads_mevis_style_masks_from_its_root(tmp_path: Path) -> None:
    truth = mevis_layout(tmp_path)
    (tmp_path / "meta_expressions.json").rename(tmp_path / "meta_expressions_train_.json")
    meta = json.loads((tmp_path / "meta_expressions_train_.json").read_text())
    del meta["videos"]["v2"]
    (tmp_path / "meta_expressions_valid_.json").write_text(json.dumps(meta))
    with pytest.raises(BadInputError, match="ReVOS release with splits train, valid: give the split"):
        open_source(str(tmp_path))
    items = list(open_source(str(tmp_path), split="train"))
    assert [i.dataset for i in items] == ["revos", "revos"]
    v1 = items[0]
    assert all(exact(o, truth[o.object_id]) for o in v1.objects)
    assert reasons(v1) == {("no_annotation", "12")}
    assert len(list(read_revos(tmp_path, split="valid"))) == 1
    with pytest.raises(BadInputError, match="is not ReVOS"):
        read_revos(tmp_path / "JPEGImages")


# -- objects JSONL --------------------------------------------------------------------------------------------


def test_objects_jsonl_masks_boxes_and_problems(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    truth = synthetic.short_video(tmp_path / "clips" / "a.mp4")  # 96x64, 20 frames
    h, w = truth.height, truth.width
    square = truth.mask("square", 3)
    lines = [
        {"video": "clips/a.mp4", "object_id": 1, "expression": "the  square", "category": "box",
         "masks": {"3": rle(square), "50": rle(square), "4": {"size": [h + 2, w], "counts": "0"},
                   "5": rle(np.zeros((h, w), dtype=bool))}},
        {"video": "clips/a.mp4", "object_id": "b", "boxes": {"0": [1, 2, 30, 40], "1": [5, 5, 5, 9], "2": [-9, 0, 9, 9]}},
        {"video": "clips/a.mp4", "object_id": "c", "boxes": {"0": [200, 200, 300, 300]}},
    ]
    (tmp_path / "objects.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (item,) = list(open_source(str(tmp_path)))
    assert list(open_source(str(tmp_path / "objects.jsonl"))) == [item]
    assert (item.dataset, item.source) == ("objects", str(tmp_path / "clips" / "a.mp4"))
    square_obj, boxed = item.objects
    assert exact(square_obj, {3: square}) and square_obj.category == "box"
    assert boxed.boxes == {0: [1.0, 2.0, 30.0, 40.0], 2: [0.0, 0.0, 9.0, 9.0]}
    assert [(e.expression, e.object_ids) for e in item.expressions] == [("the square", ["1"])]
    assert reasons(item) == {("frame_out_of_range", "1"), ("mask_size_mismatch", "1"), ("empty_mask", "1"),
                             ("bad_box", "b"), ("bad_box", "c"), ("no_annotation", "c")}
    (tmp_path / "objects.jsonl").write_text('{"video": "clips/a.mp4", "object_id": 1}\n')
    with pytest.raises(BadInputError, match='line 1 needs exactly one of "masks" or "boxes"'):
        read_objects(tmp_path)
    with pytest.raises(BadInputError, match="objects.jsonl not found"):
        read_objects(tmp_path / "clips")


def test_objects_jsonl_over_a_frame_folder_reads_it_at_the_frame_rate(tmp_path: Path) -> None:
    from tests.object_items import object_item

    item, truth = object_item(tmp_path / "frames" / "v1", objects=1, frames=6)
    line = {"video": "frames/v1", "object_id": "0", "masks": {str(k): v.model_dump() for k, v in item.objects[0].masks.items()}}
    (tmp_path / "objects.jsonl").write_text(json.dumps(line) + "\n")
    (read,) = list(open_source(str(tmp_path / "objects.jsonl"), frame_rate=6.0))
    assert read.frame_rate == 6.0 and read.source == str(tmp_path / "frames" / "v1") and not read.problems
    assert exact(read.objects[0], truth[0].masks)


# -- the engine's own datasets --------------------------------------------------------------------------------


def test_engine_dataset_masklets_of_kept_object_qa_come_back_as_objects() -> None:
    from engine.sources.engine_dataset import _items
    from schemas.records import VideoRecord
    from tests.test_export import FakeDataset, masklet, sample

    video = VideoRecord(video_id="v", source="/data/a.mp4", content_sha256="0" * 64, start_s=1.0, end_s=2.0,
                        duration_s=1.0, fps=10.0, num_frames=10, width=W, height=H, rotation=0, codec="h264",
                        decode_width=W, decode_height=H)
    square, bar = rect(1, 1, 6, 6), rect(10, 3, 30, 6)
    kept = masklet("v", {10: square, 12: square, 25: square}, name="the square")  # 25 lies past the window
    other = masklet("v", {11: bar}, name="the bar")
    qa = sample("qa", video, "What is <region> doing?", "sitting", masklets=[kept]).model_copy(
        update={"pipeline": "videorefer", "data_type": "object_qa"})
    caption = sample("cap", video, "Describe <region>.", "a bar", masklets=[other]).model_copy(
        update={"pipeline": "videorefer", "data_type": "detailed_caption"})
    dataset = FakeDataset([video], [kept, other], [qa, caption])
    (item,) = list(_items(dataset, "videorefer", ("object_qa",), None))
    assert (item.dataset, item.source, item.start_s, item.end_s) == ("engine", "/data/a.mp4", 1.0, 2.0)
    assert [o.object_id for o in item.objects] == [kept.masklet_id]
    assert exact(item.objects[0], {0: square, 2: square})  # frame 10 is the window's first
    assert [(e.expression, e.object_ids) for e in item.expressions] == [("the square", [kept.masklet_id])]
    assert reasons(item) == {("frame_out_of_range", kept.masklet_id)}
    (every,) = list(_items(dataset, "videorefer", None, None))
    assert sorted(o.object_id for o in every.objects) == sorted([kept.masklet_id, other.masklet_id])


def test_engine_dataset_refuses_a_folder_that_is_not_one(tmp_path: Path) -> None:
    from engine.sources import read_engine_dataset

    with pytest.raises(BadInputError, match="is not a dataset"):
        read_engine_dataset(tmp_path)
