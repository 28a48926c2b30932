"""From saved runs to ``results.json``: per cell and row, accuracies, curves, the gains over ``ce`` and over
each control with paired-bootstrap CIs, the decision rule, and the role similarity of the matched pairs.

The decision rule (docs/study/PROTOCOL.md): a row *helps* in a cell when the CI of its gain over ``ce``
and the CI of its gain over every control lie above 0 (harder split). Its mechanism *transferred* when the
role similarity of the paper's matched pairs rose (mean after > before) and the CI of its gain in role
similarity over the random-pairs and over the shuffled-examples control lies above 0 (bootstrap over
seeds). The *goal* is a helping row whose gains over ``ce`` and every control are at least
``goal_margin``, that trains at most ``goal_trained_fraction`` of the student, and whose mechanism transferred.
"""

from __future__ import annotations

import numpy as np

from .answers import from_bits
from .config import CONTROLS, StudyConfig
from .grid import Cell, study_cells
from .stats import Gain, paired_gain

ROLE_CONTROLS = ("random", "shuffled")  # the controls the transfer rule compares role similarity with


def cell_runs(cfg: StudyConfig, runs: dict[str, dict], cell: Cell) -> dict[str, dict[int, dict]]:
    """Row -> seed -> run record of the finished runs ``cell`` uses."""
    out: dict[str, dict[int, dict]] = {}
    for row in cfg.row_specs():
        for seed in cfg.seeds:
            key = cell.run_of(cfg, row, seed)
            if key is not None and key.id in runs:
                out.setdefault(row, {})[seed] = runs[key.id]
    return out


def gain(a: dict[int, dict], b: dict[int, dict], cfg: StudyConfig, field: str = "correct_hard") -> Gain | None:
    """Gain of run set ``a`` over ``b`` (seed -> record) on their common seeds, paired by seed and prompt;
    ``field`` a correctness string, or a scalar path like ``role_after.role`` (then over seeds only)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None

    def values(runs):
        if field.startswith("correct_"):
            return np.stack([from_bits(runs[s][field]) for s in seeds])
        head, _, sub = field.partition(".")
        return np.array([[runs[s][head][sub] if sub else runs[s][head]] for s in seeds], dtype=float)

    return paired_gain(values(a), values(b), n_boot=cfg.n_boot, level=cfg.ci_level, seed=0)


def mean_of(runs: dict[int, dict], field: str, sub: str | None = None) -> float:
    vals = [r[field][sub] if sub else r[field] for r in runs.values()]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def mean_curve(runs: dict[int, dict]) -> dict:
    """The mean curve over seeds: ``{steps, acc, acc_hard}`` (the curves share their steps)."""
    curves = [r["curve"] for r in runs.values()]
    steps = [p["step"] for p in curves[0]]
    curves = [c for c in curves if [p["step"] for p in c] == steps]
    return {"steps": steps, **{k: np.mean([[p[k] for p in c] for c in curves], 0).tolist() for k in ("acc", "acc_hard")}}


def row_summary(cfg: StudyConfig, cell: Cell, row: str, runs: dict[int, dict], before: dict) -> dict:
    """Accuracies, curve, steps to targets, trained fraction, alignment and role similarity of one row."""
    spec = cfg.row_specs()[row]
    seeds = sorted(runs)
    acc = [runs[s]["acc"] for s in seeds]
    hard = [runs[s]["acc_hard"] for s in seeds]
    return {
        "warmth": cell.warmth, "trainable": cell.trainable, "positions": cell.positions, "row": row,
        "objective": spec.objective, "pairing": spec.pairing, "map": spec.map_key, "control": spec.is_control,
        "seeds": seeds, "acc_mean": float(np.mean(acc)), "acc_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
        "acc_hard_mean": float(np.mean(hard)), "acc_hard_std": float(np.std(hard, ddof=1)) if len(hard) > 1 else 0.0,
        "acc_per_seed": acc, "acc_hard_per_seed": hard,
        "trained_param_fraction": mean_of(runs, "trained_param_fraction"), "pair_cka_after": mean_of(runs, "pair_cka_after"),
        "curve": mean_curve(runs),
        "steps_to": {t: [runs[s]["steps_to"][t] for s in seeds] for t in runs[seeds[0]]["steps_to"]},
        "alignment_before": before["alignment"], "alignment_after": mean_of(runs, "alignment_after"),
        "n_carry_80_before": before["n_carry_80"], "n_carry_80_after": mean_of(runs, "n_carry_80_after"),
        "n_over_20_before": before["n_over_20"], "n_over_20_after": mean_of(runs, "n_over_20_after"),
        **{f"role_similarity_{part}before": before["role@ablation"][key] for part, key in
           (("", "role"), ("attention_", "attention"), ("effect_", "effect"))},
        **{f"role_similarity_{part}after": mean_of(runs, "role_after", key) for part, key in
           (("", "role"), ("attention_", "attention"), ("effect_", "effect"))},
    }


def as_dict(g: Gain | None) -> dict | None:
    return g.to_dict() if g is not None else None


def decide(cfg: StudyConfig, summary: dict, by_row: dict[str, dict[int, dict]]) -> None:
    """Add to ``summary`` its gains over ``ce``; for an aligned row that is not a control also its gains over
    the controls, the best control, the role comparison with the controls, and the decision rule's verdicts."""
    row = by_row[summary["row"]]

    def over(other: str, field: str = "correct_hard") -> Gain | None:
        return gain(row, by_row[other], cfg, field) if other in by_row else None

    vs_ce = over("ce")
    summary["gain_vs_ce"], summary["gain_vs_ce_eval"] = as_dict(vs_ce), as_dict(over("ce", "correct_eval"))
    for key in ("gain_vs_controls", "gain_vs_best_control", "role_gain_vs_controls", "helps", "transferred", "goal_met"):
        summary[key] = None  # (set below for a row the rule applies to: aligned, not a control)
    if summary["control"] or not cfg.row_specs()[summary["row"]].aligns:
        return
    controls = {c: over(name) for c, name in CONTROLS.items() if name in by_row}
    summary["gain_vs_controls"] = {c: as_dict(v) for c, v in controls.items()}
    best = max(controls, key=lambda c: mean_of(by_row[CONTROLS[c]], "acc_hard"), default=None)
    summary["gain_vs_best_control"] = {"control": best, **controls[best].to_dict()} if best else None
    roles = {c: over(CONTROLS[c], "role_after.role") for c in ROLE_CONTROLS if CONTROLS[c] in by_row}
    summary["role_gain_vs_controls"] = {c: as_dict(v) for c, v in roles.items()}
    rise = summary["role_similarity_after"] - summary["role_similarity_before"]
    summary["helps"] = bool(vs_ce is not None and vs_ce.ci_low > 0 and controls
                            and all(v.ci_low > 0 for v in controls.values()))
    summary["transferred"] = bool(rise > 0 and roles and all(v.ci_low > 0 for v in roles.values()))
    m = cfg.goal_margin
    summary["goal_met"] = bool(summary["helps"] and summary["transferred"] and vs_ce.mean >= m
                               and all(v.mean >= m for v in controls.values())
                               and summary["trained_param_fraction"] <= cfg.goal_trained_fraction)


def summarise_study(cfg: StudyConfig, runs: dict[str, dict], students_before: dict[str, dict]) -> list[dict]:
    """Every (cell, row) with finished runs, as ``results.json``'s ``cells`` (see the module docstring)."""
    cells = []
    for cell in study_cells(cfg):
        by_row = cell_runs(cfg, runs, cell)
        for row, row_runs in by_row.items():
            summary = row_summary(cfg, cell, row, row_runs, students_before[cell.warmth])
            decide(cfg, summary, by_row)
            cells.append(summary)
    return cells
