"""The study's runner: distil one run (``run_one``) and the whole grid (``run_study``), every run saved as it
finishes (``runs/<run id>.json``, written atomically), so a rerun of the same study skips the runs already
there and an interrupted one loses at most the runs under way. A directory holding runs made with other run
settings is refused unless ``overwrite=True``; the grid's extent (more seeds, fewer rows, ...) may change,
every finished run stays valid. ``jobs > 1`` runs that many worker processes, which take runs from the
same list (a run is claimed by creating ``runs/<run id>.claim``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from ..distill import DistillConfig, distill, pair_cka
from ..distill.iit import Interchange, cache_interchanges, pair_iia, teacher_head_sets
from ..distill.objectives import get_objective
from ..distill.pairs import choose_pairs
from ..errors import ConfigError
from ..files import atomic_write_json
from .answers import correct_answers, to_bits
from .config import LATER_KEYS, SCOPES, StudyConfig
from .context import StudyContext
from .grid import RunKey, study_runs
from .transfer import transfer_check

RUNS = "runs"
SETTINGS = "study_config.json"
CLAIM = ".claim"


def finite_or_none(x):
    """``x`` with every NaN/inf float replaced by None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


def curve_of(history: list[dict], start: dict, final: dict, steps: int) -> list[dict]:
    """``[{step, acc, acc_hard}]`` on the curve sets: before training, every evaluation, and the end."""
    pts = [{"step": 0, "acc": start["acc_curve"], "acc_hard": start["acc_hard_curve"]}]
    pts += [{"step": h["step"], "acc": h["eval/eval/accuracy"], "acc_hard": h["eval/hard/accuracy"]}
            for h in history if "eval/eval/accuracy" in h and not h.get("final")]
    return pts + [{"step": steps, "acc": final["eval"]["accuracy"], "acc_hard": final["hard"]["accuracy"]}]


def steps_to(curve: list[dict], targets: list[float]) -> dict[str, int | None]:
    """The first step of ``curve`` whose harder-split accuracy reaches each target (None: never)."""
    return {str(t): next((p["step"] for p in curve if p["acc_hard"] >= t), None) for t in targets}


def distill_config(cfg: StudyConfig, key: RunKey) -> DistillConfig:
    """The ``DistillConfig`` of run ``key``: the study's shared settings, the row's objective and targets,
    the scope's trainable subset, the cell's positions (a row without alignment or interventions reads the
    first positions' cache for its CE labels; its training does not depend on them); a row with interventions
    also the study's ``iit_*`` settings, intervening at the cell's positions (its own counterpart if a sanity row)."""
    row = cfg.row_specs()[key.row]
    subset, train_kv = SCOPES[key.trainable]
    positions = key.positions if row.positioned else cfg.positions[0]
    iit = ({"iit_counterpart": row.counterpart or cfg.iit_counterpart, "iit_positions": key.positions,
            "iit_pairs": cfg.iit_pairs, "iit_loss": cfg.iit_loss, "iit_lam": cfg.iit_lam} if row.uses_iit else {})
    return DistillConfig(objective=row.objective, seed=key.seed, steps=cfg.steps, batch_size=cfg.batch_size,
                         lr=cfg.lr, warmup=cfg.warmup, lam=cfg.lam, positions=positions, trainable=subset,
                         train_kv=train_kv, eval_every=cfg.eval_every, labels="teacher", use_cache=True,
                         align_targets=row.align_targets, **iit)


def add_interventions(ctx: StudyContext, key: RunKey, dc: DistillConfig, cache) -> None:
    """For a row with interventions: add to ``cache`` (kept in memory for the next runs) the teacher's intervened
    answer logits of every training prompt for the teacher heads run ``key`` intervenes on (its map's, or its
    seeded random pairs'), so training runs no teacher forward."""
    row, warm = ctx.cfg.row_specs()[key.row], ctx.student(key.warmth)
    cmap = choose_pairs(get_objective(dc.objective), warm.found.maps[row.map_key], dc, cache=cache)
    cache_interchanges(cache, ctx.teacher, ctx.data["train"], teacher_head_sets(list(cmap.pairs), dc.iit_pairs),
                       Interchange.of(dc), batch_size=dc.eval_batch_size, save=False)


def matched_iia(ctx: StudyContext, model, pairs: list) -> dict:
    """``{mean, pairs}``: the IIA of each of ``pairs`` (``distill.iit.pair_iia``: each pair intervened alone at
    every position, the study's ``iit_counterpart`` as the source, teacher online) over the discovery prompts."""
    iias = pair_iia(model, pairs, ctx.data["discovery"], teacher=ctx.teacher, n=ctx.cfg.n_discovery,
                    setting=Interchange(counterpart=ctx.cfg.iit_counterpart))
    return {"mean": sum(iias) / len(iias) if iias else math.nan, "pairs": iias}


def iia_fields(ctx: StudyContext, key: RunKey, warm, student, ref: list, res) -> dict:
    """The run record's IIA fields: with ``iia``, of the paper's pairs before (the warm student) and after;
    for a row with interventions also its interchange counterpart and the last logged IIA of its own pairs
    on its training interventions (``iia_own_after``; the random pairs for the control)."""
    out = {}
    if ctx.cfg.iia:
        before, after = matched_iia(ctx, warm.model, ref), matched_iia(ctx, student, ref)
        out.update(iia_before=before["mean"], iia_after=after["mean"], iia_pairs_before=before["pairs"],
                   iia_pairs_after=after["pairs"])
    if ctx.cfg.row_specs()[key.row].uses_iit:
        logged = [h["eval/iia"] for h in res.history if "eval/iia" in h]
        out.update(iit_counterpart=distill_config(ctx.cfg, key).iit_counterpart,
                   iia_own_after=logged[-1] if logged else None)
    return out


def run_one(ctx: StudyContext, key: RunKey) -> dict:
    """Distil a fresh copy of ``key.warmth``'s student for run ``key`` and measure it: accuracies with the
    per-prompt correctness, the curve, the mean CKA of the paper's pairs, and the transfer check."""
    t0, c0 = time.perf_counter(), time.process_time()
    cfg, row, warm = ctx.cfg, ctx.cfg.row_specs()[key.row], ctx.student(key.warmth)
    dc = distill_config(cfg, key)
    student, cache = warm.fresh_copy(), ctx.cache(dc.positions, row.teacher)
    if row.uses_iit:
        add_interventions(ctx, key, dc, cache)
    res = distill(student, ctx.data["train"], teacher=None, eval_sets=ctx.curve_sets,
                  component_map=warm.found.maps[row.map_key], config=dc, cache=cache, progress=False)
    t_train = time.perf_counter() - t0
    student.hf.eval()
    ok = {name: correct_answers(student, ctx.data[name]) for name in ("eval", "hard")}
    ref = list(warm.found.maps["ablation"].pairs)
    own = list(res.component_map.pairs) if res.component_map is not None else ref
    check = transfer_check(ctx.teacher, student, ctx.data["discovery"], ctx.teacher_side, ctx.teacher_sweep,
                           {"role": ref, "role_own": own})
    ckas = pair_cka(student, ref, ctx.data["discovery"], dc.positions, teacher=ctx.teacher, n=128)
    curve = curve_of(res.history, warm.before, res.final_eval, res.steps)
    return {
        **key.to_dict(), "id": key.id, "objective": row.objective, "pairing": row.pairing, "map": row.map_key,
        "align_targets": row.align_targets, "teacher": row.teacher,
        "acc": float(ok["eval"].mean()), "acc_hard": float(ok["hard"].mean()),
        "correct_eval": to_bits(ok["eval"]), "correct_hard": to_bits(ok["hard"]),
        "curve": curve, "steps_to": steps_to(curve, cfg.targets),
        "trained_params": res.trained_params, "trained_param_fraction": res.trained_fraction,
        "pair_cka_after": sum(ckas) / len(ckas) if ckas else math.nan, "pairs": [[str(s), str(t)] for s, t in own],
        **{f"{k}_after": v for k, v in check.items()}, **iia_fields(ctx, key, warm, student, ref, res),
        "train_seconds": t_train, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
    }


def check_settings(out: Path, cfg: StudyConfig) -> bool:
    """True if ``out`` holds runs; ``ConfigError`` if they were made with other run settings than ``cfg``'s
    (``StudyConfig.run_settings``) or another model for one of ``cfg``'s warmth levels. The grid's extent
    (seeds, rows, scopes, positions, warmth levels) and the analysis settings may change: the runs stay valid.
    A setting of ``LATER_KEYS`` missing from the saved ones counts as its default (runs saved before it existed)."""
    runs, settings = out / RUNS, out / SETTINGS
    if not (runs.is_dir() and any(runs.glob("*.json"))):
        return False
    saved = json.loads(settings.read_text()) if settings.exists() else {}
    now = json.loads(json.dumps(cfg.to_dict()))
    diff = sorted(k for k in cfg.run_settings()
                  if saved.get(k, cfg.later_default(k) if k in LATER_KEYS else None) != now[k])
    diff += [f"students.{w}" for w, m in now["students"].items() if saved.get("students", {}).get(w, m) != m]
    if diff:
        raise ConfigError(f"{out} holds runs of a study with other settings (differs in: {', '.join(diff)}); "
                          "rerun with the same settings to continue, pass --overwrite to start again, or use another --out")
    return True


def prepare_out(out: Path, cfg: StudyConfig, overwrite: bool) -> None:
    """Make ``out`` ready: with ``overwrite`` (or without runs) remove earlier runs and results, else check the
    settings suit the runs there (``check_settings``); write the settings; clear the claims an interrupted
    run left."""
    runs = out / RUNS
    if overwrite or not check_settings(out, cfg):
        if runs.is_dir():
            shutil.rmtree(runs)
        for stale in ("results.json", "report.html"):
            (out / stale).unlink(missing_ok=True)
    settings = cfg.to_dict()  # (the grid's extent may have changed; every warmth level's model stays recorded)
    if (out / SETTINGS).exists() and not overwrite:
        settings["students"] = {**json.loads((out / SETTINGS).read_text()).get("students", {}), **cfg.students}
    atomic_write_json(out / SETTINGS, settings)
    runs.mkdir(parents=True, exist_ok=True)
    for stale_claim in runs.glob("*" + CLAIM):
        stale_claim.unlink(missing_ok=True)


def claim(runs: Path, key: RunKey) -> bool:
    """Take run ``key`` for this process: False if it is finished or another process holds it."""
    if (runs / f"{key.id}.json").exists():
        return False
    try:
        os.close(os.open(runs / f"{key.id}{CLAIM}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def work(cfg: StudyConfig, out: Path, *, ctx: StudyContext | None = None, log=print, on_done=None,
         stop=None) -> int:
    """Run every unfinished, unclaimed run of the study into ``out/runs`` (the loop of one process; the shared
    parts ``ctx`` are built on the first run if not given); returns how many this process ran.
    ``on_done(record)`` is called after each one is saved; ``stop()`` (if given) before each run: True ends
    the loop (a worker whose parent died)."""
    runs, n = out / RUNS, 0
    for key in study_runs(cfg):
        if stop is not None and stop():
            break
        if not claim(runs, key):
            continue
        try:
            ctx = ctx or StudyContext(cfg, log)
            record = run_one(ctx, key)
            atomic_write_json(runs / f"{key.id}.json", finite_or_none(record))
        finally:
            (runs / f"{key.id}{CLAIM}").unlink(missing_ok=True)
        n += 1
        if on_done is not None:
            on_done(record)
    return n


def finished(out: Path, cfg: StudyConfig | None = None) -> dict[str, dict]:
    """Run id -> record of every run saved in ``out/runs`` (of ``cfg``'s grid only, if given)."""
    ids = None if cfg is None else {k.id for k in study_runs(cfg)}
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / RUNS).glob("*.json"))
            if ids is None or p.stem in ids}
