"""Typed recipes: each task's settings as a dataclass, loaded from a preset and validated.

A task declares its recipe as a dataclass deriving from :class:`Recipe`; every field has a type
and, through :func:`setting`, an optional range or set of choices and whether it may differ when
a run is resumed (``resumable``: how a run executes, not what it computes). The presets live in
``anchorformer/configs/{task}.yaml``, one section per profile (``mini``, ``full``); a preset must
give every field. :func:`load_recipe` layers the preset, the user's ``--set key=value`` overrides
and values given by their own flags or arguments, and checks each value's type and range,
naming the key and where the value came from (the file and section, the flag, or the caller's
source such as ``params.yaml``). Nothing here reads ``params.yaml``: the profile is an argument.

Nested mappings (``model_sizes``) are reached with dotted keys: ``--set model_sizes.tiny.depth=6``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from ..models.factory import check_num_anchors

__all__ = [
    "CONFIG_DIR",
    "PROFILES",
    "Recipe",
    "RecipeError",
    "TaskRecipe",
    "load_preset",
    "load_preset_with_entry",
    "load_recipe",
    "parse_override",
    "split_overrides",
    "setting",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PROFILES = ("mini", "full")

R = TypeVar("R", bound="Recipe")


class RecipeError(ValueError):
    """A recipe value of the wrong type or out of range, an unknown key or a missing one."""


def setting(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Iterable[Any] | None = None,
    resumable: bool = False,
) -> Any:
    """A recipe field: ``ge``/``gt``/``le`` bound a number, ``choices`` lists the allowed values,
    ``resumable`` marks a setting that may differ between a run and its resumption."""
    meta = {"ge": ge, "gt": gt, "le": le, "choices": tuple(choices) if choices is not None else None}
    meta["resumable"] = resumable
    return dataclasses.field(metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"null or {inner}" if len(args) < len(typing.get_args(tp)) else inner
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or raise TypeError. Integers never accept 1.5 or true."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return [_coerce(v, item) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise TypeError
        return {str(k): copy.deepcopy(v) for k, v in value.items()}
    raise TypeError


@dataclasses.dataclass
class Recipe:
    """Base of the task recipes: dict-style reads, a plain-dict form and validation."""

    task: ClassVar[str] = ""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(f"{type(self).__name__} has no key {key!r}")
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in self.keys() else default

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def resumable_keys(cls) -> set[str]:
        """Settings that may differ between a run and its resumption."""
        return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable")}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists), as stored in checkpoints and metrics."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self: R, source: str = "argument", **changes: Any) -> R:
        """A validated copy with ``changes``."""
        data = self.to_dict()
        sources = dict.fromkeys(data, "the recipe")
        for key, value in changes.items():
            if key not in data:
                raise RecipeError(f"unknown recipe key {key!r} ({source}); valid keys: {', '.join(self.keys())}")
            data[key] = value
            sources[key] = source
        return _build(type(self), data, sources)

    def check(self) -> list[str]:
        """Problems between fields (a task adds its own); each names the keys."""
        return []

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """Keys, other than the resumable ones, whose values differ from ``other`` (a stored recipe)."""
        mine = self.to_dict()
        free = self.resumable_keys()
        keys = sorted((set(mine) | set(other)) - free)
        return [f"{k}: checkpoint {other.get(k)!r} vs now {mine.get(k)!r}" for k in keys if other.get(k) != mine.get(k)]


def _build(cls: type[R], data: Mapping[str, Any], sources: Mapping[str, str]) -> R:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = sorted({sources.get(k, "?") for k in unknown})
        raise RecipeError(f"unknown recipe key(s) {unknown} ({'; '.join(where)}); valid keys: {', '.join(fields)}")
    missing = [k for k in fields if k not in data]
    if missing:
        where = sorted(set(sources.values())) or ["the recipe"]
        raise RecipeError(f"recipe lacks key(s) {missing} ({'; '.join(where)})")
    problems = []
    values = {}
    for name, f in fields.items():
        value, where = data[name], sources.get(name, "the recipe")
        try:
            value = _coerce(value, hints[name])
        except TypeError:
            problems.append(f"{name}={data[name]!r} ({where}): expected {_type_name(hints[name])}")
            continue
        problem = _check_range(value, f.metadata)
        if problem:
            problems.append(f"{name}={value!r} ({where}): expected {problem}")
            continue
        values[name] = value
    if problems:
        raise RecipeError(f"invalid {cls.task or cls.__name__} recipe: " + "; ".join(problems))
    recipe = cls(**values)
    problems = recipe.check()
    if problems:
        raise RecipeError(f"invalid {cls.task or cls.__name__} recipe: " + "; ".join(problems))
    return recipe


def _non_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds (in a list or mapping), an infinite or NaN number."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, Mapping):
        return any(_non_finite(v) for v in value.values())
    return False


def _check_range(value: Any, meta: Mapping[str, Any]) -> str | None:
    if value is None:
        return None
    if _non_finite(value):  # inf and nan pass every comparison below, then fail deep in torch
        return "finite numbers" if isinstance(value, (list, tuple, Mapping)) else "a finite number"
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return f"one of {list(choices)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
        if ge is not None and value < ge:
            return f"a number >= {ge}"
        if gt is not None and value <= gt:
            return f"a number > {gt}"
        if le is not None and value > le:
            return f"a number <= {le}"
    return None


def load_preset(task: str, profile: str, config_dir: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """The ``profile`` section of ``configs/{task}.yaml`` and a label naming it (for errors).

    Raises:
        RecipeError: an unknown profile, or a file without that section.
        FileNotFoundError: no preset file for ``task``.
    """
    if profile not in PROFILES:
        raise RecipeError(f"profile must be one of {list(PROFILES)}; got {profile!r}")
    folder = Path(config_dir) if config_dir is not None else CONFIG_DIR
    path = folder / f"{task}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.yaml"))
        raise FileNotFoundError(f"no recipe presets for task {task!r}: {path} does not exist (tasks: {have})")
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or not isinstance(data.get(profile), dict):
        sections = sorted(data) if isinstance(data, dict) else []
        raise RecipeError(f"{path}: no profile {profile!r}; sections found: {sections}")
    label = f"anchorformer/configs/{task}.yaml" if config_dir is None else str(path)
    return copy.deepcopy(data[profile]), f"{label} [{profile}]"


def split_overrides(text: str | Iterable[str] | None) -> list[str]:
    """``"a=1; b=[2, 3]"`` -> ``["a=1", "b=[2, 3]"]``: the pipeline passes several overrides in one
    parameter, separated by semicolons (a list passes through, stripped of empty items)."""
    if text is None:
        return []
    items = text.split(";") if isinstance(text, str) else list(text)
    return [s.strip() for s in items if s and s.strip()]


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value parsed as YAML)``.

    Raises:
        RecipeError: no ``=``, or a value that is not YAML (``{a:1}`` without a space included).
    """
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {item!r}: cannot parse the value as YAML ({e})") from e
    _check_flow_mapping(item, value)
    return key, value


def _check_flow_mapping(item: str, value: Any) -> None:
    """``{a:1}`` parses as ``{"a:1": None}`` in YAML: refuse it rather than pass a wrong key on."""
    if isinstance(value, dict):
        for k, v in value.items():
            if v is None and isinstance(k, str) and ":" in k:
                raise RecipeError(f"--set {item!r}: write 'name: value' with a space after the colon (got {k!r})")
            _check_flow_mapping(item, v)
    elif isinstance(value, list):
        for v in value:
            _check_flow_mapping(item, v)


def _set_dotted(data: dict[str, Any], key: str, value: Any, item: str, valid: list[str]) -> None:
    parts = key.split(".")
    if parts[0] not in valid:
        raise RecipeError(f"--set {item!r}: unknown recipe key {parts[0]!r}; valid keys: {', '.join(valid)}")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {} if node.get(part) is None else node[part]
            if not isinstance(node[part], dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a mapping")
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], sources: dict[str, str], overrides: Iterable[str], valid: list[str]) -> None:
    """Apply ``key=value`` strings to ``data`` in place, recording each key's source."""
    for item in overrides or ():
        key, value = parse_override(item)
        _set_dotted(data, key, value, item, valid)
        sources[key.split(".")[0]] = f"--set {item}"


def load_preset_with_entry(
    cls: type[Recipe], profile: str, overrides: Iterable[str], choice_key: str, choice: Any = None
) -> tuple[dict[str, Any], str]:
    """The ``profile`` preset with the entry of its ``recipes`` mapping that ``choice_key`` selects.

    The choice is the one the preset and ``overrides`` make together (``choice``, when given,
    overrides both: a flag such as ``--head``); its entry replaces the preset's values, and the
    caller applies ``overrides`` over the result (``load_recipe(..., preset=...)``).

    Returns:
        ``(preset, label)``, the label naming the entry (for errors).

    Raises:
        RecipeError: the entry is not a mapping, or holds keys that are not recipe keys.
    """
    values, label = load_preset(cls.task, profile)
    valid = cls.keys()
    first = copy.deepcopy(values)  # only to learn the choice and its entry as the user set them
    apply_overrides(first, {}, overrides, valid)
    if choice is not None:
        first[choice_key] = choice
    chosen, entries = first.get(choice_key), first.get("recipes")
    entry = entries.get(chosen) if isinstance(entries, Mapping) and isinstance(chosen, str) else None
    preset = copy.deepcopy(values)
    if not entry:
        return preset, label
    if not isinstance(entry, Mapping):
        raise RecipeError(f"recipes.{chosen}={entry!r} ({label}): expected a mapping of recipe keys")
    unknown = sorted(k for k in entry if k not in valid or k in (choice_key, "recipes"))
    if unknown:
        raise RecipeError(
            f"recipes.{chosen}: unknown recipe key(s) {unknown} ({label}); valid keys: {', '.join(valid)}"
        )
    preset.update(copy.deepcopy(dict(entry)))
    return preset, f"{label} with recipes.{chosen}"


def load_recipe(
    cls: type[R],
    profile: str,
    *,
    overrides: Iterable[str] = (),
    explicit: Mapping[str, tuple[Any, str]] | None = None,
    preset: tuple[dict[str, Any], str] | None = None,
) -> R:
    """The recipe of ``cls.task`` for ``profile``: preset, then ``overrides``, then ``explicit``.

    Args:
        cls: the task's recipe dataclass.
        profile: ``"mini"`` or ``"full"``.
        overrides: ``"key=value"`` strings (``--set``), values parsed as YAML.
        explicit: ``{key: (value, source)}`` given by their own flag or argument (``None``
            values are skipped); ``source`` names it in errors (``"--epochs"``, ``"params.yaml"``).
        preset: ``(values, label)`` to use instead of the packaged preset file.

    Raises:
        RecipeError: an unknown key, a missing one, a value of the wrong type or out of range.
    """
    values, label = preset if preset is not None else load_preset(cls.task, profile)
    data = copy.deepcopy(values)
    sources = dict.fromkeys(data, label)
    valid = cls.keys()
    apply_overrides(data, sources, overrides, valid)
    for key, (value, source) in (explicit or {}).items():
        if value is None:
            continue
        if key not in valid:
            raise RecipeError(f"unknown recipe key {key!r} ({source}); valid keys: {', '.join(valid)}")
        data[key] = value
        sources[key] = source
    return _build(cls, data, sources)


_ANCHOR_MODES = ("learned", "pooled")
_ON_BAD = ("fail", "skip")  # anchorformer.data.files.ON_BAD (not imported: the recipes stay off the data floor)
_CHECK_FILES = ("all", "val", "none")
_ATTN_IMPLS = ("auto", "reference", "triton")
_SHAPE_KEYS = ("depth", "embed_dim", "num_heads")  # a backbone's shape, in model_sizes / model_kwargs


@dataclasses.dataclass
class TaskRecipe(Recipe):
    """Settings every task has: the backbone (read by :func:`anchorformer.models.backbone_kwargs`)
    and how the run executes."""

    # --- the backbone -----------------------------------------------------------------------
    model: str = setting()  # timm name of the backbone: an AnchorFormer variant, deit_*, or any timm model
    img_size: int = setting(ge=1)  # side the ViT's position embeddings are built for
    patch_size: int | None = setting(ge=1)  # null: the model's own (16)
    model_sizes: dict[str, Any] = setting()  # per size word (tiny/small/base): ViT shape overrides (mini models)
    model_kwargs: dict[str, Any] = setting()  # more create_model arguments, applied last
    num_anchors: int | None = setting()  # M; null: the model's default (DEFAULT_NUM_ANCHORS); AnchorFormer only
    anchor_mode: str = setting(choices=_ANCHOR_MODES)  # learned (the method) | pooled (fixed anchors)
    normalize: bool = setting()  # apply Λ⁻¹ (false: the E3 ablation without it)
    per_head_anchors: bool = setting()  # one anchor set per head instead of one per layer (E3)
    attn_impl: str = setting(choices=_ATTN_IMPLS, resumable=True)  # auto | reference | triton
    drop_path: float = setting(ge=0.0, le=1.0)  # stochastic depth rate of the backbone
    # --- execution --------------------------------------------------------------------------
    device: str | None = setting(choices=(None, "cpu", "cuda"), resumable=True)  # null: CUDA when available
    threads: int | None = setting(ge=1, resumable=True)  # torch intra-op threads per process; null: default
    amp: bool = setting()  # autocast (bf16) on CUDA; on the CPU only when device is cpu and amp is set
    seed: int = setting(ge=0)
    # data-loader processes per training process: part of the recipe (not resumable), since the
    # trained weights differ with it (measured on the CPU: 0 vs 2 workers, same seed)
    num_workers: int = setting(ge=0)
    # a training file that does not decode: fail (one line naming it) | skip (logged, counted in
    # metrics.json, listed in OUT/bad_files.jsonl); resumable, so that a run stopped by a bad file
    # can go on with skip. Evaluation always fails on a bad file (its numbers must cover the split).
    on_bad: str = setting(choices=_ON_BAD, resumable=True)
    # before training, decode every file the run reads (without transforms): all (the training
    # files when a run starts afresh, the validation files at every start) | val | none. A bad
    # validation file always stops the run there; a bad training file too unless on_bad is skip.
    check_files: str = setting(choices=_CHECK_FILES, resumable=True)
    keep_checkpoints: int = setting(ge=1, resumable=True)  # per-epoch/iteration checkpoints kept
    log_every: int = setting(ge=1, resumable=True)  # steps between log lines
    # wall time between checkpoints inside an epoch (cls, det) or between checkpoint_every (seg);
    # null: off. A run also checkpoints on SIGTERM/SIGUSR1 (anchorformer.engine.preempt).
    checkpoint_minutes: float | None = setting(gt=0, resumable=True)
    lock_stale_minutes: float = setting(gt=0, resumable=True)  # a lock with an older heartbeat is taken over
    restart_on_code_change: bool = setting(resumable=True)  # pipeline (if_different=restart): restart on a code change

    def check(self) -> list[str]:
        problems = super().check()
        shapes = [(f"model_sizes.{size}", v) for size, v in (self.model_sizes or {}).items()]
        for where, kw in [*shapes, ("model_kwargs", self.model_kwargs or {})]:
            if not isinstance(kw, Mapping):
                continue
            for key in _SHAPE_KEYS:  # depth=0 would train a model without blocks, at chance
                v = kw.get(key)
                if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                    problems.append(f"{where}.{key}={v!r}: expected an integer >= 1")
        if self.num_anchors is not None:
            try:
                check_num_anchors(self.num_anchors)
            except ValueError as e:
                problems.append(str(e))
        return problems
