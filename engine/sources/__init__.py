"""Source adapters: what a user points the engine at, turned into WorkItems, lazily (one video at a time).

`open_source(spec)` picks the adapter from what `spec` is; each adapter validates its input with one-line
`BadInputError`s that name the file and the row or video at fault.
"""

from __future__ import annotations

import os
from typing import Iterator

from engine.errors import BadInputError
from engine.probe import list_frame_images, natural_key
from engine.sources.manifest import MANIFEST_SUFFIXES, read_manifest
from engine.sources.mevis import MEVIS_FPS, read_mevis
from engine.sources.ref_youtube_vos import REF_YOUTUBE_VOS_FPS, read_ref_youtube_vos
from schemas.records import WorkItem

__all__ = ["describe_sources", "open_source", "read_manifest", "read_mevis", "read_ref_youtube_vos"]

VIDEO_SUFFIXES = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".flv", ".wmv",
    ".3gp", ".ogv",
)
_ACCEPTED = (
    "give a video file (.mp4, .mov, .mkv, .webm, ...), a folder of video files, a folder of frames (.jpg/.png, "
    "with a frame rate), "
    "a caption manifest (.jsonl, .csv, .parquet), a MeViS folder (with mask_dict.json) or a Ref-YouTube-VOS "
    "folder (with Annotations/ and meta_expressions.json)"
)


def open_source(spec: str, *, frame_rate: float | None = None) -> Iterator[WorkItem]:
    """WorkItems from `spec`: a manifest file, a MeViS or Ref-YouTube-VOS root, a video file or URL, or a
    folder of frames. `frame_rate` is required for a folder of frames and overrides the datasets' defaults
    (MeViS and Ref-YouTube-VOS: 6 fps). What `spec` is gets checked now, not when the iterator is first read."""
    lower = spec.lower()
    if lower.endswith(MANIFEST_SUFFIXES):
        return read_manifest(spec, frame_rate=frame_rate)
    if "://" in spec or os.path.isfile(spec):
        if lower.endswith(VIDEO_SUFFIXES):
            return iter([WorkItem(source=spec)])
        raise BadInputError(f"{spec} is not a video file or manifest the engine knows by its name: {_ACCEPTED}")
    if not os.path.isdir(spec):
        raise BadInputError(f"input not found: {spec}")
    if os.path.isfile(os.path.join(spec, "mask_dict.json")):
        return read_mevis(spec, frame_rate=frame_rate or MEVIS_FPS)
    if os.path.isdir(os.path.join(spec, "Annotations")) and os.path.isfile(
        os.path.join(spec, "meta_expressions.json")
    ):
        return read_ref_youtube_vos(spec, frame_rate=frame_rate or REF_YOUTUBE_VOS_FPS)
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


def describe_sources() -> str:
    """What `open_source` accepts, as one paragraph for the CLI's help."""
    return (
        "Inputs: a video file or URL (.mp4, .mov, .mkv, .webm, ...); a folder of video files (each an item); a "
        "folder of frames (.jpg, .jpeg, .png, "
        "ordered by name with numbers compared by value, timed by the frame rate given); a caption manifest "
        "in the Panda-70M style (.jsonl, .csv or .parquet with columns video (or video_path, path; relative "
        "to the manifest), caption, and optional start/end in seconds or HH:MM:SS.xxx, or timestamp "
        "[start, end]); "
        f"a MeViS root (meta_expressions.json, mask_dict.json, JPEGImages/; {MEVIS_FPS:g} fps unless "
        "a frame rate is given); or a Ref-YouTube-VOS root (meta_expressions.json, Annotations/ of "
        f"palette PNGs, JPEGImages/; {REF_YOUTUBE_VOS_FPS:g} fps). The datasets bring their objects' masks and "
        "referring expressions; a manifest brings captions and time windows."
    )
