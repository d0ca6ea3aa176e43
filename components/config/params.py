"""Reading ``params.yaml``: profiles, dotted overrides, project discovery.

Kept apart from the typed config (``components/config.py``) so that the DVC
``prepare`` stage depends only on what shapes the data: this module,
``components/data.py`` and ``components/prepare.py``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

DEFAULT_PROFILE = "default"

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """params.yaml (or an override) is missing, malformed or invalid."""


class Section(BaseModel):
    """A params section: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` merged in, nested mappings merged key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value`` (the value is read as YAML: 3, 0.1, null, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or "." not in key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.strip(), value


def apply_override(sections: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``sections[a][b]... = value`` for ``dotted`` = ``a.b...`` (in place)."""
    *parents, leaf = dotted.split(".")
    node = sections
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def read_params(path: str | Path) -> dict[str, Any]:
    """Read a params file as a plain dict (what DVC sees)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found (set FEDFORGET_PARAMS or run from the project)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return raw


def resolve_sections(
    raw: Mapping[str, Any], profile: str = DEFAULT_PROFILE, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The base sections with ``profiles.<profile>`` and then ``overrides`` laid over them."""
    sections = {k: copy.deepcopy(v) for k, v in raw.items() if k != "profiles"}
    profiles = raw.get("profiles") or {}
    if profile != DEFAULT_PROFILE:
        if profile not in profiles:
            known = [DEFAULT_PROFILE, *sorted(profiles)]
            raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(known)}")
        sections = deep_merge(sections, profiles[profile] or {})
    for dotted, value in (overrides or {}).items():
        apply_override(sections, dotted, value)
    return sections


def validate(model: type[M], data: Any, prefix: str = "") -> M:
    """Validate ``data`` into ``model``; errors name every bad parameter."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join([prefix] * bool(prefix) + [str(p) for p in err['loc']])}: {err['msg']}" for err in exc.errors()
        ]
        raise ConfigError("invalid params: " + "; ".join(problems)) from None


def find_project_root(start: str | Path | None = None) -> Path:
    """``FEDFORGET_PROJECT``, else the nearest folder upwards holding params.yaml."""
    env = os.environ.get("FEDFORGET_PROJECT")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    raise ConfigError(f"no params.yaml in {here} or above; run fedforget inside the project or set FEDFORGET_PROJECT")


def params_file(root: Path) -> Path:
    """``FEDFORGET_PARAMS``, else ``<root>/params.yaml``."""
    return Path(os.environ.get("FEDFORGET_PARAMS") or root / "params.yaml")
