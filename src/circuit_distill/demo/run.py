"""The demo's runner, a thin layer over the public API: load both models, discover and match once per
model, build one teacher cache, distil every (row, seed), compare, and write the results and report.

Every finished run is saved at once in ``runs.json``; rerunning the same demo into the same directory
skips the runs already there (kill it at any time and nothing is lost). Other settings into a
directory that holds runs are refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from ..analysis import Comparison, compare
from ..distill import DistillConfig, TeacherCache, build_cache, distill, pair_cka
from ..distill.iit import Interchange, cache_interchanges, pair_iia
from ..errors import CircuitDistillError, ConfigError
from ..files import atomic_write_json
from ..matching import discover_and_match
from ..model import load_model
from ..tasks import evaluate
from ..tasks.theory_of_mind import CASES
from .experiment import REPORT_ROW, DemoConfig, demo_rows
from .grid import check_grid, grid_summary, run_grid
from .report import write_demo_report
from .tables import format_table, summarise_rows

RUNS = "runs.json"
SETTINGS = "demo_config.json"
REPORT_COMPARISON = "comparison_after.json"


def finite_or_none(x):
    """``x`` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_none(v) for v in x]
    return x


def finished_runs(out: Path, cfg: DemoConfig, overwrite: bool = False) -> list[dict]:
    """The runs an earlier demo with the same settings saved in ``out`` (none if ``overwrite``).

    Settings that differ from those of the saved runs are a ``ConfigError``: continuing would mix two
    experiments in one table."""
    runs_path, settings_path = out / RUNS, out / SETTINGS
    if overwrite or not runs_path.exists():
        for stale in (runs_path, out / REPORT_COMPARISON):
            stale.unlink(missing_ok=True)
        atomic_write_json(settings_path, cfg.to_dict())
        return []
    now = cfg.run_settings()  # (the grid's settings are checked by the study runner: they do not change these runs)
    saved = json.loads(settings_path.read_text()) if settings_path.exists() else None
    if saved is not None:  # a setting added since those runs was, for them, at its default
        saved = {k: v for k, v in {**DemoConfig().run_settings(), **saved}.items() if k in now}
    if saved != now:
        diff = sorted(k for k in now if saved is None or saved.get(k) != now[k])
        raise ConfigError(f"{out} holds runs of a demo with other settings (differs in: {', '.join(diff) or 'unknown'}); "
                          "rerun with the same settings to continue, pass --overwrite to start again, or use another --out")
    atomic_write_json(settings_path, cfg.to_dict())  # (the grid's settings may have changed)
    return json.loads(runs_path.read_text())


def load_pair(cfg: DemoConfig, log=print):
    """The teacher and the untrained student; they must share one tokenizer."""
    teacher, student = load_model(cfg.teacher), load_model(cfg.student)
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise CircuitDistillError("the demo's teacher and student must share one tokenizer")
    log(f"teacher {cfg.teacher}: {teacher.arch.n_layers} layers x {teacher.arch.n_heads} heads, "
        f"{teacher.n_params:,} params; student {cfg.student}: {student.arch.n_layers} x {student.arch.n_heads}, "
        f"{student.n_params:,} params")
    return teacher, student


def accuracies(model, eval_sets: dict) -> dict[str, float]:
    return {k: evaluate(model, td, progress=False)["accuracy"] for k, td in eval_sets.items()}


def case_accuracies(acc: dict) -> dict[str, float]:
    """``acc_<case>`` for each theory-of-mind case among the held-out sets of ``acc`` (set -> accuracy)."""
    return {f"acc_{c}": acc[c] for c in CASES if c in acc}


def teacher_cache(teacher, train, heads, positions: str, path: Path) -> TeacherCache:
    """One cache of the teacher circuit's heads over the training prompts, shared by every row."""
    build_cache(teacher, train, heads, positions, path)
    return TeacherCache.load(path)


def accuracy_curve(history: list[dict], start: dict, final: dict, steps: int) -> list[dict]:
    """``[{step, acc, acc_hard}]``: before training, every evaluation of ``history``, and the end."""
    pts = [{"step": 0, "acc": start["eval"], "acc_hard": start["hard"]}]
    pts += [{"step": h["step"], "acc": h["eval/eval/accuracy"], "acc_hard": h.get("eval/hard/accuracy")}
            for h in history if "eval/eval/accuracy" in h]
    return pts + [{"step": steps, "acc": final["eval"]["accuracy"], "acc_hard": final["hard"]["accuracy"]}]


def run_row(cfg: DemoConfig, row: str, spec: tuple[str, str, str], seed: int, ctx: dict) -> tuple[dict, Comparison]:
    """Distil a fresh student for one (row, seed) and measure it: accuracies, the mean CKA of the
    paper's pairs, the alignment score A; returns the run record and the comparison."""
    objective, map_key, subset, extra = spec
    student = load_model(cfg.student)
    dc = DistillConfig(objective=objective, seed=seed, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                       warmup=cfg.warmup, lam=cfg.lam, positions=cfg.positions, trainable=subset,
                       train_kv=cfg.train_kv and subset == "matched_heads",
                       eval_every=cfg.eval_every, labels="teacher", use_cache=True, **extra)
    res = distill(student, ctx["data"]["train"], teacher=None, eval_sets=ctx["eval_sets"],
                  component_map=ctx["maps"][map_key], config=dc, cache=ctx["cache"], progress=False)
    ckas = pair_cka(student, ctx["maps"]["ablation"].pairs, ctx["data"]["eval"], cfg.positions,
                    teacher=ctx["teacher"], n=128)
    cmp = compare(ctx["teacher"], student, ctx["data"]["discovery"], n_boot=200, progress=False,
                  teacher_sweep=ctx["teacher_sweep"])
    record = {
        "row": row, "seed": seed, "objective": objective, "matching": map_key, "trainable": subset,
        "acc": res.final_eval["eval"]["accuracy"], "acc_hard": res.final_eval["hard"]["accuracy"],
        "pair_cka_after": sum(ckas) / len(ckas) if ckas else math.nan, "alignment_after": float(cmp.alignment),
        "trained_param_fraction": res.trained_fraction, "trained_params": res.trained_params,
        "curve": accuracy_curve(res.history, ctx["student_acc"], res.final_eval, res.steps),
        **case_accuracies(accuracies(student, ctx["case_sets"])),
    }
    if cfg.iit_rows:
        record["iia_after"] = mean_iia(student, ctx)
    return record, cmp


def mean_iia(student, ctx: dict) -> float:
    """Mean interchange intervention accuracy of the paper's pairs on the evaluation prompts (teacher online)."""
    iia = pair_iia(student, ctx["maps"]["ablation"].pairs, ctx["data"]["eval"], teacher=ctx["teacher"],
                   setting=Interchange())
    return sum(iia) / len(iia) if iia else math.nan


def cache_iit_targets(cache: TeacherCache, teacher, train, heads) -> None:
    """The teacher's intervened answers on the training prompts, for every IIT row's interventions (each
    teacher circuit head alone, with corrupted and with self sources), so training runs no teacher forward."""
    for setting in (Interchange(), Interchange("self")):
        cache_interchanges(cache, teacher, train, [[h] for h in heads], setting)


_JOB: dict = {}  # what a forked worker of ``train_rows`` inherits: the config, the rows and the context


def _run_job(job: tuple[str, int]) -> tuple[dict, dict | None]:
    """One (row, seed) in a worker process: the run record, and the comparison if the report needs it."""
    row, seed = job
    cfg, rows, ctx = _JOB["cfg"], _JOB["rows"], _JOB["ctx"]
    record, cmp = run_row(cfg, row, rows[row], seed, ctx)
    return record, (cmp.to_dict() if row == REPORT_ROW and seed == cfg.seeds[0] else None)


def _init_worker() -> None:
    torch.set_num_threads(1)


def _results(cfg: DemoConfig, rows: dict, ctx: dict, todo: list[tuple[str, int]]):
    """Yield ``(record, comparison dict or None)`` for every job of ``todo``, in ``cfg.jobs`` forked processes
    (one torch thread each; every run is seeded, so the records do not depend on the process) or here."""
    _JOB.update(cfg=cfg, rows=rows, ctx=ctx)
    if cfg.jobs < 2 or len(todo) < 2:
        yield from map(_run_job, todo)
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(min(cfg.jobs, len(todo)), initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_run_job, todo)


def train_rows(cfg: DemoConfig, rows: dict, ctx: dict, out: Path, runs: list[dict], progress: bool, log) -> Comparison | None:
    """Every (row, seed) not in ``runs``, each saved to ``runs.json`` as it finishes (``cfg.jobs`` at a time);
    returns the comparison of the report row's first seed (``None`` if it cannot be found)."""
    from tqdm.auto import tqdm

    done = {(r["row"], r["seed"]) for r in runs}
    todo = [(row, seed) for seed in cfg.seeds for row in rows if (row, seed) not in done]
    if done:
        log(f"continuing: {len(done)} finished runs in {out / RUNS} are kept, {len(todo)} to go")
    report_path = out / REPORT_COMPARISON
    bar = tqdm(total=len(todo), desc=f"demo runs ({min(cfg.jobs, max(1, len(todo)))} at a time)", disable=not progress)
    for record, cmp in _results(cfg, rows, ctx, todo):
        bar.set_postfix_str(f"{record['row']} seed {record['seed']}")
        if cmp is not None:
            atomic_write_json(report_path, finite_or_none(cmp))
        runs.append(record)
        atomic_write_json(out / RUNS, finite_or_none(runs), default=float)  # nothing lost if interrupted
        bar.update()
    bar.close()
    return Comparison.from_dict(json.loads(report_path.read_text())) if report_path.exists() else None


def run_demo(cfg: DemoConfig, out: str | os.PathLike = "runs/demo", *, progress: bool = True, log=print,
             overwrite: bool = False) -> dict:
    """Run the whole demo and write ``results.json`` and ``report.html`` into ``out``; return the results."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_grid(cfg, out, overwrite)
    runs = finished_runs(out, cfg, overwrite)
    torch.manual_seed(cfg.data_seed)
    teacher, student0 = load_pair(cfg, log)
    data = cfg.make_data(teacher.tokenizer)
    ev = {"eval": data["eval"], "hard": data["hard"]}
    case_sets = {c: data[c] for c in CASES if c in data}  # measured before and after training, not on the curves
    t_acc, s_acc = accuracies(teacher, {**ev, **case_sets}), accuracies(student0, {**ev, **case_sets})
    log(f"teacher accuracy {t_acc['eval']:.3f} / {t_acc['hard']:.3f} ({cfg.held_out()}); "
        f"student before {s_acc['eval']:.3f} / {s_acc['hard']:.3f}")
    log("discovering circuits and matching components")
    found = discover_and_match(teacher, student0, data["discovery"], circuit=cfg.circuit, top_k=cfg.circuit_top_k,
                               threshold=cfg.circuit_threshold, kinds=("head", "mlp"), log=log)
    cmp_before = compare(teacher, student0, data["discovery"], n_boot=200, progress=False,
                         teacher_sweep=found.teacher.sweep, student_sweep=found.student.sweep)
    log(f"alignment score A before distillation: {float(cmp_before.alignment):.3f}")
    ctx = {"teacher": teacher, "data": data, "eval_sets": ev, "case_sets": case_sets, "maps": found.maps,
           "student_acc": s_acc,
           "teacher_sweep": cmp_before.teacher_sweep,
           "cache": teacher_cache(teacher, data["train"], found.teacher.circuit.components, cfg.positions,
                                  out / "teacher_cache")}
    rows = demo_rows(cfg, found.maps)
    if cfg.iit_rows:
        cache_iit_targets(ctx["cache"], teacher, data["train"], found.teacher.circuit.components)
    cmp_after = train_rows(cfg, rows, ctx, out, runs, progress, log)
    grid = run_grid(cfg, out, overwrite=overwrite, progress=progress, log=log) if cfg.grid else None
    summary = summarise_rows(runs)
    results = {
        "rows": {r: summary[r] for r in rows},
        "task": cfg.task, "held_out": cfg.held_out(),
        "teacher": {"acc": t_acc["eval"], "acc_hard": t_acc["hard"], **case_accuracies(t_acc), "model": cfg.teacher,
                    "params": teacher.n_params},
        "student_before": {"acc": s_acc["eval"], "acc_hard": s_acc["hard"], **case_accuracies(s_acc),
                           "alignment": float(cmp_before.alignment),
                           "model": cfg.student, "params": student0.n_params,
                           **({"iia": mean_iia(student0, ctx)} if cfg.iit_rows else {})},
        "circuits": {side: {"components": [str(c) for c in d.circuit.components], "faithfulness": d.circuit.faithfulness}
                     for side, d in (("teacher", found.teacher), ("student", found.student))},
        "maps": {k: m.to_dict() for k, m in found.maps.items()},
        "seeds": list(cfg.seeds),
        "config": cfg.to_dict(),
        **({"grid": grid_summary(grid)} if grid is not None else {}),
        "runtime_s": time.perf_counter() - t0,
    }
    atomic_write_json(out / "results.json", finite_or_none(results), default=float)
    log("\n" + format_table(results["rows"]))
    write_demo_report(results, out, cmp_before=cmp_before, cmp_after=cmp_after, grid=grid)
    log(f"\nwrote {out / 'results.json'} and {out / 'report.html'} in {results['runtime_s']:.0f}s")
    return results
