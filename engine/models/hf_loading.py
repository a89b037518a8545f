"""Loading Hugging Face weights with an error a user can act on when they are not there."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engine.errors import MissingWeightsError


@contextmanager
def missing_weights_as_error(model_id_or_path: str, *, role: str) -> Iterator[None]:
    """Turn transformers' OSError for absent weights (no local folder, no hub access) into
    MissingWeightsError that names the weights and how to supply them."""
    try:
        yield
    except OSError as err:
        if Path(model_id_or_path).exists():
            hint = f"the folder {model_id_or_path!r} exists but does not hold complete {role} weights"
        elif _looks_like_path(model_id_or_path):
            hint = f"there is no folder {model_id_or_path!r}"
        else:
            hint = (
                f"download them where there is network (`hf download {model_id_or_path}`) and pass the local "
                "folder instead, or point HF_HOME at a cache that holds them"
            )
        raise MissingWeightsError(f"cannot load {role} weights {model_id_or_path!r}: {hint} ({err})") from err


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "namespace/name"; anything else is meant as a folder.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
