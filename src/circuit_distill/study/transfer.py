"""Did the mechanism transfer? The roles of matched heads, before and after distillation.

A head's *role* on a task has two parts, both measured on the same prompts for teacher and student:

- where it looks: its attention by token kind from the final token and from the earlier label
  (``training.card.attention_by_category``: 2 query tokens x 7 kinds, each row a distribution; on theory
  of mind from the final token, Q's first drink and Q's visibility word over 12 story roles,
  ``training.tom_card.belief_attention``);
- how much the model relies on it: its single-head mean-ablation drop (``analysis.drops``: percent of the
  logit difference lost, clamped to [0, 100]).

For a pair (student head, teacher head): attention similarity = 1 - the total-variation distance of the
two distributions (mean over the two query tokens), effect similarity = 1 - |drop_s - drop_t| / 100, and
role similarity = their mean, each in [0, 1]. ``transfer_check`` also records the influence-weighted
alignment score A of ``analysis.compare`` and how many components the student relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..analysis import compare, drops
from ..model.components import Component
from ..tasks.base import TaskData
from ..training.card import CATEGORIES, QUERIES, attention_by_category

Pair = tuple[Component, Component]
METRIC = "logit_diff"


def attention_profiles(model, td: TaskData) -> dict[Component, np.ndarray]:
    """Each head's attention by token kind: ``head -> [queries, kinds]`` (each row sums to about 1). Entity
    tracking: 2 query tokens x 7 kinds (``training.card``); theory of mind: 3 x 12 story roles
    (``training.tom_card``)."""
    if td.name == "theory_of_mind":
        from ..training.tom_card import TOM_CATEGORIES, TOM_QUERIES, belief_attention

        by, kinds, queries = belief_attention(model, td), TOM_CATEGORIES, TOM_QUERIES
    else:
        by, kinds, queries = attention_by_category(model, td), CATEGORIES, QUERIES
    return {h: np.array([[by[q][c][h.layer][h.head] for c in kinds] for q in queries])
            for h in model.components("head")}


@dataclass
class Roles:
    """One model's head roles on a task: attention profiles and single-component drops (percent)."""

    attention: dict[Component, np.ndarray]
    drop: dict[Component, float]


def pair_similarity(student: Roles, teacher: Roles, pair: Pair) -> dict[str, float]:
    """``{attention, effect, role}`` similarity of one (student head, teacher head) pair (module docstring)."""
    s, t = pair
    tv = 0.5 * np.abs(student.attention[s] - teacher.attention[t]).sum(-1).mean()
    attention = float(1.0 - tv)
    effect = float(1.0 - abs(student.drop[s] - teacher.drop[t]) / 100.0)
    return {"attention": attention, "effect": effect, "role": 0.5 * (attention + effect)}


def role_similarity(student: Roles, teacher: Roles, pairs: Sequence[Pair]) -> dict:
    """Mean ``attention``, ``effect`` and ``role`` similarity over ``pairs`` and the per-pair table."""
    table = [{"student": str(s), "teacher": str(t), **pair_similarity(student, teacher, (s, t))} for s, t in pairs]
    out = {k: float(np.mean([p[k] for p in table])) if table else float("nan") for k in ("attention", "effect", "role")}
    return {**out, "pairs": table}


def teacher_roles(teacher, td: TaskData, sweep) -> Roles:
    """The teacher's roles from its discovery sweep (heads and MLPs, mean ablation at the last token)."""
    return Roles(attention_profiles(teacher, td), drops(sweep, METRIC))


def transfer_check(teacher, student, td: TaskData, teacher_side: Roles, teacher_sweep, pairs: dict[str, list[Pair]],
                   *, student_sweep=None, n_boot: int = 200) -> dict:
    """The student's roles against the teacher's on ``td``: ``alignment`` (A), ``n_carry_80`` and
    ``n_over_20`` (how many components it relies on), and for each named list of ``pairs`` its
    ``role_similarity``. ``teacher_sweep`` / ``student_sweep``: sweeps ``compare`` may reuse."""
    cmp = compare(teacher, student, td, n_boot=n_boot, progress=False, teacher_sweep=teacher_sweep,
                  student_sweep=student_sweep)
    roles = Roles(attention_profiles(student, td), dict(cmp.student_drop))
    out = {"alignment": float(cmp.alignment), "n_carry_80": int(cmp.student_robustness.n_carry_80),
           "n_over_20": int(cmp.student_robustness.n_over_20), "mean_drop": float(cmp.student_robustness.mean_drop)}
    for name, ps in pairs.items():
        out[name] = role_similarity(roles, teacher_side, ps)
    return out
