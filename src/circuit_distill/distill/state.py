"""The state of a training run and the resume step: the seeded batch order, the trainable subset with
its optimizer and schedule, and the checkpoint that saves and restores all of it.

A checkpoint (``checkpoint.pt``, written atomically) holds the trained parameters, the optimizer and
scheduler states, the torch RNG state, the step, the history and the config, so a resumed run ends
with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from ..errors import ConfigError
from ..files import atomic_write
from ..model.components import Component
from .config import DistillConfig
from .trainable import TrainableInfo, set_trainable

CHECKPOINT = "checkpoint.pt"


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
    atomic_write(state.checkpoint, lambda tmp: torch.save(saved, tmp))


def restore_state(state: TrainState, cfg: DistillConfig) -> None:
    """Load ``state.checkpoint`` into ``state``: trained parameters, optimizer, scheduler, torch RNG, step and
    history. ``ConfigError`` if there is no checkpoint or it was written with another config."""
    ckpt = state.checkpoint
    if ckpt is None or not ckpt.exists():
        raise ConfigError(f"resume=True but there is no checkpoint at {ckpt}; run without --resume")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    named = dict(state.accelerator.unwrap_model(state.model).named_parameters())
    with torch.no_grad():
        for k, v in saved["params"].items():
            named[k].copy_(v)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    state.step, state.history = saved["step"], saved["history"]
    if saved["config"] != cfg.to_dict():
        raise ConfigError("the checkpoint was written with a different config; resume with the same one")
