"""Aggregation, tables and plots for multi-seed distillation experiments (the demo's results).

A *run* is one (row, seed) training run: its final accuracies, its accuracy curve over steps and
a few scalars. ``summarise_rows`` turns runs into the mean +- std per row; ``format_table`` prints
them; ``plot_curves`` and ``plot_bars`` draw the figures of the demo report.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

ROW_SCALARS = ("acc", "acc_hard", "pair_cka_after", "alignment_after", "trained_param_fraction")
# measured only by some runs: interchange intervention accuracy, accuracy per theory-of-mind case
OPTIONAL_SCALARS = ("iia_after", "acc_true_belief", "acc_false_belief", "acc_unknown")
CASE_COLUMNS = {"acc_true_belief": "true belief", "acc_false_belief": "false belief", "acc_unknown": "unknown"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if vals.size == 0:
        return float("nan"), float("nan")
    return float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else 0.0


def summarise_rows(runs: list[dict]) -> dict[str, dict]:
    """Per row: ``<key>_mean`` / ``<key>_std`` over seeds for each scalar in ``ROW_SCALARS`` and the
    per-seed values, plus the mean accuracy curve. ``acc`` is also exposed as ``acc_mean``/``acc_std``."""
    by_row: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_row[r["row"]].append(r)
    out: dict[str, dict] = {}
    for row, rs in by_row.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        summary: dict = {"seeds": [r["seed"] for r in rs]}
        for key in ROW_SCALARS + tuple(k for k in OPTIONAL_SCALARS if any(k in r for r in rs)):
            vals = [r.get(key) for r in rs]
            m, s = _mean_std(vals)
            summary[f"{key}_mean"], summary[f"{key}_std"] = m, s
            summary[f"{key}_per_seed"] = vals
        # the fraction is the same for every seed; expose it plainly too
        summary["trained_param_fraction"] = summary.pop("trained_param_fraction_mean")
        summary.pop("trained_param_fraction_std")
        summary.pop("trained_param_fraction_per_seed")
        summary["pair_cka_after"] = summary["pair_cka_after_mean"]
        summary["alignment_after"] = summary["alignment_after_mean"]
        curves = [r["curve"] for r in rs if r.get("curve")]
        if curves:
            steps = [p["step"] for p in curves[0]]
            summary["curve_steps"] = steps
            for key in ("acc", "acc_hard"):
                if all(key in p for c in curves for p in c):
                    arr = np.array([[p[key] for p in c] for c in curves], dtype=float)
                    summary[f"curve_{key}_mean"] = arr.mean(0).tolist()
                    summary[f"curve_{key}_std"] = (arr.std(0, ddof=1) if len(curves) > 1 else 0 * arr[0]).tolist()
        out[row] = summary
    return out


def cells(r: dict, name: str) -> tuple[str, ...]:
    """One table line of a row summary: name, accuracies (mean +- std), pair CKA, alignment, trained %."""
    return (
        name,
        f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f}",
        f"{r['acc_hard_mean']:.3f} ± {r['acc_hard_std']:.3f}",
        "—" if math.isnan(r["pair_cka_after"]) else f"{r['pair_cka_after']:.3f}",
        "—" if math.isnan(r["alignment_after"]) else f"{r['alignment_after']:.3f}",
        f"{100 * r['trained_param_fraction']:.1f}",
    )


def format_table(rows: dict[str, dict], order: list[str] | None = None) -> str:
    """A plain-text table: row, accuracy, hard-split accuracy (mean +- std), pair CKA, alignment, trained %,
    and the interchange intervention accuracy and the accuracy per theory-of-mind case (mean over seeds)
    when the runs measured them."""
    order = order or list(rows)
    iia = any("iia_after_mean" in r for r in rows.values())
    cases = [k for k in CASE_COLUMNS if any(f"{k}_mean" in r for r in rows.values())]
    header = ("row", "acc (mean ± std)", "acc hard (mean ± std)", "pair CKA", "alignment A", "trained %") + (
        ("IIA",) if iia else ()) + tuple(CASE_COLUMNS[k] for k in cases)
    lines = [cells(rows[name], name) + ((f"{rows[name].get('iia_after_mean', math.nan):.3f}",) if iia else ())
             + tuple(f"{rows[name].get(f'{k}_mean', math.nan):.3f}" for k in cases) for name in order]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*ln) for ln in lines]
    return "\n".join(out)


def plot_curves(rows: dict[str, dict], path, key: str = "acc", title: str = "held-out accuracy over steps") -> None:
    """One line per row (mean over seeds) with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for name, r in rows.items():
        if f"curve_{key}_mean" not in r:
            continue
        x = np.array(r["curve_steps"])
        m, s = np.array(r[f"curve_{key}_mean"]), np.array(r[f"curve_{key}_std"])
        (line,) = ax.plot(x, m, label=name, lw=1.8)
        ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("distillation step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bars(rows: dict[str, dict], path, reference: dict[str, float] | None = None) -> None:
    """Grouped bars: accuracy and hard-split accuracy per row, error bars = std over seeds, dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    x = np.arange(len(names))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(names) + 2), 4.2), dpi=110)
    for off, key, label in ((-w / 2, "acc", "training box counts"), (w / 2, "acc_hard", "harder split")):
        means = [rows[n][f"{key}_mean"] for n in names]
        stds = [rows[n][f"{key}_std"] for n in names]
        ax.bar(x + off, means, w, yerr=stds, capsize=3, label=label, alpha=0.85)
        for i, n in enumerate(names):
            pts = [v for v in rows[n][f"{key}_per_seed"] if v is not None]
            ax.scatter(np.full(len(pts), x[i] + off), pts, s=9, color="k", zorder=3)
    for label, val in (reference or {}).items():
        ax.axhline(val, ls="--", lw=1, color="gray")
        ax.text(len(names) - 0.5, val, f" {label}", va="bottom", ha="right", fontsize=8, color="gray")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("accuracy after distillation (mean ± std over seeds; dots: seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
