"""Circuits: a set of components with scores, how they were found, and how faithful they are.

``find_circuit`` scores candidate components (single mean ablation, path patching or attribution
patching), then selects either the ``top_k`` or by iterative pruning (Haskins & Adams): starting
from all candidates, repeatedly remove the cheapest component whose removal costs less than
``threshold`` times the full model's metric, with everything already removed mean-ablated, until
no removal is that cheap. ``faithfulness`` is the metric with everything outside the circuit
mean-ablated over the metric of the full model.

"Outside" means the candidates of the same ``kind`` (``head``: other heads, MLPs left alone;
``mlp``; ``all``: heads and MLPs), so a heads-only circuit is not penalised for the MLPs every
computation needs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CircuitDistillError, ConfigError
from ..model.components import Component, parse_components
from ..tasks.base import TaskData
from .ablation import ablate
from .patching import attribution_patching, path_patching
from .progress import progress_bar
from .sweep import SweepResult, ablation_sweep
from .values import ablation_values

SEARCH_METHODS = ("ablation", "path", "attribution")
KINDS = ("head", "mlp", "all")


@dataclass
class Circuit:
    """A circuit: ``components`` (forward order), ``scores`` of every candidate (higher = more
    important; the unit depends on ``method``), the ``metric`` and search settings, the task and
    model names, and ``faithfulness`` (circuit-only metric / full metric)."""

    components: list[Component]
    scores: dict[Component, float] = field(default_factory=dict)
    metric: str = "logit_diff"
    method: str = "ablation"
    task: str = ""
    model: str = ""
    faithfulness: float | None = None
    threshold: float | None = None
    top_k: int | None = None
    kind: str = "head"
    full_metric: float | None = None
    circuit_metric: float | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.components = sorted(parse_components(self.components))
        self.scores = {Component.parse(k): float(v) for k, v in self.scores.items()}

    def __contains__(self, comp) -> bool:
        return Component.parse(comp) in self.components

    def __len__(self) -> int:
        return len(self.components)

    @property
    def heads(self) -> list[Component]:
        return [c for c in self.components if c.is_head]

    def ranked(self) -> list[tuple[Component, float]]:
        """Every scored candidate, most important first (ties in forward order)."""
        return sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0].sort_key()))

    def to_dict(self) -> dict:
        return {
            "components": [str(c) for c in self.components],
            "scores": {str(c): v for c, v in sorted(self.scores.items())},
            "metric": self.metric, "method": self.method, "task": self.task, "model": self.model,
            "faithfulness": self.faithfulness, "threshold": self.threshold, "top_k": self.top_k,
            "kind": self.kind, "full_metric": self.full_metric, "circuit_metric": self.circuit_metric,
            "seconds": self.seconds, "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Circuit:
        if "components" not in d:
            raise CircuitDistillError("not a circuit: the JSON has no 'components' list")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        path = Path(path)
        if not path.is_file():
            raise CircuitDistillError(f"circuit file {path} does not exist (write one with `circuit-distill discover`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CircuitDistillError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(data)


def _candidates(model, kind: str) -> list[Component]:
    if kind not in KINDS:
        raise CircuitDistillError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "all":
        return sorted(model.components("head") + model.components("mlp"))
    return model.components(kind)


def _infer_kind(components: list[Component]) -> str:
    kinds = {c.kind for c in components}
    return "all" if kinds == {"head", "mlp"} else ("mlp" if kinds == {"mlp"} else "head")


def faithfulness(model, task_data: TaskData, components: Iterable[Component | str], metric: str = "logit_diff", *,
                 kind: str | None = None, method: str = "mean", per_position: bool = True,
                 batch_size: int = 64) -> float:
    """``metric`` with every candidate of ``kind`` outside ``components`` ablated (``method``, default
    mean over the reference set), divided by the full model's ``metric``. ``kind`` defaults to the
    kinds in ``components``."""
    comps = parse_components(components)
    kind = kind or _infer_kind(comps)
    outside = [c for c in _candidates(model, kind) if c not in set(comps)]
    full = ablate(model, task_data, [], metrics=(metric,), batch_size=batch_size)[metric]
    _check_full(full, metric)
    part = ablate(model, task_data, outside, method=method, per_position=per_position, metrics=(metric,),
                  batch_size=batch_size)[metric]
    return part / full


def _check_full(full: float, metric: str) -> None:
    if not abs(full) > 1e-9 or full != full:
        raise CircuitDistillError(
            f"the full model's {metric} is {full:.3g}: circuit search and faithfulness are relative to it, so "
            "the model must perform the task; check the model/task pair or use another metric")


def _path_scores(model, task_data: TaskData, cands: list[Component], threshold: float, metric: str,
                 batch_size: int, progress) -> tuple[dict[Component, float], list[Component]]:
    """Backward path-patching search: a layer's candidates are scored by their direct effect and by
    their effect through the circuit members found in later layers; those above ``threshold`` join."""
    scores: dict[Component, float] = {}
    members: list[Component] = []
    for layer in sorted({c.layer for c in cands}, reverse=True):
        here = [c for c in cands if c.layer == layer]
        direct = path_patching(model, task_data, here, None, metric=metric, batch_size=batch_size,
                               progress=progress).scores()
        best = dict(direct)
        later = [m for m in members if m.layer > layer]
        if later:
            via = path_patching(model, task_data, here, later, metric=metric, batch_size=batch_size,
                                progress=progress).scores()
            best = {c: max(direct[c], via[c]) for c in here}
        scores.update(best)
        members += [c for c in here if best[c] >= threshold]
    return scores, sorted(members)


def _sweep_scores(sweep: SweepResult, cands: list[Component], metric: str, ablation: str, per_position: bool,
                  n: int) -> dict[Component, float]:
    """Each candidate's single-ablation effect on ``metric`` (forward order), from ``sweep``; a
    ``ConfigError`` naming what to pass if the sweep was not run with the search's settings."""
    fix = (f"pass an ablation_sweep of every candidate on the same {n} prompts with method={ablation!r}, "
           f"per_position={per_position}, position='last' and {metric!r} among its metrics, or sweep=None")
    settings = (sweep.method, sweep.per_position, sweep.position)
    if settings != (ablation, per_position, "last") or sweep.n_examples not in (0, n):
        raise ConfigError(f"the sweep was run with method={sweep.method!r}, per_position={sweep.per_position}, "
                          f"position={sweep.position!r} on {sweep.n_examples} prompts: {fix}")
    if metric not in sweep.clean:
        raise ConfigError(f"the sweep has no metric {metric!r} (it has {', '.join(sweep.clean)}): {fix}")
    missing = [c for c in cands if c not in sweep.ablated]
    if missing:
        raise ConfigError(f"the sweep lacks {len(missing)} candidate(s) ({', '.join(map(str, missing[:4]))}"
                          f"{', ...' if len(missing) > 4 else ''}): {fix}")
    effect = sweep.effect(metric)
    return {c: effect[c] for c in sorted(cands)}


def find_circuit(model, task_data: TaskData, *, method: str = "ablation", kind: str = "head",
                 threshold: float = 0.2, top_k: int | None = None, metric: str = "logit_diff",
                 ablation: str = "mean", per_position: bool = True, batch_size: int = 64,
                 progress: bool | None = None, sweep: SweepResult | None = None) -> Circuit:
    """Find the circuit of ``task_data`` in ``model``.

    Scores: ``ablation`` = full metric minus metric with the candidate ``ablation``-ablated alone;
    ``attribution`` = minus the attribution-patching estimate of patching the corrupted activation
    into the clean run; ``path`` = backward path-patching search (normalised by the clean-corrupted
    gap; members are those scoring >= ``threshold``). Selection: the ``top_k`` highest scores if
    given, else (``ablation``/``attribution``) iterative pruning with cost threshold ``threshold``
    times the full metric (see the module docstring).

    ``sweep``: for ``method="ablation"``, a ``SweepResult`` already run on the same model and prompts
    (e.g. the all-head mean-ablation sweep of a comparison) covering every candidate, with ``metric``
    among its metrics and this ``ablation`` / ``per_position``; it is used instead of sweeping again.
    """
    if method not in SEARCH_METHODS:
        raise CircuitDistillError(f"unknown search method {method!r}; use one of {', '.join(SEARCH_METHODS)}")
    if top_k is not None and top_k < 1:
        raise CircuitDistillError(f"top_k must be >= 1, got {top_k}")
    if not 0 <= threshold < 1:
        raise CircuitDistillError(f"threshold is a fraction of the full metric in [0, 1), got {threshold}")
    if sweep is not None and method != "ablation":
        raise ConfigError(f"sweep= is used by method='ablation' only (got method={method!r}); pass sweep=None")
    t0 = time.perf_counter()
    cands = _candidates(model, kind)
    full = ablate(model, task_data, [], metrics=(metric,), batch_size=batch_size)[metric]
    _check_full(full, metric)
    values = ablation_values(model, task_data, cands, method=ablation, per_position=per_position,
                             batch_size=batch_size)
    members: list[Component] | None = None
    if method == "ablation":
        if sweep is None:
            sweep = ablation_sweep(model, task_data, cands, method=ablation, per_position=per_position,
                                   metrics=(metric,), batch_size=batch_size, progress=progress, values=values)
        scores = _sweep_scores(sweep, cands, metric, ablation, per_position, len(task_data))
    elif method == "attribution":
        attr = attribution_patching(model, task_data, cands, metric=metric, batch_size=batch_size)
        scores = {c: -v for c, v in attr.scores.items()}
    else:
        scores, members = _path_scores(model, task_data, cands, threshold, metric, batch_size, progress)

    def circuit_metric(circ: list[Component]) -> float:
        keep = set(circ)
        return ablate(model, task_data, [c for c in cands if c not in keep], values=values, metrics=(metric,),
                      batch_size=batch_size)[metric]

    ranked = sorted(scores, key=lambda c: (-scores[c], c.sort_key()))
    extra: dict = {}
    if top_k is not None:
        members = ranked[:top_k]
    elif members is None:
        members, removed = _prune(cands, ranked, full, threshold, circuit_metric, progress)
        extra["pruning_order"] = [str(c) for c in removed]
    kept = circuit_metric(members)
    return Circuit(members, scores, metric, method, task_data.name, getattr(model, "name", ""), kept / full,
                   threshold if top_k is None else None, top_k, kind, full, kept, time.perf_counter() - t0,
                   extra)


def _prune(cands, ranked, full, threshold, circuit_metric, progress) -> tuple[list[Component], list[Component]]:
    """Greedy passes from the least important candidate up: drop a component if that costs less than
    ``threshold * |full|`` given what is already dropped; stop when a pass drops nothing."""
    circuit = list(cands)
    current = full
    removed: list[Component] = []
    budget = threshold * abs(full)
    changed = True
    while changed and circuit:
        changed = False
        order = [c for c in reversed(ranked) if c in circuit]
        with progress_bar(progress, len(order), "pruning") as bar:
            for c in order:
                trial = [x for x in circuit if x != c]
                m = circuit_metric(trial)
                if current - m < budget:
                    circuit, current = trial, m
                    removed.append(c)
                    changed = True
                bar.update(1)
    return sorted(circuit), removed
