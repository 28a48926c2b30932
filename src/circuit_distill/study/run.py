"""``run_study``: the whole study into one directory: the runs (one process, or ``jobs`` worker processes
taking runs from one list), then ``results.json`` and ``report.html``. Kill it at any time and rerun the
same command: the finished runs are kept and only the rest are trained."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import CircuitDistillError
from ..files import atomic_write_json
from .config import StudyConfig
from .context import StudyContext
from .grid import study_runs
from .report import write_study_report
from .results import iit_protocol, summarise_study
from .runner import RUNS, check_settings, finished, finite_or_none, prepare_out, work

WORKER_CONFIG = "study_config.yaml"
DECISION_RULE = ("a row helps in a cell when the 95% CIs (paired bootstrap over seeds and evaluation prompts) of its "
                 "harder-split gain over ce and over every control (random pairs, shuffled examples, untrained "
                 "teacher) exclude 0 on the positive side; its mechanism transferred when the role similarity of the "
                 "paper's matched pairs rose and its gain in role similarity over the random and the shuffled control "
                 "has a CI above 0 (bootstrap over seeds)")


def worker_threads(cfg: StudyConfig, jobs: int) -> int:
    """torch threads of each of ``jobs`` processes: ``cfg.threads``, or the CPUs shared out (at least 1)."""
    return cfg.threads or max(1, (os.cpu_count() or 1) // jobs)


def run_workers(cfg: StudyConfig, out: Path, jobs: int, bar, log) -> None:
    """Start ``jobs`` worker processes (``circuit-distill study ... --worker``) on ``out`` and wait for them,
    moving ``bar`` as runs finish. A failing worker stops the others; its log's tail is the error."""
    cfg.to_yaml(out / WORKER_CONFIG)
    cmd = [sys.executable, "-m", "circuit_distill.cli", "study", str(out / WORKER_CONFIG), "--out", str(out),
           "--worker", "--threads", str(worker_threads(cfg, jobs))]
    logs = [out / f"worker-{k}.log" for k in range(jobs)]
    procs = []
    for path in logs:
        with open(path, "w") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT))
    log(f"{jobs} workers ({worker_threads(cfg, jobs)} threads each); logs in {out}/worker-*.log")
    ids = {k.id for k in study_runs(cfg)}
    seen = len(finished(out, cfg))
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(2.0)
            now = sum(p.stem in ids for p in (out / RUNS).glob("*.json"))
            bar.update(now - seen)
            seen = now
            failed = [k for k, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                tail = logs[failed[0]].read_text().strip().splitlines()[-3:]
                raise CircuitDistillError(f"study worker {failed[0]} failed: {' | '.join(tail)}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    for path in logs:  # every worker finished cleanly
        path.unlink(missing_ok=True)


def verdict(cells: list[dict]) -> str:
    """One paragraph: in how many cells each aligned row helps, transferred, and met the goal."""
    rows = [c for c in cells if c.get("helps") is not None]
    if not rows:
        return "No aligned row with ce and controls has finished runs yet."
    parts = []
    for name in dict.fromkeys(c["row"] for c in rows):
        rs = [c for c in rows if c["row"] == name]
        parts.append(f"{name}: helps in {sum(c['helps'] for c in rs)} of {len(rs)} cells, mechanism transferred in "
                     f"{sum(c['transferred'] for c in rs)}, goal met in {sum(c['goal_met'] for c in rs)}")
    return "; ".join(parts) + "."


def without_bits(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("correct_")}


def write_results(cfg: StudyConfig, out: Path, ctx: StudyContext | None = None, *, log=print,
                  runtime: float | None = None) -> dict:
    """Summarise every finished run of ``out`` into ``results.json`` and ``report.html``; return the results.
    ``runtime``: the wall time of the study command (None when only summarising). ``ConfigError`` if ``out``
    holds runs of other settings."""
    check_settings(out, cfg)
    runs = finished(out, cfg)
    ctx = ctx or StudyContext(cfg, log)
    before = {w: ctx.student(w).before for w in cfg.students}
    cells = summarise_study(cfg, runs, before)
    results = {
        "protocol": {**cfg.to_dict(), "decision_rule": DECISION_RULE, **iit_protocol(cfg), "n_eval_prompts": cfg.n_eval,
                     "primary_metric": f"accuracy on the harder split ({cfg.hard_boxes} boxes)"},
        "teacher": without_bits(ctx.teacher_record()),
        "students": {w: without_bits(b) for w, b in before.items()},
        "cells": cells, "verdict": verdict(cells),
        "goal_met": [{k: c[k] for k in ("warmth", "trainable", "positions", "row")} for c in cells if c.get("goal_met")],
        "n_runs": len(runs), "n_runs_planned": len(study_runs(cfg)),
        "run_seconds": sum(r["seconds"] for r in runs.values()), "runtime_s": runtime,
    }
    atomic_write_json(out / "results.json", finite_or_none(results))
    write_study_report(results, out)
    log(results["verdict"])
    log(f"wrote {out / 'results.json'} and {out / 'report.html'} ({len(runs)} of {len(study_runs(cfg))} runs)")
    return results


def run_study(cfg: StudyConfig, out: str | os.PathLike, *, jobs: int = 1, overwrite: bool = False,
              progress: bool = True, log=print) -> dict:
    """Run every unfinished run of the study ``cfg`` into ``out`` (``jobs`` processes), then write
    ``results.json`` and ``report.html``; return the results. See the module docstring."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_out(out, cfg, overwrite)
    total, done = len(study_runs(cfg)), len(finished(out, cfg))
    if done:
        log(f"continuing: {done} finished runs in {out / RUNS} are kept, {total - done} to go")
    bar = tqdm(total=total, initial=done, desc="study runs", disable=not progress, smoothing=0.05)
    ctx = None
    try:
        if jobs > 1:
            run_workers(cfg, out, jobs, bar, log)
        else:
            ctx = StudyContext(cfg, log)
            work(cfg, out, ctx=ctx, log=log, on_done=lambda r: (bar.update(1), bar.set_postfix_str(r["id"])))
    finally:
        bar.close()
    return write_results(cfg, out, ctx, log=log, runtime=time.perf_counter() - t0)
