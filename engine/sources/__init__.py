"""Source adapters: what a user points the engine at, turned into WorkItems, lazily (one video at a time).

`open_source(spec)` picks the adapter from what `spec` is; each adapter validates its input with one-line
`BadInputError`s that name the file and the row or video at fault.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

from engine.errors import BadInputError
from engine.probe import list_frame_images, natural_key, one_line
from engine.sources.a2d_sentences import is_a2d_sentences, read_a2d_sentences
from engine.sources.engine_dataset import EngineSamples, is_engine_dataset, read_engine_dataset
from engine.sources.lvvis import LVVIS_FPS, lvvis_splits, read_lvvis
from engine.sources.manifest import MANIFEST_SUFFIXES, read_manifest
from engine.sources.mevis import MEVIS_FPS, mevis_split, read_mevis
from engine.sources.objects import OBJECTS_FILE, is_objects_jsonl, read_objects
from engine.sources.ref_youtube_vos import REF_YOUTUBE_VOS_FPS, read_ref_youtube_vos, ref_youtube_vos_split
from engine.sources.revos import REVOS_FPS, read_revos, revos_splits
from engine.sources.sav import read_sav, sav_annotations
from engine.sources.vidstg import read_vidstg, vidstg_splits
from schemas.records import WorkItem

__all__ = [
    "EngineSamples", "describe_sources", "open_source", "read_a2d_sentences", "read_engine_dataset", "read_lvvis", "read_manifest",
    "read_mevis", "read_objects", "read_ref_youtube_vos", "read_revos", "read_sav", "read_vidstg",
]

VIDEO_SUFFIXES = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".flv", ".wmv",
    ".3gp", ".ogv",
)
_ACCEPTED = (
    "give a video file (.mp4, .mov, .mkv, .webm, ...), a folder of video files, a folder of frames (.jpg/.png, "
    "with a frame rate), "
    "a caption manifest (.jsonl, .csv, .parquet), an objects JSONL (or a folder with objects.jsonl), a MeViS release, "
    "or a Ref-YouTube-VOS, ReVOS, LV-VIS, SA-V, VidSTG or A2D-Sentences release as it unpacks, or a dataset the engine "
    "wrote"
)


def open_source(
    spec: str, *, frame_rate: float | None = None, split: str | None = None, engine_samples: EngineSamples | None = None
) -> Iterator[WorkItem]:
    """WorkItems from `spec`: a manifest file, a MeViS or Ref-YouTube-VOS release (its root and a `split`, or
    one split folder), a video file or URL, or a folder of frames. `frame_rate` is required for a folder of
    frames and overrides the datasets' defaults (MeViS and Ref-YouTube-VOS: 6 fps). `engine_samples`: which kept
    samples of a dataset the engine wrote give its objects (default: every pipeline's).

    What `spec` is, and whether it can be read, is checked now with a one-line BadInputError, so every source
    of a run can be checked before any work starts; a bad row or video inside it raises when it is reached."""
    if frame_rate is not None and not (math.isfinite(frame_rate) and frame_rate > 0):
        raise BadInputError(f"frame rate must be a positive number of frames per second, got {frame_rate}")
    try:
        return _open(spec, frame_rate, split, engine_samples)
    except OSError as exc:  # an unreadable folder or file (permissions, a broken mount)
        raise BadInputError(f"{spec} cannot be read: {one_line(exc)}") from exc


def _open(spec: str, frame_rate: float | None, split: str | None, engine_samples: EngineSamples | None) -> Iterator[WorkItem]:
    lower = spec.lower()
    if lower.endswith(".jsonl") and is_objects_jsonl(Path(spec)):
        _no_splits(spec, split)
        return read_objects(spec, frame_rate=frame_rate)
    if lower.endswith(MANIFEST_SUFFIXES):
        _no_splits(spec, split)
        return read_manifest(spec, frame_rate=frame_rate)
    if "://" in spec or os.path.isfile(spec):
        if lower.endswith(VIDEO_SUFFIXES):
            _no_splits(spec, split)
            return iter([WorkItem(source=spec)])
        raise BadInputError(f"{spec} is not a video file or manifest the engine knows by its name: {_ACCEPTED}")
    if not os.path.isdir(spec):
        raise BadInputError(f"input not found: {spec}")
    path = Path(spec)
    if revos_splits(path):  # before MeViS: ReVOS keeps mask_dict.json at its root too
        return read_revos(path, split=split, frame_rate=frame_rate or REVOS_FPS)
    if mevis_split(path, split) is not None:
        return read_mevis(path, split=split, frame_rate=frame_rate or MEVIS_FPS)
    if ref_youtube_vos_split(path, split) is not None:
        return read_ref_youtube_vos(path, split=split, frame_rate=frame_rate or REF_YOUTUBE_VOS_FPS)
    if (path / "meta_expressions.json").is_file() and (path / "JPEGImages").is_dir():
        raise BadInputError(
            f"{spec} has meta_expressions.json and JPEGImages/ but no masks (mask_dict.json for MeViS, Annotations/ "
            "for Ref-YouTube-VOS): its release withholds them; give a split that has them"
        )
    if lvvis_splits(path):
        return read_lvvis(path, split=split, frame_rate=frame_rate or LVVIS_FPS)
    if vidstg_splits(path):
        return read_vidstg(path, split=split)
    if is_a2d_sentences(path):
        return read_a2d_sentences(path, split=split)
    _no_splits(spec, split)
    if is_engine_dataset(path):
        return read_engine_dataset(path, samples=engine_samples)
    if (path / OBJECTS_FILE).is_file():
        return read_objects(path, frame_rate=frame_rate)
    if sav_annotations(path):
        return read_sav(path)
    if list_frame_images(spec):
        if frame_rate is None:
            raise BadInputError(f"{spec} is a folder of frames: give its frame_rate (frames per second)")
        return iter([WorkItem(source=spec, frame_rate=frame_rate)])
    videos = sorted(
        (os.path.join(spec, n) for n in os.listdir(spec) if n.lower().endswith(VIDEO_SUFFIXES)), key=natural_key
    )
    if videos:  # a folder of video files: each is an item
        return iter([WorkItem(source=v) for v in videos if os.path.isfile(v)])
    raise BadInputError(f"{spec} is a folder the engine cannot read: {_ACCEPTED}")


def _no_splits(spec: str, split: str | None) -> None:
    if split is not None:
        raise BadInputError(
            f"split {split!r} given, but {spec} has no splits (MeViS, Ref-YouTube-VOS, ReVOS, LV-VIS, VidSTG and "
            "A2D-Sentences releases have them)"
        )


def describe_sources() -> str:
    """What `open_source` accepts, as one paragraph for the CLI's help."""
    return (
        "Inputs: a video file or URL (.mp4, .mov, .mkv, .webm, ...); a folder of video files (each an item); a "
        "folder of frames (.jpg, .jpeg, .png, "
        "ordered by name with numbers compared by value, timed by the frame rate given); a caption manifest "
        "in the Panda-70M style (.jsonl, .csv or .parquet with columns video (or video_path, path; relative "
        "to the manifest), caption, and optional start/end in seconds or HH:MM:SS.xxx, or timestamp "
        "[start, end]); "
        "a MeViS release as it unpacks (train/, valid_u/, valid/, each with meta_expressions.json, "
        f"mask_dict.json, JPEGImages/; give the split) or one split folder; {MEVIS_FPS:g} fps unless a frame rate "
        "is given; or a Ref-YouTube-VOS release as it unpacks (meta_expressions/<split>/meta_expressions.json "
        "beside <split>/JPEGImages/ and, for train, <split>/Annotations/ of palette PNGs) or its train/ folder; "
        f"{REF_YOUTUBE_VOS_FPS:g} fps; a ReVOS root (JPEGImages/, mask_dict.json, meta_expressions_<split>_.json; "
        f"{REVOS_FPS:g} fps); an LV-VIS root (<split>/JPEGImages/ beside <split>_instances.json; objects carry "
        f"their category, no expressions; {LVVIS_FPS:g} fps); an SA-V folder of sav_*.mp4 with sav_*_manual.json "
        "(or folders of them; masks on every 4th frame; Ref-SAV expressions from a meta_expressions.json beside); "
        "a VidSTG root (<split>_annotations.json beside VidOR's video/; one item per entry's segment, boxes on "
        "every 4th frame, its captions as expressions); an A2D-Sentences root (Release/clips320H/, "
        "Release/videoset.csv, text_annotations/; split train or test); an objects JSONL (one object per line: "
        "video, object_id, masks or boxes by frame index, optional expression and category), or a folder with "
        f"{OBJECTS_FILE}; or a dataset the engine wrote (the masklets its kept samples name; a pipeline may read only some pipelines' "
        "or data types' samples, as UFVideo reads the object QA). "
        "The datasets bring their objects' masks (or boxes) and referring expressions, annotations that cannot "
        "be used travel with their item as problems; a manifest brings captions and time windows."
    )
