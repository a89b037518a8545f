"""Every prompt is a Jinja2 template file here, named after its agent and versioned by content hash.

    render("grounder", referring="the dog", n=3)
    template_hash("grounder")  # record it in provenance beside the model id
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

_DIR = Path(__file__).parent
_NAME = re.compile(r"^[a-z0-9_]+$")


def _path(name: str) -> Path:
    # Names are plain identifiers, so a caller can never reach outside this folder.
    if not _NAME.match(name):
        raise ValueError(f"prompt name {name!r} must be lowercase letters, digits and underscores")
    path = _DIR / f"{name}.j2"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in _DIR.glob("*.j2"))) or "none"
        raise ValueError(f"no prompt template {name!r} in {_DIR} (available: {available})")
    return path


@lru_cache(maxsize=1)
def _env() -> Any:
    import jinja2

    # StrictUndefined: a missing variable is an error, never a silently empty hole in a prompt.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
    )


def render(name: str, **variables: Any) -> str:
    """The template `prompts/<name>.j2` filled with `variables`, stripped of surrounding whitespace."""
    _path(name)
    return _env().get_template(f"{name}.j2").render(**variables).strip()


def template_hash(name: str) -> str:
    """First 12 hex digits of the sha256 of the template file's bytes."""
    return hashlib.sha256(_path(name).read_bytes()).hexdigest()[:12]
