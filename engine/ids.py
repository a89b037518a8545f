"""Deterministic ids: a rerun with the same input and config produces the same ids, so it overwrites."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_id(*parts: Any, length: int = 16) -> str:
    """Hex digest of the parts (JSON-encoded, so dicts and lists hash by content)."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def file_sha256(url: str, chunk: int = 1 << 22) -> str:
    """Content hash of a local file or fsspec URL, streamed."""
    import fsspec

    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
