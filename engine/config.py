"""Profiles and pipeline settings: the bundled profiles.yaml, deep-merged with a user's config file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from dataclasses import fields, is_dataclass
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from engine.errors import ConfigError
from engine.ids import stable_id

TINY_PREFIX = "tiny-random/"  # a miniature random model built from a small config (tests, wiring checks)
RANDOM_PREFIX = "random/"  # a published architecture at full size with random weights (throughput on any GPU)


class RoleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str
    model: str
    options: dict[str, Any] = {}

    @property
    def is_tiny(self) -> bool:
        return self.model.startswith(TINY_PREFIX)

    @property
    def is_random_fullsize(self) -> bool:
        return self.model.startswith(RANDOM_PREFIX)

    @property
    def is_random(self) -> bool:
        """Built from a config with random weights (tiny or full size): its outputs are meaningless."""
        return self.is_tiny or self.is_random_fullsize


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str
    roles: dict[str, RoleSpec]
    pipeline: dict[str, Any]

    @property
    def hash(self) -> str:
        """Content hash of everything that shapes the output (not the device, how many items run at once, how
        chat requests are batched, or where batches run)."""
        settings = {k: v for k, v in self.pipeline.items() if k not in ("device", "runner", "chat_queue", "orchestration")}
        return stable_id(self.profile, {r: s.model_dump() for r, s in self.roles.items()}, settings, length=12)

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.pipeline.get(name, {}))

    @property
    def is_random(self) -> bool:
        """Whether any role has random weights (`tiny-random/...` or `random/...`): outputs are meaningless."""
        return any(spec.is_random for spec in self.roles.values())

    @property
    def is_tiny(self) -> bool:
        """Kept for callers that warn about meaningless outputs: the same as `is_random`."""
        return self.is_random


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(text: str, origin: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping at the top level")
    unknown = set(data) - {"profiles", "pipeline", "profile_pipeline"}
    if unknown:
        raise ConfigError(f"{origin}: unknown top-level keys {sorted(unknown)}; use profiles, pipeline, profile_pipeline")
    return data


def _layers(config_file: str | Path | None) -> list[dict]:
    """The bundled profiles.yaml, then the user's file (which wins)."""
    layers = [_read_yaml(resources.files("engine").joinpath("profiles.yaml").read_text(), "bundled profiles.yaml")]
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        layers.append(_read_yaml(path.read_text(), str(path)))
    return layers


def raw_config(config_file: str | Path | None = None) -> dict:
    merged: dict = {}
    for layer in _layers(config_file):
        merged = _deep_merge(merged, layer)
    return merged


def _pipeline_settings(layers: list[dict], profile: str) -> dict:
    """Each layer's `pipeline` then its `profile_pipeline.<profile>`, layer over layer: a user's setting
    always wins over a bundled per-profile default."""
    merged: dict = {}
    for layer in layers:
        merged = _deep_merge(merged, layer.get("pipeline", {}))
        merged = _deep_merge(merged, layer.get("profile_pipeline", {}).get(profile, {}))
    return merged


GLOBAL_SETTINGS = {"device": str, "dtype": str}  # pipeline keys that are not sections


def _resolve_roles(profile: str, roles: Any) -> dict[str, RoleSpec]:
    """A role is a spec (`{backend, model, options}`) or the name of another role of the profile, which it
    shares (one model serves both: `refiner: llm`)."""
    if not isinstance(roles, dict) or not roles:
        raise ConfigError(f"profile {profile!r} must map role names to model specs")
    out: dict[str, RoleSpec] = {}
    for role, value in roles.items():
        target, seen = value, [role]
        while isinstance(target, str):
            if target in seen or target not in roles:
                raise ConfigError(f"profile {profile!r}: role {role} refers to {target!r}, which is not a role spec")
            seen.append(target)
            target = roles[target]
        try:
            out[role] = RoleSpec(**target) if isinstance(target, dict) else RoleSpec.model_validate(target)
        except (ValidationError, TypeError) as exc:
            raise ConfigError(f"profile {profile!r}, role {role}: {_one_line(exc)}") from None
    return out


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'value'}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e else "")
            for e in exc.errors()[:3]
        )
    return str(exc).replace("\n", " ")


def validate_settings(pipeline: Mapping[str, Any], sections: Mapping[str, type]) -> None:
    """Check every pipeline setting against the dataclass of its section before any model loads: an unknown
    or mistyped key is a one-line ConfigError naming it."""
    for name, value in pipeline.items():
        if name in GLOBAL_SETTINGS:
            if not isinstance(value, GLOBAL_SETTINGS[name]):
                raise ConfigError(f"pipeline.{name} must be a {GLOBAL_SETTINGS[name].__name__}, got {value!r}")
            continue
        if name not in sections:
            known = sorted([*sections, *GLOBAL_SETTINGS])
            raise ConfigError(f"unknown setting pipeline.{name}; known: {', '.join(known)}")
        cls = sections[name]
        if not isinstance(value, dict):
            raise ConfigError(f"pipeline.{name} must be a mapping of settings, got {value!r}")
        allowed = {f.name for f in fields(cls)} if is_dataclass(cls) else set(cls.model_fields)
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ConfigError(f"unknown setting pipeline.{name}.{unknown[0]}; {name} takes: {', '.join(sorted(allowed))}")
        try:
            TypeAdapter(cls).validate_python(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"pipeline.{name}.{where}: {err['msg']} (got {err.get('input')!r})") from None
        except (ValueError, TypeError) as exc:  # a dataclass's own __post_init__ check
            raise ConfigError(f"pipeline.{name}: {exc}") from None


def load_config(
    profile: str = "default",
    config_file: str | Path | None = None,
    *,
    sections: Mapping[str, type] | None = None,
) -> EngineConfig:
    """The profile's roles and the pipeline settings; with `sections` (section name -> its config dataclass)
    every setting is validated here, before anything loads."""
    layers = _layers(config_file)
    profiles = raw_config(config_file).get("profiles", {})
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}; available: {', '.join(sorted(profiles))}")
    pipeline = _pipeline_settings(layers, profile)
    if sections is not None:
        validate_settings(pipeline, sections)
    return EngineConfig(profile=profile, roles=_resolve_roles(profile, profiles[profile]), pipeline=pipeline)


def require_roles(config: EngineConfig, roles: list[str], *, pipeline: str) -> None:
    missing = [r for r in roles if r not in config.roles]
    if missing:
        raise ConfigError(
            f"profile {config.profile!r} has no {', '.join(missing)} role(s), which pipeline {pipeline} needs; "
            f"add them under profiles.{config.profile} in a --config file"
        )


def profile_names(config_file: str | Path | None = None) -> list[str]:
    return list(raw_config(config_file).get("profiles", {}))
