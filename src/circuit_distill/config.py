"""Run configuration: dataclasses that load from and dump to YAML.

``load_config(path, overrides=["lr=1e-3", "task_options.seq_len=16"])`` reads a YAML file, applies
``key=value`` overrides (values parsed as YAML scalars) and type-checks every field. An unknown key
is a ``ConfigError`` naming the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .files import atomic_write_text

POSITIONS_HELP = "'all' (every non-padding token), 'last', or the name of a task position"


@dataclass
class DistillConfig:
    """Everything one distillation run needs (see METHOD.md §1, §4)."""

    teacher: str | None = None
    student: str | None = None
    dtype: str = "float32"  # weights of both models as loaded: float32 | bfloat16 | float16
    task: str | None = None
    task_options: dict = field(default_factory=dict)
    n_train: int = 512
    n_eval: int = 256
    seed: int = 0
    objective: str = "ce+align_cka"
    lam: float = 1.0
    temperature: float = 1.0
    positions: str = "all"
    debiased: bool = False
    labels: str = "teacher"  # "teacher" (teacher argmax) | "gold"
    matching: str = "ablation"
    component_map: str | None = None
    circuit_size: int = 8
    trainable: str = "matched_heads"
    train_kv: bool = False
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    mixed_precision: str = "no"
    eval_every: int = 50
    eval_batch_size: int = 128
    checkpoint_every: int = 0
    out_dir: str | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Coerce and check values; raise ``ConfigError`` saying what to change."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.type))
        if self.labels not in ("teacher", "gold"):
            raise ConfigError(f"labels must be 'teacher' (teacher argmax) or 'gold', got {self.labels!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        for k in ("steps", "batch_size", "grad_accum", "n_train", "n_eval"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("warmup", "eval_every", "checkpoint_every"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0 (0 = off), got {getattr(self, k)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not self.positions:
            raise ConfigError(f"positions must be {POSITIONS_HELP}")
        from .distill.objectives import get_objective

        self.objective = get_objective(self.objective).name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: typing.Mapping) -> DistillConfig:
        if not isinstance(d, typing.Mapping):
            raise ConfigError(f"a config must be a mapping of key: value, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        bad = [k for k in d if k not in valid]
        if bad:
            raise ConfigError(f"unknown config key(s) {', '.join(map(repr, bad))}; valid keys: {', '.join(valid)}")
        return cls(**dict(d))

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The config as YAML text; also written (atomically) to ``path`` if given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike) -> DistillConfig:
        p = Path(text_or_path)
        text = p.read_text() if ("\n" not in str(text_or_path) and p.exists()) else str(text_or_path)
        try:
            d = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config is not valid YAML: {e}") from e
        return cls.from_dict(d)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value, tp):
    """``value`` as type ``tp`` (a type or a string annotation of this module)."""
    if isinstance(tp, str):
        tp = {"str | None": str | None, "int": int, "float": float, "bool": bool, "str": str, "dict": dict}[tp]
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"config key {name!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def apply_overrides(d: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``"a.b=c"`` overrides to the mapping ``d`` (values parsed as YAML scalars)."""
    d = dict(d)
    valid = [f.name for f in dataclasses.fields(DistillConfig)]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. lr=1e-3 or task_options.seq_len=16)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        head, *rest = key.split(".")
        if head not in valid:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        if rest:
            if head != "task_options":
                raise ConfigError(f"config key {head!r} has no sub-keys (only task_options.NAME=VALUE does)")
            opts = dict(d.get(head) or {})
            cur = opts
            for part in rest[:-1]:
                cur = cur.setdefault(part, {})
            cur[rest[-1]] = value
            d[head] = opts
        else:
            d[head] = value
    return d


def load_config(path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()) -> DistillConfig:
    """Read ``path`` (YAML; None = defaults), apply ``overrides`` (``["lr=1e-3", ...]``) and validate."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: a config must be a mapping of key: value")
    return DistillConfig.from_dict(apply_overrides(d, overrides))
