"""Profiles and pipeline settings: the bundled profiles.yaml, deep-merged with a user's config file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from engine.errors import ConfigError
from engine.ids import stable_id

ROLES = ("detector", "tracker", "box_segmenter", "embedder", "grounder")
TINY_PREFIX = "tiny-random/"


class RoleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str
    model: str
    options: dict[str, Any] = {}

    @property
    def is_tiny(self) -> bool:
        return self.model.startswith(TINY_PREFIX)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str
    roles: dict[str, RoleSpec]
    pipeline: dict[str, Any]

    @property
    def hash(self) -> str:
        """Content hash of everything that shapes the output (not the device)."""
        settings = {k: v for k, v in self.pipeline.items() if k != "device"}
        return stable_id(self.profile, {r: s.model_dump() for r, s in self.roles.items()}, settings, length=12)

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.pipeline.get(name, {}))

    @property
    def is_tiny(self) -> bool:
        return any(spec.is_tiny for spec in self.roles.values())


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


def raw_config(config_file: str | Path | None = None) -> dict:
    data = _read_yaml(resources.files("engine").joinpath("profiles.yaml").read_text(), "bundled profiles.yaml")
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = _deep_merge(data, _read_yaml(path.read_text(), str(path)))
    return data


def load_config(profile: str = "default", config_file: str | Path | None = None) -> EngineConfig:
    data = raw_config(config_file)
    profiles = data.get("profiles", {})
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}; available: {', '.join(sorted(profiles))}")
    roles = profiles[profile]
    missing = [r for r in ROLES if r not in roles]
    if missing:
        raise ConfigError(f"profile {profile!r} lacks roles {missing}")
    pipeline = _deep_merge(data.get("pipeline", {}), data.get("profile_pipeline", {}).get(profile, {}))
    try:
        return EngineConfig(profile=profile, roles={r: RoleSpec(**roles[r]) for r in ROLES}, pipeline=pipeline)
    except (ValidationError, TypeError) as exc:
        raise ConfigError(f"profile {profile!r} does not validate: {exc}".replace("\n", " ")) from None


def profile_names(config_file: str | Path | None = None) -> list[str]:
    return list(raw_config(config_file).get("profiles", {}))
