"""The study's ``report.html``: self-contained (inline CSS, every figure an embedded PNG, no scripts).

Heatmaps of each aligned row's gain over ``ce`` and over the best control by warmth x trainable scope (one
panel per alignment positions; ``*`` marks a CI that excludes 0), the role similarity of the matched pairs
(rise over the warm student, and gain over the random / shuffled controls), accuracy curves per cell, and
the table of every cell and row.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from ..files import atomic_write_text

CSS = ("body{font-family:system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}"
       "td.l{text-align:left}tr.yes{background:#e8f6e8}img{max-width:100%}h2{margin-top:1.6em}")


def png(fig) -> str:
    """An inline ``<img>`` of a matplotlib figure (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def grid_of(cells: list[dict], row: str, positions: str, value, warmths: list[str], scopes: list[str]):
    """``[warmth, scope]`` arrays of ``value(cell) -> (number, significant)`` for one row and positions."""
    vals = np.full((len(warmths), len(scopes)), np.nan)
    sig = np.zeros_like(vals, dtype=bool)
    for c in cells:
        if c["row"] == row and c["positions"] == positions:
            v = value(c)
            if v is not None:
                vals[warmths.index(c["warmth"]), scopes.index(c["trainable"])], sig[
                    warmths.index(c["warmth"]), scopes.index(c["trainable"])] = v
    return vals, sig


def heatmaps(cells: list[dict], row: str, panels: list[tuple[str, object]], positions: list[str],
             warmths: list[str], scopes: list[str], title: str) -> str:
    """One figure: a heatmap per (panel, positions), warmth down, scope across, values annotated."""
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), len(positions), figsize=(4.2 * len(positions), 2.6 * len(panels)),
                             squeeze=False)
    for i, (name, value) in enumerate(panels):
        for j, pos in enumerate(positions):
            ax = axes[i][j]
            vals, sig = grid_of(cells, row, pos, value, warmths, scopes)
            lim = max(0.05, float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 0.05)
            ax.imshow(vals, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
            for (a, b), v in np.ndenumerate(vals):
                if math.isfinite(v):
                    ax.text(b, a, f"{v:+.3f}{'*' if sig[a, b] else ''}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(scopes)), scopes, fontsize=7, rotation=15)
            ax.set_yticks(range(len(warmths)), warmths, fontsize=8)
            ax.set_title(f"{name} | positions {pos}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return png(fig)


def gain_value(key: str):
    def value(c: dict):
        g = c.get(key)
        return None if g is None else (g["mean"], g["ci_low"] > 0 or g["ci_high"] < 0)
    return value


def role_value(c: dict):
    return c["role_similarity_after"] - c["role_similarity_before"], False


def role_vs_controls(c: dict):
    gains = [g for g in (c.get("role_gain_vs_controls") or {}).values() if g is not None]
    if not gains:
        return None
    worst = min(gains, key=lambda g: g["mean"])
    return worst["mean"], all(g["ci_low"] > 0 for g in gains)


def curves(cells: list[dict], warmth: str, positions: list[str], scopes: list[str]) -> str:
    """Harder-split accuracy over steps (mean over seeds), one panel per (scope, positions), a line per row."""
    plt = pyplot()
    fig, axes = plt.subplots(len(scopes), len(positions), figsize=(4.2 * len(positions), 2.6 * len(scopes)),
                             squeeze=False, sharey=True)
    for i, scope in enumerate(scopes):
        for j, pos in enumerate(positions):
            ax = axes[i][j]
            for c in cells:
                if (c["warmth"], c["trainable"], c["positions"]) == (warmth, scope, pos):
                    ax.plot(c["curve"]["steps"], c["curve"]["acc_hard"], lw=1.4, label=c["row"],
                            ls="--" if c["control"] else "-")
            ax.set_title(f"{scope} | {pos}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if i == len(scopes) - 1:
                ax.set_xlabel("step", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{warmth}: harder-split accuracy over distillation steps (curve prompts, mean over seeds)", fontsize=10)
    fig.tight_layout()
    return png(fig)


def fmt_gain(g: dict | None) -> str:
    if not g:
        return "—"
    return f"{g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"


def cell_table(cells: list[dict]) -> str:
    """Every (cell, row) as one HTML table row; rows that help are shaded (with the IIA of the paper's pairs
    before and after, and its gain over the random-pairs IIT control, if measured)."""
    iia = any("iia_after" in c for c in cells)
    head = ("warmth", "scope", "positions", "row", "acc", "acc hard", "gain vs ce (hard)", "gain vs best control",
            "role before → after", "A after", "trained %", "helps", "transferred") + (
            ("IIA before → after", "IIA gain vs random_iit", "goal") if iia else ())
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for c in cells:
        best = c.get("gain_vs_best_control")
        vals = (c["warmth"], c["trainable"], c["positions"], c["row"], f"{c['acc_mean']:.3f}",
                f"{c['acc_hard_mean']:.3f} ± {c['acc_hard_std']:.3f}", fmt_gain(c.get("gain_vs_ce")),
                (fmt_gain(best) + f" ({best['control']})") if best else "—",
                f"{c['role_similarity_before']:.3f} → {c['role_similarity_after']:.3f}", f"{c['alignment_after']:.3f}",
                f"{100 * c['trained_param_fraction']:.1f}", {True: "yes", False: "no"}.get(c.get("helps"), ""),
                {True: "yes", False: "no"}.get(c.get("transferred"), ""))
        if iia:
            vals += (f"{c['iia_before']:.3f} → {c['iia_after']:.3f}",
                     fmt_gain((c.get("iia_gain_vs_controls") or {}).get("random_iit")),
                     {True: "yes", False: "no"}.get(c.get("goal_met"), ""))
        cls = ' class="yes"' if c.get("helps") else ""
        out.append(f"<tr{cls}>" + "".join(f'<td{" class=l" if i < 4 else ""}>{html.escape(str(v))}</td>'
                                         for i, v in enumerate(vals)) + "</tr>")
    return "\n".join(out) + "</table>"


def study_sections(results: dict, level: int = 2) -> list[str]:
    """The report's HTML sections after its header: the verdict, for each aligned row the accuracy-gain and
    role heatmaps, the curves and the table of every cell (a page that embeds the study, like the demo's,
    takes these, with headings at ``level``: ``<h2>`` by default)."""
    p, cells = results["protocol"], results["cells"]
    warmths, scopes, positions = list(p["students"]), p["trainable"], p["positions"]
    methods = [r for r in dict.fromkeys(c["row"] for c in cells) if any(c["row"] == r and c.get("helps") is not None for c in cells)]
    h = lambda text: f"<h{level}>{html.escape(text)}</h{level}>"
    parts = [h("Verdict") + f"<p>{html.escape(results['verdict'])}</p>"]
    for row in methods:
        parts += [h(row),
                  heatmaps(cells, row, [("gain over ce", gain_value("gain_vs_ce")),
                                        ("gain over best control", gain_value("gain_vs_best_control"))],
                           positions, warmths, scopes, f"{row}: harder-split accuracy gain (* CI excludes 0)"),
                  heatmaps(cells, row, [("role rise (after - before)", role_value),
                                        ("role gain over random/shuffled (worst)", role_vs_controls)],
                           positions, warmths, scopes, f"{row}: role similarity of the paper's matched pairs")]
    parts.append(h("Accuracy curves"))
    parts += [curves(cells, w, positions, scopes) for w in warmths]
    return parts + [h("Every cell and row"), cell_table(cells)]


def write_study_report(results: dict, out: Path) -> Path:
    """Write ``out/report.html`` from ``results`` (what ``results.json`` holds)."""
    p = results["protocol"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>circuit-distill study</title><style>{CSS}</style>"
             "</head><body><h1>Where does circuit distillation transfer a mechanism?</h1>",
             f"<p>Teacher {html.escape(p['teacher'])}: accuracy {results['teacher']['acc']:.3f} / "
             f"{results['teacher']['acc_hard']:.3f} (harder split). Seeds {p['seeds']}, {p['steps']} steps, "
             f"{p['n_eval']} prompts per held-out set, {results['n_runs']} of {results['n_runs_planned']} runs.</p><ul>"]
    for w, s in results["students"].items():
        parts.append(f"<li>{html.escape(w)}: {html.escape(s['model'])}, accuracy {s['acc']:.3f} / {s['acc_hard']:.3f}, "
                     f"A = {s['alignment']:.3f}, role similarity of the paper's pairs {s['role@ablation']['role']:.3f}</li>")
    parts += ["</ul>", *study_sections(results), "</body></html>"]
    return atomic_write_text(Path(out) / "report.html", "\n".join(parts))
