"""The data contract: pydantic records and the explicit Arrow schemas generated from them."""

from schemas.records import (
    Assignment,
    ClipRecord,
    EntityRef,
    FrameMask,
    MaskletRecord,
    Provenance,
    RejectionRecord,
    Rle,
    VideoRecord,
)
from schemas.arrow import arrow_schema, to_table, from_table

TABLES = {
    "videos": VideoRecord,
    "clips": ClipRecord,
    "masklets": MaskletRecord,
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
    "Rle",
    "VideoRecord",
    "arrow_schema",
    "from_table",
    "to_table",
]
