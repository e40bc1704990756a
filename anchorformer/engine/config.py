"""Recipe presets of the ``mini`` and ``full`` profiles and ``--set key=value`` overrides.

Each task has ``anchorformer/configs/{task}.yaml`` with one section per profile (``mini:``,
``full:``). The CLI loads one section with :func:`load_profile`, then applies the user's
overrides with :func:`apply_overrides`, which parses values as YAML and refuses unknown keys
before any work starts. Nested sections are addressed with dots (``--set model_sizes.tiny.depth=6``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CONFIG_DIR", "ConfigKeyError", "PROFILES", "apply_overrides", "default_profile", "load_profile"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PROFILES = ("mini", "full")


class ConfigKeyError(KeyError):
    """An unknown configuration key; ``str()`` is the plain message (no quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def load_profile(task: str, profile: str) -> dict[str, Any]:
    """The preset of ``profile`` for ``task`` from ``anchorformer/configs/{task}.yaml``.

    Args:
        task: ``"cls"``, ``"det"`` or ``"seg"``.
        profile: ``"mini"`` or ``"full"``.

    Raises:
        FileNotFoundError: no config file for ``task``.
        KeyError: the file has no section ``profile``.
    """
    path = CONFIG_DIR / f"{task}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no recipe presets for task {task!r}: {path} does not exist (tasks: {have})")
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or profile not in data or not isinstance(data[profile], dict):
        sections = sorted(data) if isinstance(data, dict) else []
        raise ConfigKeyError(f"{path}: no profile {profile!r}; sections found: {sections}")
    return copy.deepcopy(data[profile])


def _compatible(old: Any, new: Any) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return not (isinstance(old, int) and isinstance(new, float) and not new.is_integer())
    if isinstance(old, dict) or isinstance(new, dict):
        return isinstance(old, dict) and isinstance(new, dict)
    if isinstance(old, (list, tuple)):
        return isinstance(new, (list, tuple))
    if isinstance(old, str):
        return isinstance(new, (str, int, float))  # e.g. a teacher name that looks like a number
    return type(old) is type(new)


def _valid_keys(cfg: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_valid_keys(v, prefix + k + "."))
    return keys


def apply_overrides(cfg: dict[str, Any], overrides: Iterable[str] | None) -> dict[str, Any]:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (values parsed as YAML).

    Args:
        cfg: a preset from :func:`load_profile`.
        overrides: strings ``"key=value"``; ``key`` may be dotted for nested sections.

    Raises:
        KeyError: a key that ``cfg`` does not have (the message lists the valid keys).
        ValueError: a malformed item, or a value whose type does not fit the preset's.
    """
    out = copy.deepcopy(cfg)
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {key}: cannot parse {raw!r} as YAML ({e})") from e
        _check_flow_mapping(key, raw, value)
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ConfigKeyError(f"unknown config key {key!r}; valid keys: {', '.join(_valid_keys(cfg))}")
            if i < len(parts) - 1:
                node = node[part]
        last = parts[-1]
        value = _coerce_number(node[last], value)
        if not _compatible(node[last], value):
            raise ValueError(
                f"override {key}={raw!r}: expected a value like {node[last]!r} ({type(node[last]).__name__}), "
                f"got {type(value).__name__}"
            )
        if isinstance(node[last], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(node[last], str) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = raw.strip()
        node[last] = value
    return out


def _check_flow_mapping(key: str, raw: str, value: Any) -> None:
    """``{a:1}`` parses as ``{"a:1": None}`` in YAML: refuse it rather than pass a wrong key on."""
    if isinstance(value, dict):
        for k, v in value.items():
            if v is None and isinstance(k, str) and ":" in k:
                raise ValueError(
                    f"override {key}={raw!r}: write 'name: value' with a space after the colon (got the key {k!r})"
                )
            _check_flow_mapping(key, raw, v)
    elif isinstance(value, list):
        for v in value:
            _check_flow_mapping(key, raw, v)


def _coerce_number(default: Any, value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; read it as the number the preset's key holds."""
    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def default_profile(params_path: str | os.PathLike = "params.yaml") -> str:
    """The ``profile`` of ``./params.yaml`` when that file exists and names one, else ``"mini"``.

    Raises:
        ValueError: ``params.yaml`` names a profile other than ``mini`` or ``full``.
    """
    path = Path(params_path)
    if not path.is_file():
        return "mini"
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    profile = data.get("profile", "mini") if isinstance(data, dict) else "mini"
    if profile not in PROFILES:
        raise ValueError(f"{path}: profile must be one of {PROFILES}; got {profile!r}")
    return profile
