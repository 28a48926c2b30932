"""Liberal readers of what the matcher consumes: ablation effects and circuits from the discovery
stage's JSON (or written by hand), and activation files for the ``cka`` matcher."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ConfigError
from ..model.components import Component


def circuit_components(circuit) -> list[Component]:
    """Components of a circuit, sorted, without repeats: a list of Components/names (or of
    ``{"component": ...}`` records), a ``{"components": [...]}`` or ``{component: score}`` mapping, or an
    object with ``.components`` (a ``Circuit``)."""
    if circuit is None:
        return []
    if hasattr(circuit, "components") and not isinstance(circuit, (str, Mapping)):
        circuit = circuit.components
        if callable(circuit):
            circuit = circuit()
    if isinstance(circuit, Mapping):
        circuit = circuit.get("components", list(circuit))
    if isinstance(circuit, (str, Component)):
        circuit = [circuit]
    out: list[Component] = []
    for c in circuit:
        if isinstance(c, Mapping):
            c = c.get("component", c.get("name"))
        c = Component.parse(c)
        if c not in out:
            out.append(c)
    return sorted(out)


DEFAULT_METRIC = "answer_prob"  # the discovery sweep's default performance measure
_VALUE_KEYS = ("effect", "delta", "dP", "dp", "value", "score", "mean")
_LIST_KEYS = ("effects", "results", "rows", "scores", "components", "heads")


def _is_component(k) -> bool:
    try:
        Component.parse(k)
        return True
    except Exception:
        return False


def _pick_value(v, metric: str | None, where: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, Mapping):
        for key in ((metric,) if metric else ()) + _VALUE_KEYS:
            if key and key in v and isinstance(v[key], (int, float, Mapping)):
                return _pick_value(v[key], metric, where)
        nums = [x for x in v.values() if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if len(nums) == 1:
            return float(nums[0])
        raise ConfigError(f"{where}: cannot tell which value is the effect in {dict(v)}; pass metric=<key>")
    raise ConfigError(f"{where}: effect {v!r} is not a number")


def effects_from_obj(obj, metric: str | None = None, where: str = "effects") -> dict[Component, float]:
    """Read ``{component: dP}`` from the shapes the discovery stage or a user may write.

    Accepted: a ``SweepResult.to_dict()`` (``{"clean": {metric: P}, "ablated": {comp: {metric: P_abl}}}``:
    ``dP = clean - ablated`` for ``metric``, default ``answer_prob``); ``{"L0.H1": 0.3, ...}``; ``{"L0.H1": {"p_correct": 0.3, "accuracy": 0.1}}`` (pick
    ``metric``); ``{"effects": ...}`` / ``{"<metric>": {...}}`` wrappers; lists of records
    ``[{"component": "L0.H1", "effect": 0.3}, ...]`` (also under ``results``/``rows``/``scores``).
    """
    if isinstance(obj, Mapping):
        if isinstance(obj.get("clean"), Mapping) and isinstance(obj.get("ablated"), Mapping):
            return _effects_from_sweep(obj, metric, where)
        if obj and all(_is_component(k) for k in obj):
            return {Component.parse(k): _pick_value(v, metric, where) for k, v in obj.items()}
        if metric and metric in obj and isinstance(obj[metric], (Mapping, list)):
            return effects_from_obj(obj[metric], metric, where)
        for key in _LIST_KEYS:
            if key in obj and isinstance(obj[key], (Mapping, list)) and obj[key]:
                try:
                    return effects_from_obj(obj[key], metric, where)
                except ConfigError:
                    continue
        for key in ("effect", "effects_by_metric"):
            if key in obj and isinstance(obj[key], Mapping):
                return effects_from_obj(obj[key], metric, where)
    elif isinstance(obj, list) and obj and all(isinstance(r, Mapping) for r in obj):
        out: dict[Component, float] = {}
        for r in obj:
            name = r.get("component", r.get("name", r.get("head")))
            if name is None:
                raise ConfigError(f"{where}: record {r} has no 'component' key")
            out[Component.parse(name)] = _pick_value({k: v for k, v in r.items() if k not in ("component", "name", "head")},
                                                     metric, where)
        return out
    raise ConfigError(
        f"{where}: unrecognised effects format. Write a JSON object {{\"L0.H1\": 0.12, ...}} (ablation effect "
        "dP per component), or a list of {\"component\": ..., \"effect\": ...} records"
    )


def _effects_from_sweep(obj: Mapping, metric: str | None, where: str) -> dict[Component, float]:
    """``dP = clean[metric] - ablated[comp][metric]`` from a ``SweepResult.to_dict()``."""
    clean = obj["clean"]
    if metric is None:
        metric = DEFAULT_METRIC if DEFAULT_METRIC in clean else (next(iter(clean)) if len(clean) == 1 else None)
    if metric is None or metric not in clean:
        raise ConfigError(f"{where}: choose the effect metric (--metric / metric=) among {', '.join(clean)}")
    out = {}
    for k, v in obj["ablated"].items():
        if metric not in v:
            raise ConfigError(f"{where}: component {k} has no {metric!r} value")
        out[Component.parse(k)] = float(clean[metric]) - float(v[metric])
    return out


def circuit_from_obj(obj, where: str = "circuit") -> list[Component]:
    """Read a circuit: ``{"components": ["L1.H2", ...]}``, a list of names, or a ``{component: score}`` mapping."""
    try:
        if isinstance(obj, Mapping) and "components" not in obj and not all(_is_component(k) for k in obj):
            for key in ("circuit", "heads"):
                if key in obj:
                    return circuit_from_obj(obj[key], where)
        return circuit_components(obj)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"{where}: unrecognised circuit format ({e}). Write {{\"components\": [\"L1.H2\", ...]}} or a JSON list "
            "of component names"
        ) from e


def _read_json(path: str | os.PathLike, what: str):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{what} file {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} file {path} is not valid JSON: {e}") from e


def load_effects(path: str | os.PathLike, metric: str | None = None) -> dict[Component, float]:
    """``effects_from_obj`` of a JSON file."""
    return effects_from_obj(_read_json(path, "effects"), metric, where=str(path))


def load_circuit(path: str | os.PathLike) -> list[Component]:
    """``circuit_from_obj`` of a JSON file."""
    return circuit_from_obj(_read_json(path, "circuit"), where=str(path))


def load_acts(path: str | os.PathLike) -> dict[Component, torch.Tensor]:
    """Activations ``{component: Tensor[rows, d]}`` from a ``.safetensors`` or ``torch.save`` file keyed by names."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"activations file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(p))
    else:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{p}: expected a mapping of component names to tensors [rows, d]")
    return {Component.parse(k): v for k, v in raw.items()}
