"""``write_report(comparison, out_dir)``: comparison.json and a self-contained report.html.

The HTML works offline: inline CSS, every plot a PNG embedded as a base64 ``data:`` URI, no
scripts, no external references. Plots (matplotlib, Agg backend): per-head influence heatmaps of
teacher and student side by side (each model its own layer x head grid), MLP influence bars,
drop histograms, the teacher-layer x student-layer CKA heatmap and the matched-pair similarity map.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from ..model.components import Component

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1250px;
color:#1d2330;line-height:1.45;padding:0 16px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #d8dce6;
padding-bottom:4px}.sub{color:#5a6275;margin-top:0}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #d8dce6;padding:3px 8px;
text-align:right}th{background:#f1f3f8}td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}.card{border:1px solid #d8dce6;border-radius:6px;
padding:10px 14px;min-width:150px}.card b{display:block;font-size:22px}.card span{color:#5a6275;font-size:12px}
img{max-width:100%;height:auto;border:1px solid #eceef3;margin:6px 0}.warn{background:#fff4e0;
border:1px solid #f0c36d;padding:8px 12px;border-radius:4px}.scroll{max-height:520px;overflow:auto}
"""


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """The figure as a ``data:image/png;base64,...`` URI (the figure is closed)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def head_grid(values: dict[Component, float], shape: tuple[int, int]) -> np.ndarray:
    """``[n_layers, n_heads]`` array of per-head ``values`` (NaN where a head has none)."""
    grid = np.full(shape, np.nan)
    for c, v in values.items():
        if c.is_head and c.layer < shape[0] and c.head < shape[1]:
            grid[c.layer, c.head] = v
    return grid


def _annotate(ax, grid: np.ndarray, vmax: float, fmt: str | None = None) -> None:
    """Write each cell's value (dark text on the light high end of viridis/magma, light text on the dark end)."""
    n_l, n_h = grid.shape
    if n_l * n_h > 160:
        return
    if fmt is None:
        fmt = "{:.0f}" if vmax >= 20 else "{:.1f}" if vmax >= 2 else "{:.2f}"
    for i in range(n_l):
        for j in range(n_h):
            v = grid[i, j]
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="black" if vmax and v > 0.55 * vmax else "white")


def _ticks(ax, n: int, axis: str, label: str) -> None:
    step = max(1, int(math.ceil(n / 16)))
    ticks = list(range(0, n, step))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label)


def influence_heatmaps(cmp) -> str:
    """Teacher and student per-head influence heatmaps side by side (own grids, shared colour scale)."""
    plt = _plt()
    tg = head_grid(cmp.teacher_influence, tuple(cmp.teacher_shape))
    sg = head_grid(cmp.student_influence, tuple(cmp.student_shape))
    finite = np.concatenate([tg[np.isfinite(tg)], sg[np.isfinite(sg)]])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    ratios = [max(cmp.teacher_shape[1], 2), max(cmp.student_shape[1], 2)]
    height = 1.2 + 0.38 * max(cmp.teacher_shape[0], cmp.student_shape[0])
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.2, height)), gridspec_kw={"width_ratios": ratios})
    for ax, grid, who, shape in ((axes[0], tg, "Teacher", cmp.teacher_shape), (axes[1], sg, "Student", cmp.student_shape)):
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(f"{who} head influence I (%)\n{shape[0]} layers x {shape[1]} heads")
        _ticks(ax, shape[1], "x", "head")
        _ticks(ax, shape[0], "y", "layer")
        _annotate(ax, grid, vmax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="|100 (1 - LD_abl / LD_clean)|")
    fig.tight_layout()
    return _png(fig)


def mlp_bars(cmp) -> str | None:
    """Per-layer MLP influence of teacher and student (None without MLPs)."""
    t = sorted((c.layer, v) for c, v in cmp.teacher_influence.items() if c.kind == "mlp")
    s = sorted((c.layer, v) for c, v in cmp.student_influence.items() if c.kind == "mlp")
    if not t and not s:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
    for ax, data, who, colour in ((axes[0], t, "Teacher", "#3b6fb6"), (axes[1], s, "Student", "#d9822b")):
        if data:
            ax.bar([x for x, _ in data], [v for _, v in data], color=colour)
        ax.set_title(f"{who} MLP influence I (%) by layer")
        n_layers = (cmp.teacher_shape if who == "Teacher" else cmp.student_shape)[0]
        _ticks(ax, n_layers, "x", "layer")
        ax.set_xlim(-0.6, n_layers - 0.4)
        ax.set_ylabel("influence (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def drop_histograms(cmp) -> str:
    """Histograms of single-component drops (0-100 pp) of teacher and student."""
    plt = _plt()
    bins = np.linspace(0, 100, 21)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4), sharex=True)
    for ax, d, rob, who, colour in (
        (axes[0], cmp.teacher_drop, cmp.teacher_robustness, "Teacher", "#3b6fb6"),
        (axes[1], cmp.student_drop, cmp.student_robustness, "Student", "#d9822b"),
    ):
        heads = [v for c, v in d.items() if c.is_head]
        mlps = [v for c, v in d.items() if c.kind == "mlp"]
        ax.hist([heads, mlps], bins=bins, stacked=True, color=[colour, "#8a8f9c"], label=["heads", "MLPs"])
        ax.axvline(rob.mean_drop, color="black", linestyle="--", linewidth=1,
                   label=f"mean {rob.mean_drop:.1f} [{rob.ci_low:.1f}, {rob.ci_high:.1f}]")
        ax.axvline(20, color="#c0392b", linestyle=":", linewidth=1, label="20 pp (severity threshold)")
        ax.set_yscale("symlog", linthresh=1)
        from matplotlib.ticker import ScalarFormatter

        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_title(f"{who}: drop when one component is ablated (n={rob.n})")
        ax.set_xlabel("drop m = 100 - clamp(retained %, 0, 100)  (pp)")
        ax.set_ylabel("components")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def layer_cka_heatmap(cmp) -> str:
    """Teacher-layer x student-layer linear CKA of residual outputs."""
    plt = _plt()
    m = np.asarray(cmp.layer_cka, dtype=float)
    n_t, n_s = m.shape
    fig, ax = plt.subplots(figsize=(min(10, 2.5 + 0.45 * n_s), min(10, 1.8 + 0.38 * n_t)))
    im = ax.imshow(m, cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_title("Linear CKA of residual-stream outputs")
    _ticks(ax, n_s, "x", "student layer")
    _ticks(ax, n_t, "y", "teacher layer")
    _annotate(ax, m, 1.0, "{:.2f}")
    fig.colorbar(im, ax=ax, label="CKA")
    fig.tight_layout()
    return _png(fig)


def _fmt(v, digits: int = 3) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _rob_table(cmp) -> str:
    t, s = cmp.teacher_robustness, cmp.student_robustness
    rows = [
        ("components", t.n, s.n), ("mean drop (pp)", t.mean_drop, s.mean_drop),
        ("95% bootstrap CI", f"[{t.ci_low:.2f}, {t.ci_high:.2f}]", f"[{s.ci_low:.2f}, {s.ci_high:.2f}]"),
        ("median drop", t.median_drop, s.median_drop), ("worst-5% mean", t.worst_5pct_mean, s.worst_5pct_mean),
        ("single worst", t.max_drop, s.max_drop), ("severity tail S", t.severity, s.severity),
        ("Gini of drops", t.gini, s.gini), ("drops > 20 pp", t.n_over_20, s.n_over_20),
        ("drops > 50 pp", t.n_over_50, s.n_over_50),
        ("components carrying 80% of influence", t.n_carry_80, s.n_carry_80),
        ("parameters", cmp.teacher_params, cmp.student_params),
        (f"clean {cmp.metric}", cmp.teacher_sweep.clean.get(cmp.metric, float("nan")),
         cmp.student_sweep.clean.get(cmp.metric, float("nan"))),
        ("clean accuracy", cmp.teacher_sweep.clean.get("accuracy", float("nan")),
         cmp.student_sweep.clean.get("accuracy", float("nan"))),
        ("sweep seconds / forwards", f"{cmp.teacher_sweep.seconds:.2f} s / {cmp.teacher_sweep.forwards:.1f}",
         f"{cmp.student_sweep.seconds:.2f} s / {cmp.student_sweep.forwards:.1f}"),
    ]
    body = "".join(f"<tr><td class=l>{html.escape(k)}</td><td>{_fmt(a)}</td><td>{_fmt(b)}</td></tr>"
                   for k, a, b in rows)
    return f"<table><tr><th class=l></th><th>teacher</th><th>student</th></tr>{body}</table>"


def _pair_table(cmp) -> str:
    head = ("<tr><th class=l>student</th><th class=l>teacher</th><th>S</th><th>I student (%)</th>"
            "<th>I teacher (%)</th><th>I~ student</th><th>I~ teacher</th><th>S (1 - |dI~|)</th></tr>")
    rows = "".join(
        f"<tr><td class=l>{p.student}</td><td class=l>{p.teacher}</td><td>{p.similarity:.3f}</td>"
        f"<td>{_fmt(p.influence_student)}</td><td>{_fmt(p.influence_teacher)}</td><td>{p.norm_student:.3f}</td>"
        f"<td>{p.norm_teacher:.3f}</td><td>{p.contribution:.3f}</td></tr>" for p in cmp.pairs)
    return f"<div class=scroll><table>{head}{rows}</table></div>"


def _named_html(cmp) -> str:
    """The paragraph on named positions (tokenizers differ) and the control-pair table, if any."""
    out = ""
    if cmp.positions:
        out += ("<h2>Across tokenizers</h2><p class=sub>The two models tokenise the prompts differently, so they "
                "are compared at the task's named positions (" + ", ".join(html.escape(p) for p in cmp.positions)
                + "), one row per prompt: heads by the attention mass between those positions, CKA (debiased) of "
                "the outputs there; the layer map is debiased CKA of residual outputs there.</p>")
    if cmp.controls:
        rows = "".join(
            f"<tr><td class=l>{html.escape(name)}</td><td>{c['alignment']:.3f}</td><td>{c['mean_similarity']:.3f}"
            f"</td><td>{'yes' if c['alignment'] < cmp.alignment else 'no'}</td></tr>" for name, c in cmp.controls.items())
        out += ("<h2>Control pairs</h2><p class=sub>* = a control copy (shuffle_heads: every head's query and "
                "output weights moved to another head slot; reinit: every decoder-layer matrix redrawn). "
                f"True pair: A = {cmp.alignment:.3f}, mean S = {cmp.mean_similarity:.3f}.</p>"
                "<table><tr><th class=l>pair</th><th>A</th><th>mean S</th><th>below the true pair</th></tr>"
                f"{rows}</table>")
    return out


def render_html(cmp) -> str:
    """The self-contained report as one HTML string."""
    figs = [("Per-head influence", influence_heatmaps(cmp),
             "Influence I(c) = |100 (1 - LD_ablated / LD_clean)| of each head ablated alone "
             f"({html.escape(cmp.ablation)} ablation). Both panels share one colour scale.")]
    bars = mlp_bars(cmp)
    if bars:
        figs.append(("MLP influence", bars, "Influence of each MLP layer ablated alone."))
    figs.append(("Robustness: drop histograms", drop_histograms(cmp),
                 "Per-component drop m (heads and MLPs stacked); counts on a symmetric-log scale. Dashed: mean with 95% bootstrap CI."))
    figs.append(("Layer correspondence", layer_cka_heatmap(cmp),
                 "Linear CKA between every teacher layer's and every student layer's residual output "
                 + ("at the named positions (debiased, one row per prompt)." if cmp.positions
                    else "over all real tokens of the task prompts.")))
    by_kind = ", ".join(f"{k}: {v:.3f}" for k, v in cmp.alignment_by_kind.items())
    b = cmp.brittleness
    cards = [
        ("alignment score A", f"{cmp.alignment:.3f}", by_kind),
        ("matched pairs", f"{len(cmp.pairs)}", cmp.direction.replace("_", " ")),
        ("compression C", f"{cmp.compression:.3f}", f"{cmp.teacher_params:,} -> {cmp.student_params:,} params"),
        ("mean drop T -> S", f"{cmp.teacher_robustness.mean_drop:.1f} -> {cmp.student_robustness.mean_drop:.1f}",
         f"slope {_fmt(b.get('mean_drop', float('nan')))} pp per unit C"),
        ("severity T -> S", f"{cmp.teacher_robustness.severity:.3f} -> {cmp.student_robustness.severity:.3f}",
         f"slope {_fmt(b.get('severity', float('nan')))} per unit C"),
    ]
    card_html = "".join(f"<div class=card><span>{html.escape(k)}</span><b>{html.escape(v)}</b>"
                        f"<span>{html.escape(sub)}</span></div>" for k, v, sub in cards)
    warn = "".join(f"<p class=warn>{html.escape(w)}</p>" for w in cmp.warnings)
    fig_html = "".join(f"<h2>{html.escape(t)}</h2><p class=sub>{cap}</p><img alt=\"{html.escape(t)}\" src=\"{uri}\">"
                       for t, uri, cap in figs)
    title = f"Circuit comparison: {cmp.teacher_name} vs {cmp.student_name} on {cmp.task}"
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p class=sub>{cmp.n_examples} examples, metric {html.escape(cmp.metric)} at position "
        f"'{html.escape(cmp.position)}', {html.escape(cmp.ablation)} ablation, similarity "
        f"{html.escape(cmp.similarity)}, matching {html.escape(cmp.direction.replace('_', ' '))}; "
        f"teacher {cmp.teacher_shape[0]}x{cmp.teacher_shape[1]}, student {cmp.student_shape[0]}x"
        f"{cmp.student_shape[1]} (layers x heads); {cmp.seconds:.1f} s.</p>{warn}"
        f"<div class=cards>{card_html}</div>"
        f"{_named_html(cmp)}<h2>Robustness</h2>{_rob_table(cmp)}{fig_html}"
        "<h2>Matched pairs</h2><p class=sub>A = (1/N) sum S (1 - |I~_S - I~_T|); I~ = influence divided by its "
        "sum over the pair list.</p>" + _pair_table(cmp) + "</body></html>"
    )


def write_report(comparison, out_dir: str | Path) -> Path:
    """Write ``comparison.json`` and ``report.html`` into ``out_dir`` (created); return the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comparison.to_json(out / "comparison.json")
    path = out / "report.html"
    path.write_text(render_html(comparison), encoding="utf-8")
    return path
