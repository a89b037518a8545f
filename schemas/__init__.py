"""The data contract: pydantic records and the explicit Arrow schemas generated from them."""

from schemas.records import (
    Assignment,
    ClipRecord,
    EntityRef,
    FrameMask,
    MaskletRecord,
    Provenance,
    RejectionRecord,
    Review,
    Rle,
    SampleRecord,
    SourceExpression,
    SourceObject,
    TrackPrompt,
    Turn,
    VideoRecord,
    Window,
    WorkItem,
)
from schemas.arrow import arrow_schema, to_table, from_table

TABLES = {
    "videos": VideoRecord,
    "clips": ClipRecord,
    "masklets": MaskletRecord,
    "samples": SampleRecord,
    "rejections": RejectionRecord,
}

__all__ = [
    "TABLES",
    "Assignment",
    "ClipRecord",
    "EntityRef",
    "FrameMask",
    "MaskletRecord",
    "Provenance",
    "RejectionRecord",
    "Review",
    "Rle",
    "SampleRecord",
    "SourceExpression",
    "SourceObject",
    "TrackPrompt",
    "Turn",
    "WorkItem",
    "VideoRecord",
    "Window",
    "arrow_schema",
    "from_table",
    "to_table",
]
