"""Build each role's backend from its profile entry; models load once per process and stay loaded."""

from __future__ import annotations

from typing import Any

from engine.config import EngineConfig, RoleSpec
from engine.errors import ConfigError
from engine.models import weights

BACKENDS = {
    "detector": {"grounding-dino": ("engine.models.grounding_dino", "GroundingDinoDetector")},
    "embedder": {"siglip": ("engine.models.siglip", "SiglipEmbedder")},
    "grounder": {"transformers-vlm": ("engine.models.qwen_grounder", "VlmGrounder")},
    "tracker": {"sam2": ("engine.models.sam2_tracker", "Sam2Tracker")},
    "box_segmenter": {"sam2-image": ("engine.models.sam2_image", "Sam2BoxSegmenter")},
}


def _backend_class(role: str, spec: RoleSpec) -> Any:
    import importlib

    choices = BACKENDS.get(role, {})
    if spec.backend not in choices:
        raise ConfigError(f"role {role}: unknown backend {spec.backend!r}; choose from {sorted(choices)}")
    module, name = choices[spec.backend]
    return getattr(importlib.import_module(module), name)


_LOADED: dict[tuple[str, str, str, str], Any] = {}


def _build(role: str, spec: RoleSpec, device: str, dtype: str) -> Any:
    key = (role, spec.model_dump_json(), device, dtype)
    if key not in _LOADED:
        _LOADED[key] = _load(role, spec, device, dtype)
    return _LOADED[key]


def _load(role: str, spec: RoleSpec, device: str, dtype: str) -> Any:
    cls = _backend_class(role, spec)
    options = dict(spec.options)
    if role == "tracker":
        options.setdefault("dtype", dtype)
    if spec.is_tiny:
        return cls.tiny(device=device, **options)
    return cls.from_pretrained(spec.model, device=device, **options)


def build(config: EngineConfig, roles: list[str]) -> dict[str, Any]:
    """Backends for `roles`, checked for weights first so a missing one fails before anything loads."""
    from engine.device import pick_device

    for role in roles:
        _backend_class(role, config.roles[role])
    weights.require({r: config.roles[r] for r in roles})
    device = pick_device(config.pipeline.get("device", "auto"))
    dtype = config.pipeline.get("dtype", "bfloat16")
    return {role: _build(role, config.roles[role], device, dtype) for role in roles}
