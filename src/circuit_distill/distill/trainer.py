"""Circuit-distillation trainer on ``accelerate`` (METHOD.md §1, §4).

``distill(student, train, teacher=..., component_map=..., config=...)`` trains the student's
trainable subset on an objective (CE / KD / CKA alignment / interchange interventions of matched
heads, ``distill.iit``), with seeded batches, evaluation, ``metrics.jsonl``, atomic checkpoints,
bit-identical resume on CPU, a run manifest and the final student saved to ``out_dir/student``.

``distill`` is a short loop over named steps, each a public function: the pairs
(``pairs.choose_pairs``), the teacher source (``teacher.open_teacher_source``), the trainable subset
and resume (``state.start_training``, ``state.restore_state``), one training step (``train_step``,
whose micro-batches take their alignment rows from ``features.alignment_features``), evaluation
(``eval_record``) and the end of the run (``finish_run``).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from ..files import atomic_write_json
from ..matching import ComponentMap
from ..model.hooks import capture
from ..model.loading import quiet_transformers
from ..model.logits import answer_logits
from ..tasks.base import TaskData
from ..tasks.metrics import evaluate
from ..tasks.positions import task_positions
from .cache import TeacherCache
from .config import DistillConfig
from .features import Pair, alignment_features, pair_cka, shuffled_targets
from .iit import iia_record, iit_outputs, prepare_interchanges
from .objectives import Objective, get_objective, objective_loss
from .pairs import choose_pairs
from .state import (
    CHECKPOINT,
    RUN_FILES,
    DivergenceError,
    TrainState,
    batch_indices,
    check_finite_weights,
    check_run_dir,
    divergence_advice,
    load_run_checkpoint,
    precision_hint,
    restore_state,
    save_checkpoint,
    start_training,
)
from .teacher import TeacherSource, open_teacher_source


class NonFiniteLossError(DivergenceError):
    """The training loss became NaN/inf; the last good checkpoint (if any) is kept."""


@dataclass
class DistillResult:
    """What a run produced. ``history``: one dict per logged step/eval; ``final_eval``: per eval set
    ``{accuracy, answer_prob, logit_diff}``; ``pair_cka``: CKA of each (student, teacher) pair after training."""

    history: list[dict]
    final_eval: dict[str, dict[str, float]]
    trained_params: int
    trained_fraction: float
    pair_cka: list[float]
    mean_pair_cka: float
    component_map: ComponentMap
    steps: int
    out_dir: Path | None = None
    manifest: dict = field(default_factory=dict)


def distill(student, train: TaskData, *, teacher=None, eval_sets: dict[str, TaskData] | None = None,
            component_map: ComponentMap | None = None, config: DistillConfig, out_dir=None,
            progress: bool | None = None, resume: bool = False, overwrite: bool = False,
            cache: TeacherCache | None = None, teacher_data: TaskData | None = None,
            teacher_eval_sets: dict[str, TaskData] | None = None, stop=None) -> DistillResult:
    """Train ``student`` (a ``Model``) on ``train`` with ``config.objective`` and return a ``DistillResult``.

    - ``teacher``: a ``Model``; needed unless a teacher cache covers everything (``config.use_cache``
      builds one in ``out_dir/teacher_cache`` on first use, or pass ``cache``). Online teacher forwards
      run under ``no_grad``.
    - ``teacher_data``: when the teacher's tokenizer differs from the student's, its own tokenization of
      ``train``'s prompts, row for row (``analysis.named_task_pair``); the alignment then reads both models
      at the task's named positions, one row per prompt, and KD/IIT and teacher labels are refused
      (``distill.teacher.teacher_data_for``). ``teacher_eval_sets``: the same for ``eval_sets`` (by name;
      the pair CKA is measured on held-out prompts only with it, else on the cached training rows).
    - ``component_map``: student head -> teacher head pairs (required for alignment objectives and
      for ``trainable="matched_heads"``); ``random_cka`` objectives use a seeded random map instead.
    - ``eval_sets``: ``{name: TaskData}`` evaluated every ``config.eval_every`` steps and at the end.
    - ``out_dir`` (default ``config.out_dir``; None = no files): ``metrics.jsonl``, ``manifest.json``,
      ``checkpoint.pt`` (every ``config.checkpoint_every`` steps, atomic), ``student/``.
    - ``resume``: continue from ``out_dir/checkpoint.pt`` to the same final weights as an
      uninterrupted run; ``overwrite``: start again in an ``out_dir`` that holds a run (refused without
      one of them). ``stop(student, record) -> bool``: called after each evaluation (student in eval
      mode; it may add entries to the record before it is logged); True ends the run there, finished as
      usual (an early stop at a competence target). A NaN/inf loss raises ``NonFiniteLossError``,
      NaN/inf trained weights after a step a ``DivergenceError``; the last checkpoint (only ever written
      with finite weights) stays.
    """
    from accelerate import Accelerator

    cfg = config
    obj = get_objective(cfg.objective)
    out = Path(out_dir if out_dir is not None else cfg.out_dir) if (out_dir or cfg.out_dir) else None
    eval_sets = dict(eval_sets or {})
    cfg.check_train_size(len(train))
    saved = None
    if out is not None:  # before any model work: refuse to destroy a run, read the checkpoint safely
        check_run_dir([out / f for f in RUN_FILES], out / CHECKPOINT, resume=resume, overwrite=overwrite)
        saved = load_run_checkpoint(out / CHECKPOINT, cfg) if resume else None
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=not torch.cuda.is_available())
    cmap = choose_pairs(obj, component_map, cfg, teacher=teacher, cache=cache)
    pairs = list(cmap.pairs) if cmap is not None else []
    task_positions(train, cfg.positions)  # validates the name early
    source = open_teacher_source(obj, cfg, train, sorted({t for _, t in pairs}), teacher=teacher, cache=cache,
                                 out=out, accelerator=acc, teacher_data=teacher_data)
    source.eval_data = dict(teacher_eval_sets or {})
    prepare_interchanges(obj, cfg, source, pairs, acc)
    state = start_training(student, cfg, [s for s, _ in pairs], acc, out / CHECKPOINT if out is not None else None)
    if resume:
        restore_state(state, cfg, saved)
    manifest = run_manifest(student, obj, cmap, source, state, cfg)
    if out is not None and acc.is_main_process:
        state.metrics = start_run_files(out, manifest, state.history)
    pbar = progress_bar(cfg.steps, state.step, f"distill {obj.name}", progress, acc.is_main_process)
    state.model.train()
    try:
        while state.step < cfg.steps:
            rec, stopped = train_step(state, student, train, source, pairs, obj, cfg), False
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                rec.update(eval_record(student, eval_sets, pairs, source, cfg))
                if stop is not None:
                    stopped = rec["stopped"] = bool(stop(student, rec))
                state.model.train()
            state.log(rec)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k in ("total", "cka", "acc")})
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save_checkpoint(state, cfg)
            if stopped:
                break
    finally:
        if pbar is not None:
            pbar.close()
        if state.metrics is not None:
            state.metrics.close()
    return finish_run(state, student, eval_sets, pairs, source, cfg, manifest=manifest, component_map=cmap,
                      out=out, quiet=progress is False)


def train_step(state: TrainState, student, train: TaskData, source: TeacherSource, pairs: list[Pair],
               objective: Objective, cfg: DistillConfig) -> dict:
    """One optimisation step: ``cfg.grad_accum`` micro-batches (this process's share of each seeded batch,
    ``batch_indices``) through ``train_micro_batch``. Advances ``state.step`` and returns the step's record:
    ``{step, lr, <loss parts> (mean over micro-batches; over processes under DDP), step_seconds}``."""
    acc = state.accelerator
    t_step = time.perf_counter()
    parts_sum: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        idx_all = batch_indices(len(train), cfg.batch_size, state.step * cfg.grad_accum + micro, cfg.seed)
        idx = idx_all[acc.process_index::acc.num_processes]
        parts = train_micro_batch(state, student, train, idx, source, pairs, objective, cfg)
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / cfg.grad_accum
    if acc.num_processes > 1 and parts_sum:  # log the global-batch mean, not rank 0's share
        keys = list(parts_sum)
        vals = acc.reduce(torch.tensor([parts_sum[k] for k in keys], device=acc.device), "mean")
        parts_sum = dict(zip(keys, vals.tolist()))
    state.step += 1
    check_finite_weights(state, cfg)  # reads the trained tensors only: the results are unchanged
    # wall time of the optimisation step (batches, forward, losses, backward, update; not the evaluation)
    return {"step": state.step, "lr": state.scheduler.get_last_lr()[0], **parts_sum,
            "step_seconds": time.perf_counter() - t_step}


def train_micro_batch(state: TrainState, student, train: TaskData, idx: torch.Tensor, source: TeacherSource,
                      pairs: list[Pair], objective: Objective, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """Forward, loss, backward and (every ``grad_accum``-th call, through ``accelerate``) the update on the
    training rows ``idx``; returns the loss parts. ``NonFiniteLossError`` before a NaN/inf loss is applied."""
    acc, device = state.accelerator, state.accelerator.device
    b = train.clean.subset(idx).to(device)
    last = train.positions["last"][idx].to(device)
    pos = task_positions(train, cfg.positions, idx)
    with acc.accumulate(state.model):
        with capture(student, [s for s, _ in pairs]) as cap:  # unembedding at the answer position only
            s_logits = answer_logits(student, b.input_ids, b.attention_mask, last, module=state.model)
        t_logits, t_acts = None, {}
        if source.needed:
            t_acts, t_logits = source.outputs(idx)
            t_logits = t_logits.to(device)
        s_feats = t_feats = None
        if objective.uses_align:
            if cfg.align_targets == "shuffled":  # the control: another prompt's teacher rows (seeded per step)
                t_acts = shuffled_targets(t_acts, b.attention_mask, cfg.seed * 1_000_003 + state.step)
            s_feats, t_feats = alignment_features(cap, t_acts, b.attention_mask, pos, pairs, device)
        labels = (t_logits.argmax(-1) if cfg.labels == "teacher" and t_logits is not None
                  else train.answer_ids[idx].to(device))
        s_iit, t_iit = (iit_outputs(student, state.model, train, idx, source, pairs, cfg, state.step, cap)
                        if objective.uses_iit else (None, None))
        loss, parts = objective_loss(objective, student_logits=s_logits, labels=labels, teacher_logits=t_logits,
                                     student_feats=s_feats, teacher_feats=t_feats, lam=cfg.lam,
                                     temperature=cfg.temperature, debiased=cfg.debiased,
                                     distributed=acc.num_processes > 1, student_iit_logits=s_iit,
                                     teacher_iit_logits=t_iit, iit_lam=cfg.iit_lam, iit_loss=cfg.iit_loss)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(
                f"non-finite loss {float(loss.detach())} at step {state.step + 1} "
                f"({', '.join(f'{k}={float(v):.4g}' for k, v in parts.items())}); " + divergence_advice(
                    cfg.lr, cfg.warmup, state.checkpoint, precision_hint(cfg, state.trainable.parameters())))
        acc.backward(loss / 1.0)
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    return parts


def trained_pair_cka(student, eval_sets: dict[str, TaskData], pairs: list[Pair], source: TeacherSource,
                     cfg: DistillConfig) -> list[float]:
    """``pair_cka`` of the run's pairs on held-out data (the first eval set, teacher online; across tokenizers
    only with the teacher's tokenization of that set) if there is a teacher and an eval set, else on the
    cached training rows, else ``[]``."""
    n, kw = cfg.eval_batch_size, {"debiased": cfg.debiased}
    name, td = next(iter(eval_sets.items()), (None, None))
    theirs = source.eval_data.get(name) if source.across_tokenizers else None
    if source.teacher is not None and td is not None and (theirs is not None or not source.across_tokenizers):
        return pair_cka(student, pairs, td, cfg.positions, teacher=source.teacher, n=n, teacher_data=theirs, **kw)
    if source.cache is not None:
        return pair_cka(student, pairs, source.train, cfg.positions, cache=source.cache, n=n, **kw)
    return []


def eval_record(student, eval_sets: dict[str, TaskData], pairs: list[Pair], source: TeacherSource,
                cfg: DistillConfig) -> dict:
    """``{eval/<set>/<metric>: value, eval/pair_cka: mean}`` of the student now (left in eval mode)."""
    student.hf.eval()
    rec = {}
    for name, td in eval_sets.items():
        for m, v in evaluate(student, td, batch_size=cfg.eval_batch_size, progress=False).items():
            rec[f"eval/{name}/{m}"] = v
    ckas = trained_pair_cka(student, eval_sets, pairs, source, cfg)
    if ckas:
        rec["eval/pair_cka"] = sum(ckas) / len(ckas)
    if get_objective(cfg.objective).uses_iit:
        rec.update(iia_record(student, eval_sets, pairs, source, cfg))
    return rec


def finish_run(state: TrainState, student, eval_sets: dict[str, TaskData], pairs: list[Pair],
               source: TeacherSource, cfg: DistillConfig, *, manifest: dict, component_map: ComponentMap | None,
               out: Path | None = None, quiet: bool = False) -> DistillResult:
    """The end of a run: drop the trainable subset's hooks, evaluate every eval set and the pair CKA, log
    the final record, complete ``manifest.json``, save the student to ``out/student`` (main process) and
    return the ``DistillResult``."""
    acc, info = state.accelerator, state.trainable
    info.remove()
    state.model.eval()
    final = {name: evaluate(student, td, batch_size=cfg.eval_batch_size, progress=False)
             for name, td in eval_sets.items()}
    ckas = trained_pair_cka(student, eval_sets, pairs, source, cfg)
    rec = {"step": state.step, "final": True, **{f"eval/{k}/{m}": v for k, d in final.items() for m, v in d.items()}}
    if ckas:
        rec["eval/pair_cka"] = sum(ckas) / len(ckas)
    if get_objective(cfg.objective).uses_iit:
        rec.update(iia_record(student, eval_sets, pairs, source, cfg))
    state.history.append(rec)
    if out is not None and acc.is_main_process:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        manifest.update(final_eval=final, pair_cka=ckas, steps=state.step)
        atomic_write_json(out / "manifest.json", manifest, default=str)
        with quiet_transformers() if quiet else contextlib.nullcontext():
            acc.unwrap_model(state.model).save_pretrained(out / "student")
        if getattr(student, "tokenizer", None) is not None:
            student.tokenizer.save_pretrained(out / "student")
    acc.wait_for_everyone()
    return DistillResult(history=state.history, final_eval=final, trained_params=info.count,
                         trained_fraction=info.fraction, pair_cka=ckas,
                         mean_pair_cka=sum(ckas) / len(ckas) if ckas else math.nan, component_map=component_map,
                         steps=state.step, out_dir=out, manifest=manifest)


def versions() -> dict:
    """Versions of Python, torch, transformers, accelerate and circuit-distill (for the manifest)."""
    import transformers

    from ..version import __version__ as cd_version

    try:
        import accelerate
        acc = accelerate.__version__
    except ImportError:  # pragma: no cover
        acc = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": acc, "circuit_distill": cd_version}


def run_manifest(student, objective: Objective, component_map: ComponentMap | None, source: TeacherSource,
                 state: TrainState, cfg: DistillConfig) -> dict:
    """What defines the run (``manifest.json``): versions, seed, config, objective, map, trainable subset."""
    info, cache = state.trainable, source.cache
    return {"versions": versions(), "seed": cfg.seed, "config": cfg.to_dict(),
            "objective": objective.to_dict(),
            "component_map": component_map.to_dict() if component_map is not None else None,
            "trainable": {"subset": cfg.trainable, "count": info.count, "total": info.total,
                          "fraction": info.fraction}, "num_processes": state.accelerator.num_processes,
            "teacher": getattr(source.teacher, "name", None), "student": getattr(student, "name", None),
            "across_tokenizers": source.across_tokenizers,
            "teacher_cache": str(cache.path) if cache is not None and cache.path else None}


def start_run_files(out: Path, manifest: dict, history: list[dict]) -> IO:
    """Write ``out/manifest.json`` and ``out/metrics.jsonl`` (the ``history`` so far: the checkpoint's on
    resume); return ``metrics.jsonl`` open for appending."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "manifest.json", manifest, default=str)
    with open(out / "metrics.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    return open(out / "metrics.jsonl", "a")


def progress_bar(total: int, initial: int, desc: str, progress: bool | None, is_main: bool):
    """A tqdm bar (None if ``progress`` is False; None = shown on the main process only)."""
    from tqdm.auto import tqdm

    if progress is False:
        return None
    return tqdm(total=total, initial=initial, disable=not is_main if progress is None else False, desc=desc,
                leave=False)
