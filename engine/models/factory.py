"""Build each role's backend from its profile entry; models load once per process and stay loaded.

Roles are open: a pipeline asks for the roles it needs and the kind of interface each must provide
(`{"detector": "detector", "refiner": "chat"}`); a profile names, per role, a backend from `BACKENDS`. Roles
whose specs are equal share one loaded model (one VLM can serve llm, vlm and grounder).

Every chat role gets its model behind a `ChatQueue` (settings section `chat_queue`), one queue per loaded
model, so the requests of the videos in flight are coalesced into batched backend calls whichever roles send
them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping

from engine.config import EngineConfig, RoleSpec, require_roles
from engine.device import resolve_dtype
from engine.errors import ConfigError
from engine.models.chat_queue import ChatQueue, ChatQueueConfig


@dataclass(frozen=True)
class Backend:
    kind: str  # the interface it provides: detector, tracker, box_segmenter, embedder, chat
    module: str
    name: str
    needs_weights: bool = True  # False for a client of a model served elsewhere
    # Backend calls a chat queue lets run at once; None: no limit. An in-process engine runs one call at a time,
    # so what arrives meanwhile waits in the queue and goes as one call; a server's client runs calls side by side.
    calls_at_once: int | None = 1


BACKENDS: dict[str, Backend] = {
    "grounding-dino": Backend("detector", "engine.models.grounding_dino", "GroundingDinoDetector"),
    "siglip": Backend("embedder", "engine.models.siglip", "SiglipEmbedder"),
    "sam2": Backend("tracker", "engine.models.sam2_tracker", "Sam2Tracker"),
    "sam2-image": Backend("box_segmenter", "engine.models.sam2_image", "Sam2BoxSegmenter"),
    "hq-sam": Backend("box_segmenter", "engine.models.sam_hq", "SamHqBoxSegmenter"),
    "transformers": Backend("chat", "engine.models.chat_transformers", "TransformersChat"),
    "vllm": Backend("chat", "engine.models.chat_vllm", "VllmChat"),
    "openai": Backend("chat", "engine.models.chat_http", "HttpChat", needs_weights=False, calls_at_once=None),
}


def backend_of(role: str, spec: RoleSpec, kind: str | None = None) -> Backend:
    backend = BACKENDS.get(spec.backend)
    if backend is None:
        raise ConfigError(f"role {role}: unknown backend {spec.backend!r}; choose from {', '.join(sorted(BACKENDS))}")
    if kind is not None and backend.kind != kind:
        choices = sorted(n for n, b in BACKENDS.items() if b.kind == kind)
        raise ConfigError(f"role {role} needs a {kind} backend, got {spec.backend!r}; choose from {', '.join(choices)}")
    return backend


# Kinds whose backends take the run's dtype (`pipeline.dtype`, resolved per device): the SAM family. Left to
# its own default, SAM 2's image predictor ran under bf16 autocast on a CPU, about 7 times slower.
DTYPED = ("tracker", "box_segmenter")
_LOADED: dict[tuple[str, str, str], Any] = {}
_QUEUES: dict[tuple[str, str, str], ChatQueue] = {}  # one per loaded chat model, keyed as _LOADED
_LOCK = threading.Lock()  # Prefect's thread task runner may build from several threads: load once


def _load(spec: RoleSpec, device: str, dtype: str, kind: str) -> Any:
    cls = _backend_class(BACKENDS[spec.backend])
    options = dict(spec.options)
    if kind in DTYPED:
        options.setdefault("dtype", dtype)
    if spec.is_tiny:
        return cls.tiny(device=device, **options)
    if spec.is_random_fullsize:
        return cls.random_fullsize(name=spec.model, device=device, **options)
    return cls.from_pretrained(spec.model, device=device, **options)


def _backend_class(backend: Backend) -> Any:
    import importlib

    return getattr(importlib.import_module(backend.module), backend.name)


def check_random_fullsize(role: str, spec: RoleSpec) -> None:
    """A `random/...` model needs a backend that builds its full-size architecture from a config."""
    if spec.is_random_fullsize and not hasattr(_backend_class(BACKENDS[spec.backend]), "random_fullsize"):
        able = sorted(name for name, b in BACKENDS.items() if hasattr(_backend_class(b), "random_fullsize"))
        raise ConfigError(
            f"role {role}: backend {spec.backend!r} cannot build {spec.model!r} with random weights; backends "
            f"that can: {', '.join(able)} (a chat role can use tiny-random/qwen2.5-vl with backend transformers)"
        )


def build(config: EngineConfig, roles: Mapping[str, str], *, pipeline: str = "this pipeline") -> dict[str, Any]:
    """Backends for `roles` (role -> kind), checked for kinds and weights first so a missing one fails
    before anything loads."""
    from engine.device import pick_device
    from engine.models import weights

    require_roles(config, list(roles), pipeline=pipeline)
    queue_config = ChatQueueConfig.parse(config.section("chat_queue"))
    for role, kind in roles.items():
        backend_of(role, config.roles[role], kind)
        check_random_fullsize(role, config.roles[role])
    weights.require({r: config.roles[r] for r in roles if BACKENDS[config.roles[r].backend].needs_weights})
    device = pick_device(config.pipeline.get("device", "auto"))
    dtype = resolve_dtype(config.pipeline.get("dtype", "auto"), device)
    out = {}
    with _LOCK:
        for role, kind in roles.items():
            spec = config.roles[role]
            key = (spec.model_dump_json(), device, dtype if kind in DTYPED else "")
            if key not in _LOADED:
                _LOADED[key] = _load(spec, device, dtype, kind)
            out[role] = _LOADED[key] if kind != "chat" else _queue(key, _LOADED[key], spec, queue_config)
    return out


def _queue(key: tuple[str, str, str], model: Any, spec: RoleSpec, config: ChatQueueConfig) -> ChatQueue:
    """The loaded chat model's queue (the lock held); a later build's settings replace an earlier one's."""
    queue = _QUEUES.get(key)
    if queue is None or queue.backend is not model:
        queue = _QUEUES[key] = ChatQueue(model, config, calls_at_once=BACKENDS[spec.backend].calls_at_once)
    else:
        queue.configure(config)
    return queue
