"""Records exchanged between agents and written to disk, one pydantic model per row type.

Frame indexes are 0-based positions in the decoded video stream; times are seconds from the first frame.
Boxes are xyxy pixels and masks are COCO RLE, both in the decode resolution recorded on the video row
(the source resolution unless the source exceeded the decode bound).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Provenance(Record):
    """What produced a row: enough to reproduce it or to tell two runs apart."""

    engine_version: str
    profile: str
    models: dict[str, str] = Field(description="model id per role that contributed to the row")
    prompt_hashes: dict[str, str] = Field(default_factory=dict, description="template name -> content hash")
    config_hash: str


class VideoRecord(Record):
    video_id: str = Field(description="content hash of the file (sha256, 16 hex digits)")
    source: str = Field(description="path or URL the video was read from")
    content_sha256: str
    start_s: Optional[float] = Field(default=None, description="start of the window of the source this row covers")
    end_s: Optional[float] = Field(default=None, description="end of that window (exclusive)")
    duration_s: float = Field(description="seconds decoded: from the first frame of the window (or video) to the end of the last")
    fps: float
    num_frames: int = Field(description="frames of the item (its window, or the whole video) actually decoded")
    width: int = Field(description="display width of the source, rotation applied")
    height: int
    rotation: int = Field(description="rotation metadata in degrees, already applied to width/height")
    codec: str
    decode_width: int = Field(description="width masks and boxes refer to")
    decode_height: int


class ClipRecord(Record):
    clip_id: str
    video_id: str
    clip_index: int
    start_frame: int
    end_frame: int = Field(description="exclusive")
    start_time: float
    end_time: float
    method: Literal["content", "siglip-hac", "single"] = Field(
        description="content: PySceneDetect cut; siglip-hac: SigLIP embeddings + agglomerative clustering; "
        "single: no boundary found, the clip is the whole video"
    )
    provenance: Provenance


class Rle(Record):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE string")


class FrameMask(Record):
    frame_index: int
    timestamp: float
    rle: Rle
    box: list[float] = Field(description="xyxy pixels, tight box of the mask")


class Assignment(Record):
    """Why this masklet carries this referring expression."""

    method: str = Field(description="sole-candidate | grounder | detector-phrase | detector-noun | source")
    candidate_index: int = Field(description="index of the chosen box among its noun's candidates")
    num_candidates: int
    score: float = Field(description="assignment score used by the one-to-one matching")
    grounder_answer: Optional[str] = Field(default=None, description="raw grounder answer, when asked")
    linked: list[int] = Field(
        default_factory=list,
        description="further candidates of the noun the grounder also named for this expression, joined to the "
        "masklet: the same entity on other tracks (after it left the tracker's memory, or across a hard cut); "
        "they never overlap in time",
    )


class TrackPrompt(Record):
    """One prompt that started a track of a masklet: where, with which box, and why."""

    frame_index: int
    timestamp: float
    box: list[float] = Field(description="xyxy pixels of the detection that prompted the tracker")
    detector_score: float
    reason: Literal["start", "redetect", "identity", "first-frame"] = Field(
        description="start: the frame the method starts from (Strefer's Algorithm 1, in each shot between hard cuts; "
        "the Segmentor's best box); redetect: a detection at another sampled frame that matched no live masklet; "
        "identity: a detection of an object a track had lost at an identity switch (that track's cut is in its own "
        "masklet's `cuts`); first-frame: the Grounded-SAM-2 baseline's prompt"
    )
    track: int = Field(description="index of the track within the masklet; a track never crosses a hard cut")


class TrackCut(Record):
    """Where a track of a masklet was cut, and why: its frames beyond `frame_index`, on the side of its prompt
    frame given by `direction`, were dropped. Every cut is recorded, whether or not the object the track lost was
    prompted again (an `identity` prompt, on the masklet that object went to)."""

    frame_index: int = Field(
        description="the frame the track was cut after: the last it kept on that side (it keeps its frames up to the "
        "last check it passed, or up to the motion break where the switch began, where there is one); its prompt "
        "frame where it kept none"
    )
    timestamp: float
    found_frame_index: int = Field(description="the re-detection frame whose check failed")
    direction: Literal["forward", "backward"] = Field(description="which side of the track's prompt frame was cut")
    reason: Literal["identity"] = Field(description="identity: the track had switched to another object")
    signals: list[Literal["motion", "appearance", "detector", "grounder"]] = Field(
        description="what spoke against the track on the failing frame: motion (the Kalman prediction from before "
        "a break lands on another detection, or on none), appearance (another detection looks more like it), "
        "detector (another track holds its detection, or its mask sits on another noun's); grounder last where "
        "the others disagreed and the grounder, asked again, named another box (without it, motion and "
        "appearance named the same one)"
    )
    track: int = Field(description="index of the cut track within the masklet, as in `prompts`")


class MaskletRecord(Record):
    masklet_id: str
    video_id: str
    expression: str
    noun: str
    method: str = Field(
        description="what made it: strefer, grounded-sam2 (baseline), videorefer (Segmentor), source (ground "
        "truth read from a mask dataset)"
    )
    start_frame: int = Field(description="frame the tracker was prompted on")
    start_time: float
    detector_score: float
    detector_box: list[float]
    assignment: Assignment
    num_frames_tracked: int = Field(description="frames the tracker ran on; frames lists those with a mask")
    track_fps: Optional[float] = Field(
        default=None,
        description="rate the tracker ran at (0: every decoded frame); frames between tracked ones carry no mask "
        "here (exporters can hold the nearest one). None for masks read from a source dataset",
    )
    prompts: list[TrackPrompt] = Field(default_factory=list, description="every prompt of every track joined here")
    cuts: list[TrackCut] = Field(
        default_factory=list,
        description="every identity cut of every track joined here (track by track, in the order made)",
    )
    frames: list[FrameMask]
    provenance: Provenance


class EntityRef(Record):
    """A referring expression and the generalized noun that prompts the detector ("girl in blue" -> "person")."""

    expression: str = Field(min_length=1)
    noun: str = Field(min_length=1)

    @classmethod
    def parse(cls, text: str) -> "EntityRef":
        """`EXPRESSION[:NOUN]`; without a noun the expression itself prompts the detector."""
        expression, _, noun = text.rpartition(":") if ":" in text else (text, "", "")
        expression, noun = expression.strip(), noun.strip()
        if not expression:
            raise ValueError(f"entity {text!r} has an empty expression; use EXPRESSION[:NOUN]")
        return cls(expression=expression, noun=noun or expression)


class RejectionRecord(Record):
    rejection_id: str
    source: str
    video_id: Optional[str] = None
    stage: str = Field(description="where it was dropped: input, decode, clip, detect, track, assign, or an agent's name")
    reason: str = Field(description="a short machine-friendly reason, e.g. no_detection")
    detail: str = Field(description="what happened, for a person")
    expression: Optional[str] = None
    raw_answer: Optional[str] = Field(default=None, description="a model's last invalid answer, kept as evidence")


class Turn(Record):
    role: Literal["human", "gpt"]
    value: str


class Review(Record):
    """The Reviewer's check (VideoRefer §3.1.1): does the masked region match the Annotator's description?"""

    verdict: bool
    reason: str
    region_caption: str = Field(description="what the region captioner said of the masked region")
    frame_index: int = Field(description="the frame the region was shown on")


class Window(Record):
    """Where in its video a sample applies: a clip, or a caption manifest row's window. Frames count from the
    first frame of the whole file; `end_frame` and `end_s` are exclusive."""

    start_frame: int
    end_frame: int
    start_s: float
    end_s: float


class SampleRecord(Record):
    """One instruction sample: a conversation whose `<region>` tokens refer, in order, to `masklet_ids`."""

    sample_id: str
    video_id: str
    source: str
    pipeline: str = Field(description="videorefer, strefer, ...")
    data_type: str = Field(description="e.g. detailed_caption, short_caption, object_qa")
    task: Optional[str] = Field(default=None, description="finer kind, e.g. basic, reasoning, future")
    labels: dict[str, str] = Field(default_factory=dict, description="pipeline-specific labels (group, task type)")
    conversation: list[Turn]
    masklet_ids: list[str] = Field(description="one per <region> token, in order of appearance")
    frames: list[int] = Field(description="frame indexes the sample was built from")
    window: Optional[Window] = Field(
        default=None, description="the clip or window the sample is about; None: the whole item (its video row's window)"
    )
    refers_to: list[str] = Field(
        default_factory=list,
        description="what the sample's text points at: mask (<region> tokens), timestamp, coarse_time, event",
    )
    kept: bool = Field(description="false when a check (the Reviewer) dropped it; exporters skip those")
    review: Optional[Review] = None
    provenance: Provenance


class SourceObject(Record):
    """An object a source dataset already annotates: its masks (ground truth, never re-segmented), or only its
    boxes (VidSTG): then a box-prompted segmenter makes its masks and its masklet's method is `pseudo`."""

    object_id: str
    masks: dict[int, Rle] = Field(
        default_factory=dict, description="frame position in the item (0-based) -> COCO RLE at the source's frame size"
    )
    boxes: dict[int, list[float]] = Field(
        default_factory=dict, description="frame position -> xyxy pixels at the source's frame size, where the "
        "source gives boxes and no masks"
    )
    category: Optional[str] = Field(default=None, description="the dataset's category label (LV-VIS, SA-V: none)")


class SourceProblem(Record):
    """An annotation of the source an adapter could not use (a mask of the wrong size, a frame past the end, an
    empty mask, an expression naming a missing object). The item goes on without it; the runner writes it as a
    `rejections` row of the item (stage `input`), so nothing is lost silently."""

    reason: str = Field(description="e.g. mask_size_mismatch, frame_out_of_range, empty_mask, unknown_object")
    detail: str
    object_id: Optional[str] = None
    expression: Optional[str] = None


class SourceExpression(Record):
    expression: str = Field(min_length=1)
    object_ids: list[str] = Field(min_length=1, description="the objects it refers to (MeViS: one or more)")


class WorkItem(Record):
    """One unit of input for a pipeline: a video (file, URL, or a folder of frames), optionally a time window
    inside it, and whatever its source carries (a caption, objects with masks, referring expressions)."""

    source: str
    start_s: Optional[float] = Field(default=None, ge=0)
    end_s: Optional[float] = Field(default=None, gt=0)
    caption: Optional[str] = None
    frame_rate: Optional[float] = Field(default=None, gt=0, description="frames per second of a frame folder")
    dataset: Optional[str] = Field(default=None, description="where it came from: manifest, mevis, ref-youtube-vos, lv-vis, sa-v, vidstg, a2d-sentences, revos, objects, engine")
    objects: list[SourceObject] = Field(default_factory=list)
    expressions: list[SourceExpression] = Field(default_factory=list)
    problems: list[SourceProblem] = Field(default_factory=list, description="annotations of the source left out")

    @property
    def key(self) -> str:
        """Stable id of this input (source, window and caption: two captions of one video are two items),
        known before the file is read."""
        from engine.ids import stable_id

        return stable_id(self.source, self.start_s, self.end_s, self.caption)


class ItemRecord(Record):
    """One row of the `items` table: a work item of a pipeline, committed. An item is complete exactly when its
    row is there; its rows in the data tables carry its `item_id` and the `write_id` of the flush that wrote
    them. The latest row of an `item_id` (by `committed_at`) is the one that counts: a rerun supersedes."""

    item_id: str = Field(description="the pipeline, the item's key and its run options (variant), hashed")
    pipeline: str
    item_key: str = Field(description="WorkItem.key: source, window and caption")
    variant: str = Field(description="hash of the run options that shape the output (data types, entities)")
    source: str
    start_s: Optional[float] = None
    end_s: Optional[float] = None
    status: Literal["done", "rejected", "removed", "replaced"] = Field(
        description="done; rejected (see reason); removed: gone from the source at a refresh; replaced: a --force "
        "run with other options took its place"
    )
    reason: Optional[str] = Field(default=None, description="why a rejected item produced nothing")
    detail: str = ""
    video_id: Optional[str] = None
    content_sha256: Optional[str] = None
    fingerprint: Optional[str] = Field(default=None, description="size and mtime (or etag) seen, as JSON")
    run_hash: str = Field(description="the pipeline's roles, prompts, settings and run options, hashed")
    write_id: str
    run_id: str
    rows: dict[str, int] = Field(default_factory=dict, description="rows the item wrote per table")
    counters: dict[str, int] = Field(default_factory=dict, description="what the item cost: frames, model calls")
    engine_version: str
    committed_at: str = Field(description="UTC, ISO 8601 with microseconds (sorts as text)")


class RunSettings(Record):
    """What a pipeline ran with, recorded with each version so a refresh can run it again."""

    pipeline: str
    variant: str
    run_hash: str
    options: str = Field(description="run options as JSON (data types, entities, ...)")
    config: str = Field(description="the resolved profile and settings as JSON")
    sources: list[str]
    sources_are_videos: bool = Field(default=False, description="each source is one video file, taken as it is")
    frame_rate: Optional[float] = None
    split: Optional[str] = Field(default=None, description="the split of a dataset release with several (--split)")


class VersionRecord(Record):
    """One row of the `versions` table: a published dataset version (its number is the Delta version of the
    `versions` table's commit that added it)."""

    run_id: str
    kind: Literal["run", "refresh", "compact"]
    published_at: str
    engine_version: str
    tables: dict[str, int] = Field(description="Delta version of every table (items included) at publication")
    settings: list[RunSettings]
    counts: dict[str, int] = Field(description="items done, skipped, rejected, removed, replaced in this run")
    stats: str = Field(description="the run's counters and timers as JSON")
