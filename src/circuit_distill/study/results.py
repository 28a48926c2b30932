"""From saved runs to ``results.json``: per cell and row, accuracies, curves, the gains over ``ce`` and over
each control with paired-bootstrap CIs, the decision rule, and the role similarity of the matched pairs.

The decision rule (docs/study/PROTOCOL.md): a row *helps* in a cell when the CI of its gain over ``ce``
and the CI of its gain over every control lie above 0 (harder split). Its mechanism *transferred* when the
role similarity of the paper's matched pairs rose (mean after > before) and the CI of its gain in role
similarity over the random-pairs and over the shuffled-examples control lies above 0 (bootstrap over
seeds). The *goal* is a helping row whose gains over ``ce`` and every control are at least
``goal_margin``, that trains at most ``goal_trained_fraction`` of the student, and whose mechanism transferred.

Rows with interventions (docs/study/PROTOCOL-IIT.md) have their own controls (``StudyConfig.controls_of``: the
random-pairs IIT control ``random_iit`` and the sanity rows, beside the CKA controls if they also align); the
rule above applies with them (role similarity against ``random_iit``). Their *goal* is the issue's: gains over
``ce`` and over ``ce+random_iit`` of at least ``goal_margin`` with CIs above 0, and an IIA of the paper's pairs
(after) above the random-pairs control's by at least ``goal_iia_margin`` with a CI above 0 (bootstrap over
seeds). With ``iia`` every row also has its IIA before and after (means over seeds) and, for a rule row, its IIA
gains over ``ce`` and every control.
"""

from __future__ import annotations

import numpy as np

from .answers import from_bits
from .config import IIT_CONTROLS, StudyConfig
from .grid import Cell, study_cells
from .stats import Gain, paired_gain

ROLE_CONTROLS = ("random", "shuffled", "random_iit")  # the controls the transfer rule compares role similarity with
IIA_KEYS = ("iia_gain_vs_ce", "iia_gain_vs_controls")  # (with iia only)
RANDOM_IIT = next(iter(IIT_CONTROLS))  # the control label of the IIT goal


def cell_runs(cfg: StudyConfig, runs: dict[str, dict], cell: Cell) -> dict[str, dict[int, dict]]:
    """Row -> seed -> run record of the finished runs ``cell`` uses."""
    out: dict[str, dict[int, dict]] = {}
    for row in cfg.row_specs():
        for seed in cfg.seeds:
            key = cell.run_of(cfg, row, seed)
            if key is not None and key.id in runs:
                out.setdefault(row, {})[seed] = runs[key.id]
    return out


IIT_RULE = ("rows with interventions: the same rule with their own controls (ce+random_iit and the sanity rows), "
            "role similarity against ce+random_iit; their goal: harder-split gains over ce and over ce+random_iit of "
            "at least goal_margin with CIs above 0, and an IIA of the paper's matched pairs above ce+random_iit's "
            "by at least goal_iia_margin with a CI above 0 (bootstrap over seeds)")


def iit_protocol(cfg: StudyConfig) -> dict:
    """``{decision_rule_iit: ...}`` for ``results.json``'s protocol if a row has interventions, else ``{}``."""
    return {"decision_rule_iit": IIT_RULE} if any(r.uses_iit for r in cfg.row_specs().values()) else {}


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
        **({"iia_before": mean_of(runs, "iia_before"), "iia_after": mean_of(runs, "iia_after")} if cfg.iia else {}),
    }


def as_dict(g: Gain | None) -> dict | None:
    return g.to_dict() if g is not None else None


def iit_goal(cfg: StudyConfig, vs_ce: Gain | None, vs_random: Gain | None, iia_vs_random: Gain | None) -> bool:
    """The goal of a row with interventions: its harder-split gains over ``ce`` and over the random-pairs IIT
    control at least ``goal_margin`` with CIs above 0, and its IIA gain over that control at least
    ``goal_iia_margin`` with a CI above 0."""
    acc = (vs_ce, vs_random)
    return bool(all(g is not None and g.ci_low > 0 and g.mean >= cfg.goal_margin for g in acc)
                and iia_vs_random is not None and iia_vs_random.ci_low > 0
                and iia_vs_random.mean >= cfg.goal_iia_margin)


def decide(cfg: StudyConfig, summary: dict, by_row: dict[str, dict[int, dict]]) -> None:
    """Add to ``summary`` its gains over ``ce``; for a row with alignment or interventions that is not a control
    also its gains over its controls, the best control, the role comparison with the controls, and the decision
    rule's verdicts (and with ``iia`` its IIA gains)."""
    row, spec = by_row[summary["row"]], cfg.row_specs()[summary["row"]]

    def over(other: str, field: str = "correct_hard") -> Gain | None:
        return gain(row, by_row[other], cfg, field) if other in by_row else None

    vs_ce = over("ce")
    summary["gain_vs_ce"], summary["gain_vs_ce_eval"] = as_dict(vs_ce), as_dict(over("ce", "correct_eval"))
    keys = ("gain_vs_controls", "gain_vs_best_control", "role_gain_vs_controls", "helps", "transferred", "goal_met")
    for key in keys + (IIA_KEYS if cfg.iia else ()):
        summary[key] = None  # (set below for a row the rule applies to: aligned or intervened, not a control)
    if summary["control"] or not spec.positioned:
        return
    names = {c: n for c, n in cfg.controls_of(spec).items() if n in by_row}
    controls = {c: over(n) for c, n in names.items()}
    summary["gain_vs_controls"] = {c: as_dict(v) for c, v in controls.items()}
    best = max(controls, key=lambda c: mean_of(by_row[names[c]], "acc_hard"), default=None)
    summary["gain_vs_best_control"] = {"control": best, **controls[best].to_dict()} if best else None
    roles = {c: over(names[c], "role_after.role") for c in ROLE_CONTROLS if c in names}
    summary["role_gain_vs_controls"] = {c: as_dict(v) for c, v in roles.items()}
    rise = summary["role_similarity_after"] - summary["role_similarity_before"]
    summary["helps"] = bool(vs_ce is not None and vs_ce.ci_low > 0 and controls
                            and all(v.ci_low > 0 for v in controls.values()))
    summary["transferred"] = bool(rise > 0 and roles and all(v.ci_low > 0 for v in roles.values()))
    iia = {c: over(n, "iia_after") for c, n in names.items()} if cfg.iia else {}
    if cfg.iia:
        summary["iia_gain_vs_ce"] = as_dict(over("ce", "iia_after"))
        summary["iia_gain_vs_controls"] = {c: as_dict(v) for c, v in iia.items()}
    m = cfg.goal_margin
    if spec.uses_iit:
        summary["goal_met"] = iit_goal(cfg, vs_ce, controls.get(RANDOM_IIT), iia.get(RANDOM_IIT))
        return
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
