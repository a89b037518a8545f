"""Where a role's weights come from, and a fast, actionable failure when they cannot be had."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from engine.config import RoleSpec
from engine.errors import MissingWeightsError



@dataclass(frozen=True)
class WeightsStatus:
    available: bool
    where: str  # what a person reads: "built from config", a path, "HF cache", "downloadable", "missing"


def hub_endpoint() -> str:
    """The hub huggingface_hub talks to: HF_ENDPOINT (a mirror) or the default."""
    from huggingface_hub import constants

    return constants.ENDPOINT


@cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One HEAD request through huggingface_hub's own HTTP session, so HF_ENDPOINT, proxies (HTTPS_PROXY,
    NO_PROXY) and certificates are honoured as for a real download."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        get_session().head(hub_endpoint(), timeout=timeout, follow_redirects=True)
        return True
    except Exception:  # any transport failure means: not reachable now
        return False


def _in_hf_cache(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None


def locate(spec: RoleSpec, *, check_hub: bool = True) -> WeightsStatus:
    if spec.is_tiny:
        return WeightsStatus(True, "built from config (random weights)")
    if spec.is_random_fullsize:
        return WeightsStatus(True, "built from config, full size (random weights)")
    if spec.backend == "openai":
        return WeightsStatus(True, f"served at {spec.options.get('base_url', '?')}")
    if Path(spec.model).expanduser().exists():
        return WeightsStatus(True, str(Path(spec.model).expanduser()))
    cached = _in_hf_cache(spec.model)
    if cached:
        return WeightsStatus(True, f"HF cache ({cached})")
    if check_hub and hub_reachable():
        return WeightsStatus(True, f"downloadable from {hub_endpoint()}")
    return WeightsStatus(False, "missing")


def require(roles: dict[str, RoleSpec]) -> None:
    """Fail before any model loads when a role's weights are neither local nor reachable."""
    missing = {role: spec for role, spec in roles.items() if not locate(spec).available}
    if not missing:
        return
    names = ", ".join(f"{role}={spec.model}" for role, spec in missing.items())
    first = next(iter(missing.values())).model
    raise MissingWeightsError(
        f"missing model weights ({names}): not a local path, not in the Hugging Face cache, and {hub_endpoint()} "
        f"is unreachable. Fetch them where there is network (`hf download {first}`) and copy the cache "
        f"(HF_HOME), or point the role's `model:` at a local folder in a --config file, or use --profile tiny "
        f"for an offline wiring check."
    )
