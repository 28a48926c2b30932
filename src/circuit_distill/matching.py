"""Match student circuit components to teacher circuit components: ``ComponentMap`` and ``match``.

Methods (``match(..., method=...)``):

- ``ablation`` (the paper's rule): ``d(h_s, h_t) = |dP_s(h_s) - dP_t(h_t)|`` where ``dP`` is a head's
  ablation effect; every student circuit head goes to the teacher circuit head with the smallest
  ``d``. Many-to-one is allowed; ties go to the teacher head earliest in forward order.
- ``hungarian``: one-to-one assignment minimising the total ``d`` (``scipy.optimize.linear_sum_assignment``).
  With more student than teacher heads, each teacher head is offered ``ceil(n_s / n_t)`` times, so
  every student head is matched and no teacher head is used more than ``ceil(n_s / n_t)`` times
  (a balanced assignment; strictly one-to-one whenever ``n_s <= n_t``).
- ``cka``: by activation similarity; each student head goes to the teacher head of highest linear
  CKA over the same inputs (``distance = 1 - CKA``); many-to-one, ties to the earliest teacher head.
- ``random``: the control rows; each student head gets a teacher circuit head drawn uniformly (with
  replacement) from a generator seeded by ``seed``. The distance is ``|dP_s - dP_t|`` when effects
  are available, else NaN.

``normalize=True`` (``ablation``, ``hungarian``, and the ``random`` distances): divide each model's
effects by the largest ``|dP|`` in its own circuit before taking distances, so a head is matched by its
share of its model's effect rather than by the raw size. A teacher that answers with probability
near 1 has large ``dP`` and a weak student small ones; unnormalised, every student head then lands on
the teacher head with the smallest effect. ``info["normalize"]`` records the scales used.

``ComponentMap.quality()`` reports how degenerate a map is (distinct teacher heads, the largest
reuse of one teacher head, ties): ablation matching with a weak student tends to send every
student head to the same near-zero-effect teacher head.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError
from .files import atomic_write_json
from .model.components import Component

METHODS = ("ablation", "hungarian", "cka", "random")
_TIE_TOL = 1e-12


@dataclass
class ComponentMap:
    """Pairs ``(student component, teacher component)`` with the distance of each pair.

    ``distances[i]`` is the matching distance of ``pairs[i]`` (``|dP_s - dP_t|`` for ablation,
    hungarian and random; ``1 - CKA`` for cka; NaN when unknown). ``info`` holds extra facts from
    the matcher (tie count, unmatched heads, the effects used).
    """

    pairs: list[tuple[Component, Component]]
    distances: list[float] = field(default_factory=list)
    method: str = "ablation"
    seed: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pairs = [(Component.parse(s), Component.parse(t)) for s, t in self.pairs]
        if not self.distances:
            self.distances = [math.nan] * len(self.pairs)
        if len(self.distances) != len(self.pairs):
            raise ConfigError(f"ComponentMap: {len(self.pairs)} pairs but {len(self.distances)} distances")
        self.distances = [float(d) for d in self.distances]

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    @property
    def student_components(self) -> list[Component]:
        """Student side of every pair, in pair order."""
        return [s for s, _ in self.pairs]

    @property
    def teacher_components(self) -> list[Component]:
        """Teacher side of every pair, in pair order (repeats when many-to-one)."""
        return [t for _, t in self.pairs]

    def teacher_for(self, student: Component | str) -> Component:
        """The teacher component paired with ``student``."""
        s = Component.parse(student)
        for a, b in self.pairs:
            if a == s:
                return b
        raise ConfigError(f"{s} is not in this component map; its student components are "
                          f"{', '.join(map(str, self.student_components))}")

    def quality(self) -> dict:
        """Matching-quality summary: sizes, distinct teacher heads used, reuse and distances."""
        uses = Counter(self.teacher_components)
        finite = [d for d in self.distances if math.isfinite(d)]
        n = len(self.pairs)
        q = {
            "n_pairs": n,
            "n_student": len(set(self.student_components)),
            "n_teacher_distinct": len(uses),
            "max_teacher_reuse": max(uses.values()) if uses else 0,
            "most_used_teacher": str(uses.most_common(1)[0][0]) if uses else None,
            "mean_distance": sum(finite) / len(finite) if finite else None,
            "max_distance": max(finite) if finite else None,
            "degenerate": n > 1 and len(uses) == 1,
            "teacher_uses": {str(t): k for t, k in sorted(uses.items())},
        }
        for k in ("n_teacher_circuit", "n_ties", "unmatched_students"):
            if k in self.info:
                q[k] = self.info[k]
        return q

    # ---- io -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "seed": self.seed,
            "pairs": [
                {"student": str(s), "teacher": str(t), "distance": d if math.isfinite(d) else None}
                for (s, t), d in zip(self.pairs, self.distances)
            ],
            "quality": self.quality(),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ComponentMap:
        """Inverse of ``to_dict``; also accepts ``{"pairs": [["L0.H1", "L3.H2"], ...]}`` and ``{"L0.H1": "L3.H2"}``."""
        if "pairs" not in d:
            try:
                pairs = [(Component.parse(s), Component.parse(t)) for s, t in d.items()]
            except Exception as e:
                raise ConfigError("a component map needs a 'pairs' list or a {student: teacher} mapping") from e
            return cls(pairs)
        pairs, dists = [], []
        for p in d["pairs"]:
            if isinstance(p, Mapping):
                pairs.append((p["student"], p["teacher"]))
                dv = p.get("distance")
            else:
                pairs.append((p[0], p[1]))
                dv = p[2] if len(p) > 2 else None
            dists.append(math.nan if dv is None else float(dv))
        return cls(pairs, dists, str(d.get("method", "unknown")), int(d.get("seed", 0)), dict(d.get("info", {})))

    def to_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ComponentMap:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"component map {path} does not exist; write one with `circuit-distill match`") from e
        return cls.from_dict(data)


# ---- matching -----------------------------------------------------------------------------------

def _components(circuit) -> list[Component]:
    """Components of a circuit: a list of Components/names, or an object with ``.components``."""
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


def _effects(effects: Mapping | None) -> dict[Component, float]:
    return {} if effects is None else {Component.parse(k): float(v) for k, v in effects.items()}


def _need(effects: dict[Component, float], comps: list[Component], side: str) -> None:
    missing = [str(c) for c in comps if c not in effects]
    if missing:
        raise ConfigError(
            f"no ablation effect for {side} circuit component(s) {', '.join(missing)}; run the ablation "
            f"sweep over every {side} circuit head (or pass a circuit that only uses swept heads)"
        )


def _argmin_first(values: list[float]) -> tuple[int, bool]:
    """Index of the smallest value (the first one within a tolerance) and whether it was tied."""
    best = min(values)
    tied = [i for i, v in enumerate(values) if abs(v - best) <= _TIE_TOL]
    return tied[0], len(tied) > 1


def match(teacher_effects: Mapping[Component, float] | None, student_effects: Mapping[Component, float] | None,
          teacher_circuit, student_circuit, method: str = "ablation", seed: int = 0, *,
          teacher_acts: Mapping[Component, torch.Tensor] | None = None,
          student_acts: Mapping[Component, torch.Tensor] | None = None,
          debiased: bool = False, normalize: bool = False) -> ComponentMap:
    """Pair every student circuit component with a teacher circuit component (see the module docstring).

    ``*_effects``: ablation effects ``dP`` per component (keys may be names like ``"L1.H2"``);
    ``*_circuit``: a list of components/names or an object with ``.components``; ``*_acts``
    (``cka`` only): ``{component: Tensor[m, d]}`` with rows aligned over the same ``m`` inputs in
    both models. ``normalize``: compare effects as fractions of each model's largest ``|dP|`` over its
    circuit. Pairs come out in student forward order. Raises ``ConfigError`` on unknown methods,
    empty circuits or missing effects/activations.
    """
    method = str(method).lower()
    if method not in METHODS:
        raise ConfigError(f"unknown matching method {method!r}; choose one of {', '.join(METHODS)}")
    tc, sc = _components(teacher_circuit), _components(student_circuit)
    if not tc or not sc:
        raise ConfigError(
            f"matching needs non-empty circuits, got {len(sc)} student and {len(tc)} teacher components; "
            "discover the circuits first or pass a head list"
        )
    te, se = _effects(teacher_effects), _effects(student_effects)
    info: dict = {"n_teacher_circuit": len(tc), "n_student_circuit": len(sc)}

    if method in ("ablation", "hungarian"):
        _need(te, tc, "teacher")
        _need(se, sc, "student")
    have_effects = all(c in te for c in tc) and all(c in se for c in sc)
    if normalize:
        if method == "cka" or not have_effects:
            raise ConfigError("normalize=True rescales ablation effects: it needs both models' effects and "
                              "method ablation, hungarian or random (not cka)")
        scale = {"teacher": max(abs(te[t]) for t in tc), "student": max(abs(se[c]) for c in sc)}
        if min(scale.values()) <= 0:
            raise ConfigError(f"normalize=True needs a non-zero effect in each circuit; largest |dP|: {scale}")
        te = {t: te[t] / scale["teacher"] for t in tc}
        se = {c: se[c] / scale["student"] for c in sc}
        info["normalize"] = scale
    dist = [[abs(se[s] - te[t]) for t in tc] for s in sc] if have_effects else None

    pairs: list[tuple[Component, Component]] = []
    dists: list[float] = []
    if method == "ablation":
        ties = 0
        for i, s in enumerate(sc):
            j, tied = _argmin_first(dist[i])
            ties += tied
            pairs.append((s, tc[j]))
            dists.append(dist[i][j])
        info["n_ties"] = ties
    elif method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        copies = math.ceil(len(sc) / len(tc))
        cost = [[row[j % len(tc)] for j in range(copies * len(tc))] for row in dist]
        rows, cols = linear_sum_assignment(cost)
        chosen = dict(zip(rows.tolist(), cols.tolist()))
        for i, s in enumerate(sc):
            j = chosen[i] % len(tc)
            pairs.append((s, tc[j]))
            dists.append(dist[i][j])
        info["max_uses_per_teacher"] = copies
    elif method == "cka":
        if teacher_acts is None or student_acts is None:
            raise ConfigError("method 'cka' needs teacher_acts and student_acts: {component: Tensor[m, d]} "
                              "captured on the same inputs in both models")
        from .similarity import cka_matrix

        ta, sa = {Component.parse(k): v for k, v in teacher_acts.items()}, {Component.parse(k): v for k, v in student_acts.items()}
        for side, acts, comps in (("teacher", ta, tc), ("student", sa, sc)):
            missing = [str(c) for c in comps if c not in acts]
            if missing:
                raise ConfigError(f"no {side} activations for {', '.join(missing)}; capture every circuit head")
        sim = cka_matrix([sa[s] for s in sc], [ta[t] for t in tc], debiased=debiased)
        ties = 0
        for i, s in enumerate(sc):
            j, tied = _argmin_first([-float(v) for v in sim[i]])
            ties += tied
            pairs.append((s, tc[j]))
            dists.append(1.0 - float(sim[i, j]))
        info["n_ties"] = ties
        if have_effects:
            info["effect_distance"] = [dist[sc.index(s)][tc.index(t)] for s, t in pairs]
    else:  # random
        rng = random.Random(seed)
        for i, s in enumerate(sc):
            j = rng.randrange(len(tc))
            pairs.append((s, tc[j]))
            dists.append(dist[i][j] if dist is not None else math.nan)
    return ComponentMap(pairs, dists, method, int(seed), info)


# ---- liberal JSON readers (effects and circuits from the discovery stage or by hand) -------------

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
        return _components(obj)
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
    """Activations ``{component: Tensor[m, d]}`` from a ``.safetensors`` or ``torch.save`` file keyed by names."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"activations file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(p))
    else:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{p}: expected a mapping of component names to tensors [m, d]")
    return {Component.parse(k): v for k, v in raw.items()}


def student_teacher_pairs(cmap: ComponentMap | Iterable[tuple]) -> list[tuple[Component, Component]]:
    """The pairs of a ``ComponentMap`` (or any iterable of pairs) as Components."""
    return [(Component.parse(s), Component.parse(t)) for s, t in (cmap.pairs if isinstance(cmap, ComponentMap) else cmap)]
