"""The demo's HTML report: its table, the map (the grid's heatmaps), accuracy curves, bars and head-influence
heatmaps."""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

from ..analysis.report import influence_heatmaps
from ..files import atomic_write_text
from ..study.report import CSS
from .grid import grid_sections
from .tables import format_table, plot_bars, plot_curves


def img(plot, *args, **kw) -> str:
    """An inline ``<img>`` of what ``plot(*args, path, **kw)`` draws into a PNG file."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.png"
        plot(*args, p, **kw)
        return f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'


def write_demo_report(results: dict, out: Path, *, cmp_before=None, cmp_after=None, grid: dict | None = None) -> Path:
    """A self-contained HTML page: the table, the map of ``grid`` (the study's results of the demo's grid, if
    it ran), accuracy curves, bars, and head-influence heatmaps."""

    rows = results["rows"]
    task = results.get("task", "entity_tracking")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>circuit-distill demo</title>",
        f"<style>{CSS}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style>",
        f"</head><body><h1>circuit-distill demo: {html.escape(task.replace('_', ' '))}</h1>",
        f"<p>Teacher <code>{html.escape(results['teacher']['model'])}</code>: accuracy "
        f"{results['teacher']['acc']:.3f} / {results['teacher']['acc_hard']:.3f} "
        f"({html.escape(results.get('held_out', 'evaluation box count / harder split'))}). "
        f"Student before distillation: {results['student_before']['acc']:.3f} / "
        f"{results['student_before']['acc_hard']:.3f}, alignment A = {results['student_before']['alignment']:.3f}. "
        f"Seeds: {results['seeds']}. Runtime {results['runtime_s']:.0f}s.</p>",
        "<h2>Results (mean ± std over seeds)</h2><pre>" + html.escape(format_table(rows)) + "</pre>",
        *(grid_sections(grid) if grid is not None else []),
        "<h2>Accuracy over distillation steps</h2>",
        img(plot_curves, rows, key="acc", title="held-out accuracy (evaluation box count)"),
        img(plot_curves, rows, key="acc_hard", title="held-out accuracy (harder split)"),
        "<h2>Final accuracy</h2>",
        img(plot_bars, rows, reference={"teacher": results["teacher"]["acc_hard"]}),
    ]
    if cmp_before is not None:
        parts += ["<h2>Head influence: teacher and student before distillation</h2>",
                  f'<img src="{influence_heatmaps(cmp_before)}">']
    if cmp_after is not None:
        parts += ["<h2>Head influence: teacher and student after ce+align_cka (first seed)</h2>",
                  f'<img src="{influence_heatmaps(cmp_after)}">']
    parts.append("<h2>Circuits and component maps</h2><pre>" + html.escape(json.dumps(
        {"circuits": results["circuits"], "maps": {k: v.get("pairs") for k, v in results["maps"].items()}},
        indent=1, default=str)) + "</pre></body></html>")
    return atomic_write_text(out / "report.html", "\n".join(parts))
