"""``match``: pair every student circuit component with a teacher circuit component, through a table of
small matchers (``MATCHERS``).

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

Adding a matcher: a function ``MatchProblem -> (teacher index per student, distance per student)``
and one ``Matcher`` entry in ``MATCHERS``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..model.components import Component
from ..similarity import cka_matrix
from .io import circuit_components
from .map import ComponentMap

_TIE_TOL = 1e-12


@dataclass
class MatchProblem:
    """What a matcher sees.

    ``student`` / ``teacher``: the circuits' components (sorted, forward order); ``distance[i][j]``:
    ``|dP_s - dP_t|`` of ``student[i]`` and ``teacher[j]`` (after ``normalize``), None unless both
    models' effects cover their circuits; ``info``: the map's ``info`` (a matcher adds its own facts);
    ``*_acts``: ``{component: Tensor[rows, d]}`` on the same inputs, row for row (``cka``).
    """

    student: list[Component]
    teacher: list[Component]
    distance: list[list[float]] | None
    info: dict
    seed: int = 0
    teacher_acts: Mapping | None = None
    student_acts: Mapping | None = None
    debiased: bool = False


@dataclass(frozen=True)
class Matcher:
    """One matching method: ``run(problem) -> (teacher index per student, distance per student)``;
    ``needs_effects``: both models' ablation effects are required; ``normalizable``: accepts
    ``normalize=True`` (effects rescaled per model)."""

    run: Callable[[MatchProblem], tuple[list[int], list[float]]]
    needs_effects: bool
    normalizable: bool


def _argmin_first(values: list[float]) -> tuple[int, bool]:
    """Index of the smallest value (the first one within a tolerance) and whether it was tied."""
    best = min(values)
    tied = [i for i, v in enumerate(values) if abs(v - best) <= _TIE_TOL]
    return tied[0], len(tied) > 1


def _nearest(costs: list[list[float]], info: dict) -> list[int]:
    """Per row, the column of smallest cost (ties to the first); counts tied rows in ``info["n_ties"]``."""
    chosen, ties = [], 0
    for row in costs:
        j, tied = _argmin_first(row)
        ties += tied
        chosen.append(j)
    info["n_ties"] = ties
    return chosen


def _ablation(p: MatchProblem) -> tuple[list[int], list[float]]:
    js = _nearest(p.distance, p.info)
    return js, [p.distance[i][j] for i, j in enumerate(js)]


def _hungarian(p: MatchProblem) -> tuple[list[int], list[float]]:
    from scipy.optimize import linear_sum_assignment

    n_t = len(p.teacher)
    copies = math.ceil(len(p.student) / n_t)
    cost = [[row[j % n_t] for j in range(copies * n_t)] for row in p.distance]
    rows, cols = linear_sum_assignment(cost)
    chosen = dict(zip(rows.tolist(), cols.tolist()))
    js = [chosen[i] % n_t for i in range(len(p.student))]
    p.info["max_uses_per_teacher"] = copies
    return js, [p.distance[i][j] for i, j in enumerate(js)]


def _cka(p: MatchProblem) -> tuple[list[int], list[float]]:
    if p.teacher_acts is None or p.student_acts is None:
        raise ConfigError("method 'cka' needs teacher_acts and student_acts: {component: Tensor[rows, d]} "
                          "captured on the same inputs in both models")
    ta = {Component.parse(k): v for k, v in p.teacher_acts.items()}
    sa = {Component.parse(k): v for k, v in p.student_acts.items()}
    for side, acts, comps in (("teacher", ta, p.teacher), ("student", sa, p.student)):
        missing = [str(c) for c in comps if c not in acts]
        if missing:
            raise ConfigError(f"no {side} activations for {', '.join(missing)}; capture every circuit head")
    sim = cka_matrix([sa[s] for s in p.student], [ta[t] for t in p.teacher], debiased=p.debiased)
    js = _nearest([[-float(v) for v in sim[i]] for i in range(len(p.student))], p.info)
    if p.distance is not None:
        p.info["effect_distance"] = [p.distance[i][j] for i, j in enumerate(js)]
    return js, [1.0 - float(sim[i, j]) for i, j in enumerate(js)]


def _random(p: MatchProblem) -> tuple[list[int], list[float]]:
    rng = random.Random(p.seed)
    js = [rng.randrange(len(p.teacher)) for _ in p.student]
    return js, [p.distance[i][j] if p.distance is not None else math.nan for i, j in enumerate(js)]


MATCHERS: dict[str, Matcher] = {
    "ablation": Matcher(_ablation, needs_effects=True, normalizable=True),
    "hungarian": Matcher(_hungarian, needs_effects=True, normalizable=True),
    "cka": Matcher(_cka, needs_effects=False, normalizable=False),
    "random": Matcher(_random, needs_effects=False, normalizable=True),
}
METHODS = tuple(MATCHERS)


def _effects(effects: Mapping | None) -> dict[Component, float]:
    return {} if effects is None else {Component.parse(k): float(v) for k, v in effects.items()}


def _need(effects: dict[Component, float], comps: list[Component], side: str) -> None:
    missing = [str(c) for c in comps if c not in effects]
    if missing:
        raise ConfigError(
            f"no ablation effect for {side} circuit component(s) {', '.join(missing)}; run the ablation "
            f"sweep over every {side} circuit head (or pass a circuit that only uses swept heads)"
        )


def _normalized(te: dict, se: dict, tc: list[Component], sc: list[Component], info: dict) -> tuple[dict, dict]:
    """Each model's effects over its circuit divided by the circuit's largest ``|dP|`` (recorded in ``info``)."""
    scale = {"teacher": max(abs(te[t]) for t in tc), "student": max(abs(se[c]) for c in sc)}
    if min(scale.values()) <= 0:
        raise ConfigError(f"normalize=True needs a non-zero effect in each circuit; largest |dP|: {scale}")
    info["normalize"] = scale
    return {t: te[t] / scale["teacher"] for t in tc}, {c: se[c] / scale["student"] for c in sc}


def match(teacher_effects: Mapping[Component, float] | None, student_effects: Mapping[Component, float] | None,
          teacher_circuit, student_circuit, method: str = "ablation", seed: int = 0, *,
          teacher_acts: Mapping[Component, torch.Tensor] | None = None,
          student_acts: Mapping[Component, torch.Tensor] | None = None,
          debiased: bool = False, normalize: bool = False) -> ComponentMap:
    """Pair every student circuit component with a teacher circuit component (see the module docstring).

    ``*_effects``: ablation effects ``dP`` per component (keys may be names like ``"L1.H2"``);
    ``*_circuit``: a list of components/names or an object with ``.components``; ``*_acts``
    (``cka`` only): ``{component: Tensor[rows, d]}`` with rows aligned over the same inputs in
    both models. ``normalize``: compare effects as fractions of each model's largest ``|dP|`` over its
    circuit. Pairs come out in student forward order. Raises ``ConfigError`` on unknown methods,
    empty circuits or missing effects/activations.
    """
    method = str(method).lower()
    if method not in MATCHERS:
        raise ConfigError(f"unknown matching method {method!r}; choose one of {', '.join(METHODS)}")
    matcher = MATCHERS[method]
    tc, sc = circuit_components(teacher_circuit), circuit_components(student_circuit)
    if not tc or not sc:
        raise ConfigError(
            f"matching needs non-empty circuits, got {len(sc)} student and {len(tc)} teacher components; "
            "discover the circuits first or pass a head list"
        )
    te, se = _effects(teacher_effects), _effects(student_effects)
    info: dict = {"n_teacher_circuit": len(tc), "n_student_circuit": len(sc)}
    if matcher.needs_effects:
        _need(te, tc, "teacher")
        _need(se, sc, "student")
    have_effects = all(c in te for c in tc) and all(c in se for c in sc)
    if normalize:
        if not matcher.normalizable or not have_effects:
            raise ConfigError("normalize=True rescales ablation effects: it needs both models' effects and "
                              "method ablation, hungarian or random (not cka)")
        te, se = _normalized(te, se, tc, sc, info)
    dist = [[abs(se[s] - te[t]) for t in tc] for s in sc] if have_effects else None
    problem = MatchProblem(sc, tc, dist, info, seed, teacher_acts, student_acts, debiased)
    js, dists = matcher.run(problem)
    return ComponentMap([(s, tc[j]) for s, j in zip(sc, js)], dists, method, int(seed), info)
