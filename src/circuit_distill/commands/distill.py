"""``circuit-distill distill --config FILE.yaml [key=value ...] [--resume | --overwrite]``: train a student on a
teacher's circuit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    from ..config import config_help
    from ..distill.config import DistillConfig

    p = sub.add_parser("distill", help="circuit distillation: discover + match (unless a component map is given), "
                                       "then train the student",
                       epilog="config keys (YAML or key=value):\n" + config_help(DistillConfig),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (keys of circuit_distill.distill.config.DistillConfig)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-3 task_options.seq_len=16")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start again in an out_dir that holds a run "
                   "(its checkpoint is deleted, its files rewritten)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for key in ("teacher", "student", "task"):
        p.add_argument(f"--{key}", default=None, help=f"same as {key}=... (a config key)")
    p.set_defaults(func=run)


def discover_and_match(teacher, student, task_data, cfg, student_data=None):
    """Circuits of both models (top ``cfg.circuit_size`` heads by ablation) and their ``ComponentMap``; each
    model runs its own tokenization of the prompts (``student_data``, default ``task_data``)."""
    from ..discovery import ablation_sweep, find_circuit
    from ..matching import match

    student_data = task_data if student_data is None else student_data
    tc = find_circuit(teacher, task_data, top_k=cfg.circuit_size, progress=False).components
    sc = find_circuit(student, student_data, top_k=cfg.circuit_size, progress=False).components
    te = ablation_sweep(teacher, task_data, tc, progress=False).effect("answer_prob")
    se = ablation_sweep(student, student_data, sc, progress=False).effect("answer_prob")
    return match(te, se, tc, sc, method=cfg.matching, seed=cfg.seed)


def task_sets(cfg, teacher, student):
    """``(train, held, teacher_train, teacher_held)``: the student's training and held-out task data and, when
    the two models' vocabularies differ, the teacher's own tokenization of the same prompts (else None, None)."""
    from ..analysis import named_task_pair
    from ..tasks import make_task

    if teacher.tokenizer.get_vocab() == student.tokenizer.get_vocab():
        train = make_task(cfg.task, student.tokenizer, cfg.n_train, seed=cfg.seed, **cfg.task_options)
        held = make_task(cfg.task, student.tokenizer, cfg.n_eval, seed=cfg.seed + 10_000, **cfg.task_options)
        return train, held, None, None
    t_train, train = named_task_pair(cfg.task, teacher.tokenizer, student.tokenizer, cfg.n_train, seed=cfg.seed,
                                     **cfg.task_options)
    t_held, held = named_task_pair(cfg.task, teacher.tokenizer, student.tokenizer, cfg.n_eval,
                                   seed=cfg.seed + 10_000, **cfg.task_options)
    return train, held, t_train, t_held


def run(args) -> int:
    import torch
    from accelerate import PartialState

    from ..config import load_config
    from ..distill.config import DistillConfig
    from ..distill.objectives import get_objective
    from ..distill.state import CHECKPOINT, RUN_FILES, check_run_dir, load_run_checkpoint
    from ..distill.teacher import teacher_data_for
    from ..distill.trainer import distill
    from ..errors import ConfigError
    from ..matching import ComponentMap
    from ..model import load_model

    flags = [f"{k}={getattr(args, k)}" for k in ("teacher", "student", "task") if getattr(args, k)]
    cfg = load_config(DistillConfig, args.config, list(args.overrides) + flags)
    for k in ("teacher", "student", "task", "out_dir"):
        if not getattr(cfg, k):
            raise ConfigError(f"config key {k!r} is required for the distill command (set it in the YAML or as {k}=...)")
    cfg.check_train_size(cfg.n_train)
    out = Path(cfg.out_dir)
    # before any model work: refuse to destroy a run; a checkpoint to resume is read (safely) and checked
    check_run_dir([out / f for f in RUN_FILES], out / CHECKPOINT, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        load_run_checkpoint(out / CHECKPOINT, cfg)
    state = PartialState(cpu=not torch.cuda.is_available())  # before any other accelerate state
    # both models on this process's device (a GPU per process under accelerate launch); CKA and the
    # losses run in fp32 whatever the weights' dtype
    teacher = load_model(cfg.teacher, dtype=cfg.dtype, device=state.device, check=False)
    student = load_model(cfg.student, dtype=cfg.dtype, device=state.device, check=False)
    train, held, t_train, t_held = task_sets(cfg, teacher, student)
    if t_train is not None:  # refuse KD / teacher labels / positions=all across tokenizers before any sweep
        teacher_data_for(get_objective(cfg.objective), cfg, train, t_train)
    if cfg.component_map:
        cmap = ComponentMap.from_json(cfg.component_map)
    elif args.resume and (out / "component_map.json").exists():
        cmap = ComponentMap.from_json(out / "component_map.json")
    else:
        cmap = discover_and_match(teacher, student, train if t_train is None else t_train, cfg, train)
        if state.is_main_process:
            cmap.to_json(out / "component_map.json")
    res = distill(student, train, teacher=teacher, eval_sets={"held_out": held}, component_map=cmap, config=cfg,
                  out_dir=out, progress=not args.quiet, resume=args.resume, overwrite=args.overwrite,
                  teacher_data=t_train, teacher_eval_sets=None if t_held is None else {"held_out": t_held})
    if state.is_main_process:
        print(json.dumps({"objective": cfg.objective, "steps": res.steps, "trained_params": res.trained_params,
                          "trained_fraction": round(res.trained_fraction, 4), "final_eval": res.final_eval,
                          "mean_pair_cka": res.mean_pair_cka, "out_dir": str(out)}, indent=2))
    return 0
