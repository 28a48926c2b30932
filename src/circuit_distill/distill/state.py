"""The state of a training run and the resume step: the seeded batch order, the trainable subset with
its optimizer and schedule, and the checkpoint that saves and restores all of it.

A checkpoint (``checkpoint.pt``, written atomically) holds the trained parameters, the optimizer and
scheduler states, the torch RNG state, the step, the history and the config, so a resumed run ends
with the same weights as an uninterrupted one. Checkpoint files hold only tensors, numbers, strings,
lists and dicts and are read with ``weights_only=True`` (``read_checkpoint``): a received file cannot
run code. A checkpoint is never written with non-finite weights (``write_checkpoint``), so the last
checkpoint of a run that diverged is a good one. ``check_run_dir`` keeps a new run from overwriting an
old one unless asked (``--resume`` / ``--overwrite``). The same helpers serve ``training.tiny``.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from ..errors import CircuitDistillError, ConfigError
from ..files import atomic_write
from ..model.components import Component
from .config import DistillConfig
from .trainable import TrainableInfo, set_trainable

CHECKPOINT = "checkpoint.pt"
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "manifest.json", "student")  # what a distill run leaves in out_dir
CHECKPOINT_KEYS = ("params", "optimizer", "scheduler", "rng", "step", "history", "config")


class CheckpointError(ConfigError):
    """A checkpoint is missing, unreadable, unsafe to load or holds non-finite weights."""


class DivergenceError(CircuitDistillError):
    """Training produced NaN/inf (in the loss or the trained weights); nothing non-finite was saved."""


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
    """Example indices of micro-batch ``micro_step`` (epochs of seeded permutations; stateless, so resume is exact)."""
    start = micro_step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, off = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[off:off + batch_size - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


def warmup_factor(step: int, warmup: int) -> float:
    """Learning-rate multiplier at ``step``: linear warmup over ``warmup`` steps (0 = none), then 1."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


@dataclass
class TrainState:
    """A run's moving parts: the ``accelerator``, the prepared ``model`` (the student's HF module),
    ``optimizer`` and ``scheduler``, the ``trainable`` subset, the ``checkpoint`` path (None = none),
    the ``step`` done, the ``history`` of records and the open ``metrics`` file (None = none)."""

    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    trainable: TrainableInfo
    checkpoint: Path | None = None
    step: int = 0
    history: list[dict] = field(default_factory=list)
    metrics: IO | None = None

    def log(self, rec: dict) -> None:
        """Append ``rec`` to the history and to ``metrics.jsonl``."""
        self.history.append(rec)
        if self.metrics is not None:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()


def start_training(student, cfg: DistillConfig, student_heads: list[Component], accelerator,
                   checkpoint: Path | None = None) -> TrainState:
    """Seed torch with ``cfg.seed``, make ``cfg.trainable`` of ``student`` trainable (``student_heads`` for
    ``matched_heads``), build AdamW with the warmup schedule and prepare them with ``accelerator``."""
    torch.manual_seed(cfg.seed)
    info = set_trainable(student, cfg.trainable, heads=student_heads or None, train_kv=cfg.train_kv)
    params = info.parameters()
    if not params:
        raise ConfigError(f"trainable={cfg.trainable!r} selected no parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = cfg.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, warm))
    hf, opt, sched = accelerator.prepare(student.hf, opt, sched)
    if info.masks and any(m is not None for m in info.masks.values()):
        info.attach(opt.optimizer if hasattr(opt, "optimizer") else opt)
    return TrainState(accelerator, hf, opt, sched, info, checkpoint)


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors of ``named`` (``(name, tensor)`` pairs) that hold a NaN or an inf; reads only
    (one device sync for all of them)."""
    named = list(named)
    if not named:
        return []
    flags = [t.detach().isfinite().all() for _, t in named]
    ok = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return [n for (n, _), good in zip(named, ok) if not good]


def read_checkpoint(path: Path, keys: Iterable[str]) -> dict:
    """The dict saved in the checkpoint file ``path``, loaded with ``torch.load(weights_only=True)``: only
    tensors, numbers, strings, lists and dicts come back, nothing in the file can run code.
    ``CheckpointError`` (one line) if the file is truncated or corrupt, holds other objects, or lacks ``keys``."""
    redo = "delete it, or start again with --overwrite"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(f"{path} holds objects other than tensors, numbers, strings, lists and dicts; "
                                  f"it was not loaded (loading it could run code): {redo}") from None
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}): {redo}") from None
    except Exception as e:  # a torch.load of a damaged file raises many kinds (RuntimeError, EOFError, ...)
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}): {redo}") from None
    missing = [k for k in keys if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this command (no {', '.join(missing)}): {redo}")
    return saved


def write_checkpoint(path: Path, saved: dict, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """``torch.save(saved)`` to ``path`` atomically, after checking that the weights ``named`` are finite:
    ``DivergenceError`` (nothing written, the previous checkpoint kept) if not."""
    bad = nonfinite_names(named)
    if bad:
        raise DivergenceError(f"refusing to write {path}: {len(bad)} tensor(s) hold NaN/inf (first: {bad[0]}); "
                              "the previous checkpoint is kept")
    atomic_write(path, lambda tmp: torch.save(saved, tmp))


def check_run_dir(results: Iterable[Path], checkpoint: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a start that would destroy a run, before any model work (``ConfigError``, one line): with
    ``resume`` the ``checkpoint`` must exist; without, none of ``results`` (what a run leaves) may exist
    unless ``overwrite``, which deletes the old ``checkpoint`` (the rest is rewritten by the new run)."""
    results = [Path(p) for p in results]
    for d in {p.parent for p in results}:
        if d.exists() and not d.is_dir():
            raise ConfigError(f"output directory {d} is a file; pass a directory")
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it again: pass only one of them")
    found = [str(p) for p in results if p.exists()]
    if resume and not checkpoint.is_file():
        raise CheckpointError(f"there is no checkpoint at {checkpoint} to resume from; run without --resume"
                              + (" and with --overwrite (the directory holds results)" if found else ""))
    if not resume and found and not overwrite:
        raise ConfigError(f"the output directory already holds a run ({', '.join(found)}); pass --resume to "
                          "continue it or --overwrite to start again")
    if overwrite:
        checkpoint.unlink(missing_ok=True)


def divergence_advice(lr: float, warmup: int, checkpoint: Path | None, hint: str = "") -> str:
    """What to change after a run diverged, and the last good checkpoint if one exists (checkpoints are
    only written with finite weights): the end of every ``DivergenceError`` message."""
    kept = (f"the last good checkpoint is {checkpoint}" if checkpoint is not None and checkpoint.is_file()
            else "no checkpoint was written")
    return f"lower lr (now {lr:g}) or add warmup (now {warmup} steps){hint}; then start again with --overwrite ({kept})"


def precision_hint(cfg: DistillConfig, params: Iterable[torch.Tensor]) -> str:
    """Advice about precision after a divergence: float16 weights overflow above 65504, and mixed
    precision can be switched off (said only if it is on)."""
    hint = ""
    if any(p.dtype == torch.float16 for p in params):
        hint += "; float16 weights overflow easily: load the models with dtype=bfloat16 or float32"
    if cfg.mixed_precision != "no":
        hint += f"; or use mixed_precision='no' (now {cfg.mixed_precision!r})"
    return hint


def check_finite_weights(state: TrainState, cfg: DistillConfig) -> None:
    """``DivergenceError`` naming ``state.step`` if a trained parameter holds NaN/inf (after the optimizer
    step); reads the trained tensors only."""
    named = state.trainable.named_parameters()
    bad = nonfinite_names(named)
    if bad:
        hint = precision_hint(cfg, (p for _, p in named))
        raise DivergenceError(f"training diverged at step {state.step}: {len(bad)} trained tensor(s) hold NaN/inf "
                              f"after the optimizer step (first: {bad[0]}); "
                              + divergence_advice(cfg.lr, cfg.warmup, state.checkpoint, hint))


def save_checkpoint(state: TrainState, cfg: DistillConfig) -> None:
    """Write ``state.checkpoint`` (main process, after every process got here); nothing if there is no path."""
    if state.checkpoint is None:
        return
    state.accelerator.wait_for_everyone()
    if not state.accelerator.is_main_process:
        return
    saved = {"params": {k: p.detach().clone() for k, p in state.trainable.named_parameters()},
             "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
             "rng": torch.get_rng_state(), "step": state.step, "history": list(state.history),
             "config": cfg.to_dict()}
    write_checkpoint(state.checkpoint, saved, saved["params"].items())


def load_run_checkpoint(path: Path | None, cfg: DistillConfig) -> dict:
    """The checkpoint ``path`` of a run of ``cfg``, read safely (``read_checkpoint``) and checked.
    ``ConfigError`` if there is none, it is unreadable or unsafe, was written with another config, or
    holds non-finite weights."""
    if path is None or not path.is_file():
        raise CheckpointError(f"resume=True but there is no checkpoint at {path}; run without --resume")
    saved = read_checkpoint(path, CHECKPOINT_KEYS)
    now = cfg.to_dict()
    if saved["config"] != now:
        keys = [k for k in now if not isinstance(saved["config"], dict) or saved["config"].get(k) != now[k]]
        raise ConfigError(f"the checkpoint was written with a different config ({', '.join(keys) or 'other keys'}); "
                          "resume with the same one, or start again with --overwrite")
    bad = nonfinite_names(saved["params"].items()) if isinstance(saved["params"], dict) else ["params"]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({bad[0]}); start again with --overwrite")
    return saved


def restore_state(state: TrainState, cfg: DistillConfig, saved: dict | None = None) -> None:
    """Load ``state.checkpoint`` (or ``saved``, what ``load_run_checkpoint`` read from it) into ``state``:
    trained parameters, optimizer, scheduler, torch RNG, step and history. ``ConfigError`` if there is no
    checkpoint, it cannot be read safely or it was written with another config."""
    if saved is None:
        saved = load_run_checkpoint(state.checkpoint, cfg)
    named = dict(state.accelerator.unwrap_model(state.model).named_parameters())
    with torch.no_grad():
        for k, v in saved["params"].items():
            named[k].copy_(v)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    state.step, state.history = saved["step"], saved["history"]
