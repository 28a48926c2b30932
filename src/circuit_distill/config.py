"""Run configuration: one loader for every config dataclass, YAML in and out.

A config is a dataclass deriving from ``Config``: its fields are coerced to their annotated types
(``bool``, ``int``, ``float``, ``str``, ``dict``, ``list[X]``, ``X | None``) when it is built, then
``validate()`` checks the values. ``load_config(DistillConfig, path, ["lr=1e-3",
"task_options.seq_len=16"])`` reads a YAML file, applies ``key=value`` overrides (values parsed as
YAML scalars) and builds the config. An unknown key or a value of the wrong type is a ``ConfigError``
that names the key and says what to write instead. ``option(default, "help")`` gives a field its
one line of help (``config_help`` lists them for ``--help``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import ConfigError
from .files import atomic_write_text

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING):
    """A dataclass field with one line of ``help`` (``factory`` for mutable defaults)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


class Config:
    """Base of the config dataclasses: coercion and ``validate()`` on construction, dict and YAML I/O.

    ``label`` is how errors name a field (``config key 'lr'``, ``demo setting 'lr'``);
    ``override_example`` is the ``key=value`` example an error shows."""

    label: ClassVar[str] = "config key"
    override_example: ClassVar[str] = "lr=1e-3"

    def __post_init__(self) -> None:
        coerce_fields(self)
        self.validate()

    def validate(self) -> None:
        """Check the coerced values; raise ``ConfigError`` saying what to change (nothing to check here)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The config as YAML text; also written (atomically) to ``path`` if given."""
        return config_to_yaml(self, path)

    @classmethod
    def from_dict(cls, d: Mapping):
        return config_from_dict(cls, d)

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike):
        return config_from_yaml(cls, text_or_path)


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """``{field name: resolved type}`` of the dataclass ``cls`` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def config_help(cls) -> str:
    """One line per field of ``cls``: ``name (type, default): help``."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        line = f"  {f.name} ({type_name(field_types(cls)[f.name])}, default {default!r})"
        help_ = f.metadata.get("help")
        lines.append(f"{line}: {help_}" if help_ else line)
    return "\n".join(lines)


def type_name(tp) -> str:
    """``int``, ``list[int]``, ``str | None``: how a field's type reads in an error."""
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def coerce_fields(cfg) -> None:
    """Set every field of the dataclass instance ``cfg`` to its value coerced to the field's type."""
    label = getattr(cfg, "label", "config key")
    for name, tp in field_types(type(cfg)).items():
        setattr(cfg, name, coerce_value(name, getattr(cfg, name), tp, label))


def coerce_value(name: str, value, tp, label: str = "config key"):
    """``value`` as type ``tp``; ``ConfigError`` naming ``label`` ``name`` if it cannot be one."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if type(None) in args and (value is None or (isinstance(value, str)
                                                     and value.lower() in ("null", "none", "~"))):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce_value(name, value, inner[0], label)
    if typing.get_origin(tp) is list and isinstance(value, (list, tuple)):
        return [coerce_value(name, v, args[0], label) for v in value]
    ok, out = _coerce_scalar(value, tp)
    if ok:
        return out
    raise ConfigError(f"{label} {name!r} expects {type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce_scalar(value, tp) -> tuple[bool, Any]:
    """``(True, value as tp)`` or ``(False, None)``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool:
        if isinstance(value, bool):
            return True, value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return True, value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return True, bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        if isinstance(value, str):
            try:
                return True, int(value)
            except ValueError:
                pass
    elif tp is float:
        if number or isinstance(value, str):
            try:
                return True, float(value)
            except (ValueError, OverflowError):  # OverflowError: an int beyond the float range
                pass
    elif tp is str:
        if isinstance(value, str):
            return True, value
        if number:
            return True, str(value)
    elif tp is dict and isinstance(value, dict):
        return True, dict(value)
    return False, None


def config_from_dict(cls, d: Mapping):
    """An instance of the config dataclass ``cls`` from the mapping ``d``; unknown keys are a ``ConfigError``."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping of key: value, got {type(d).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    bad = [k for k in d if k not in valid]
    if bad:
        label = getattr(cls, "label", "config key")
        raise ConfigError(f"unknown {label}(s) {', '.join(map(repr, bad))}; valid keys: {', '.join(valid)}")
    return cls(**dict(d))


def config_to_yaml(cfg, path: str | os.PathLike | None = None) -> str:
    """The dataclass instance ``cfg`` as YAML text; also written (atomically) to ``path`` if given."""
    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    if path is not None:
        atomic_write_text(path, text)
    return text


def config_from_yaml(cls, text_or_path: str | os.PathLike):
    """An instance of ``cls`` from YAML text or the path of a YAML file."""
    p = Path(text_or_path)
    text = p.read_text() if ("\n" not in str(text_or_path) and p.exists()) else str(text_or_path)
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config is not valid YAML: {e}") from e
    return config_from_dict(cls, d)


def field_default(cls, name: str):
    """The default value of ``cls``'s field ``name`` (``None`` if it has none)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def apply_overrides(d: Mapping, overrides: Iterable[str], cls) -> dict:
    """A copy of ``d`` with ``"key=value"`` overrides applied (values parsed as YAML scalars); keys are
    checked against the fields of ``cls``, and a dict field takes sub-keys (``task_options.seq_len=16``),
    which change that key of the field's value (given in ``d``, else its default) and keep the others."""
    d = dict(d)
    label = getattr(cls, "label", "config key")
    valid = [f.name for f in dataclasses.fields(cls)]
    dicts = [k for k, tp in field_types(cls).items() if typing.get_origin(tp) is dict or tp is dict]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. {getattr(cls, 'override_example', 'a=1')})")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        head, *rest = key.split(".")
        if head not in valid:
            raise ConfigError(f"unknown {label} {key!r}; valid keys: {', '.join(valid)}")
        if not rest:
            d[head] = value
            continue
        if head not in dicts:
            only = f" (only {', '.join(k + '.NAME=VALUE' for k in dicts)} does)" if dicts else ""
            raise ConfigError(f"{label} {head!r} has no sub-keys{only}")
        opts = copy.deepcopy(dict(d[head] if head in d else field_default(cls, head) or {}))
        cur = opts
        for part in rest[:-1]:
            cur = cur.setdefault(part, {})
        cur[rest[-1]] = value
        d[head] = opts
    return d


def load_config(cls, path: str | os.PathLike | None = None, overrides: Iterable[str] = (), *,
                base: Mapping | None = None):
    """Build the config dataclass ``cls``: ``base`` values (e.g. from command-line flags), then the YAML
    file ``path`` (None = none), then ``overrides`` (``["lr=1e-3", ...]``); coerced and validated."""
    d: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a config must be a mapping of key: value")
        d.update(loaded)
    return config_from_dict(cls, apply_overrides(d, overrides, cls))
