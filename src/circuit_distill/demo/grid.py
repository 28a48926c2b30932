"""The demo's map: a reduced grid of the controlled study, run beside the demo's own table.

Warmth levels x trainable scopes x rows (by default ``ce``, ``ce+random_cka`` and ``ce+align_cka`` for a
cold and the partial student, with the matched heads or every parameter trainable), at the demo's seeds,
protocol and alignment positions (``DemoConfig.grid_config``). The study's runner (``run_study``) trains
it into ``<out>/grid``: one file per run, so a rerun skips every finished run, and the study's own
``results.json`` and ``report.html`` there. The demo's ``results.json`` holds a summary of each cell
(``grid_summary``) and its ``report.html`` the heatmaps of the gain over ``ce`` and over the control
(``grid_sections``).
"""

from __future__ import annotations

import html
from pathlib import Path

from ..study import run_study, study_sections
from ..study.runner import check_settings
from .experiment import DemoConfig

GRID_DIR = "grid"
CELL_KEYS = ("warmth", "trainable", "positions", "row", "control", "seeds", "acc_mean", "acc_std", "acc_hard_mean",
             "acc_hard_std", "trained_param_fraction", "gain_vs_ce", "gain_vs_controls", "gain_vs_best_control",
             "helps", "role_similarity_before", "role_similarity_after")


def check_grid(cfg: DemoConfig, out: Path, overwrite: bool) -> None:
    """``ConfigError`` if ``out/grid`` holds runs of a grid with other run settings (unless ``overwrite``),
    before the demo trains anything."""
    if cfg.grid and not overwrite:
        check_settings(out / GRID_DIR, cfg.grid_config())


def run_grid(cfg: DemoConfig, out: Path, *, overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Run every unfinished run of the demo's grid into ``out/grid`` with ``cfg.grid_jobs`` processes and
    return the study's results (``study.run.write_results``)."""
    log(f"the map: {len(cfg.grid_students)} warmth levels x {len(cfg.grid_trainable)} trainable scopes x "
        f"rows {', '.join(cfg.grid_rows)}, {len(cfg.seeds)} seeds, into {out / GRID_DIR}")
    return run_study(cfg.grid_config(), out / GRID_DIR, jobs=cfg.grid_jobs, overwrite=overwrite, progress=progress,
                     log=log)


def grid_summary(results: dict) -> dict:
    """What the demo's ``results.json`` keeps of the grid: its factors, the verdict, and per (cell, row) the
    accuracies, the gains over ``ce`` and over the controls (paired-bootstrap CIs) and the role similarity.
    Everything else (curves, per-run records) is in ``grid/results.json``."""
    p = results["protocol"]
    return {
        "results": f"{GRID_DIR}/results.json", "report": f"{GRID_DIR}/report.html",
        "students": dict(p["students"]), "trainable": list(p["trainable"]), "positions": list(p["positions"]),
        "rows": list(p["rows"]), "seeds": list(p["seeds"]), "n_eval": p["n_eval"],
        "n_runs": results["n_runs"], "n_runs_planned": results["n_runs_planned"], "verdict": results["verdict"],
        "cells": [{k: c.get(k) for k in CELL_KEYS} for c in results["cells"]],
    }


def grid_intro(results: dict) -> str:
    """The paragraph that says what the grid is and how to read its heatmaps."""
    p = results["protocol"]
    controls = sorted({c["row"] for c in results["cells"] if c["control"]})
    students = "; ".join(f"{html.escape(w)}: <code>{html.escape(s['model'])}</code>, accuracy {s['acc']:.3f} / "
                         f"{s['acc_hard']:.3f} (harder split) before" for w, s in results["students"].items())
    return (f"<p>A reduced grid of the controlled study (<code>circuit-distill study</code>): the rows "
            f"{', '.join(f'<code>{html.escape(r)}</code>' for r in p['rows'])} for every warmth level x trainable "
            f"scope ({', '.join(map(html.escape, p['trainable']))}), alignment positions "
            f"{', '.join(map(html.escape, p['positions']))}, the demo's protocol ({p['steps']} steps, seeds "
            f"{p['seeds']}), {p['n_eval']} prompts per held-out set; {results['n_runs']} of "
            f"{results['n_runs_planned']} runs. Students: {students}.</p>"
            f"<p>Each heatmap cell is the harder-split accuracy gain of the row over <code>ce</code> and over the "
            f"best control of the grid ({', '.join(map(html.escape, controls)) or 'none run'}; the full study "
            f"adds shuffled examples and an untrained teacher), paired bootstrap over seeds and prompts; * marks "
            f"a 95% CI that excludes 0. Full output: <code>{GRID_DIR}/results.json</code>, "
            f"<code>{GRID_DIR}/report.html</code>.</p>")


def grid_sections(results: dict) -> list[str]:
    """The map's part of the demo report: a heading, ``grid_intro``, and the study's sections one level down."""
    return ["<h2>The map: where does alignment help? (warmth x trainable scope)</h2>", grid_intro(results),
            *study_sections(results, level=3)]
