"""The teacher-source step: where a run's teacher outputs come from, a teacher cache or online forwards.

``open_teacher_source`` decides once per run (building the cache if ``use_cache`` asks for one);
``TeacherSource.outputs(idx)`` then serves the teacher's head activations and answer logits of the
training rows ``idx``, the same either way. ``untrained_teacher`` makes the untrained-teacher control.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..model.arch import build_arch
from ..model.components import Component
from ..model.loading import Model
from ..tasks.base import TaskData
from .cache import TeacherCache, build_cache, teacher_outputs
from .config import DistillConfig
from .objectives import Objective


def teacher_needed(objective: Objective, labels: str) -> bool:
    """True if training needs teacher outputs: KD logits, teacher-argmax CE labels or alignment activations."""
    return objective.needs_teacher_logits or (objective.uses_ce and labels == "teacher") or objective.needs_teacher_acts


@dataclass
class TeacherSource:
    """The teacher's outputs on the training set ``data``: rows of ``cache`` if there is one, else forwards
    of ``teacher``. ``needed``: whether the objective uses them at all (``outputs`` is not called if not)."""

    teacher: object | None
    cache: TeacherCache | None
    data: TaskData
    components: list[Component]
    positions: str
    needed: bool = True

    def outputs(self, idx: torch.Tensor) -> tuple[dict[Component, torch.Tensor], torch.Tensor]:
        """``({teacher head: [batch, seq, d_head] ("all") or [batch, d_head]}, answer logits [batch, V])`` of rows ``idx``."""
        if self.cache is not None:
            return self.cache.rows(idx, self.components)
        return teacher_outputs(self.teacher, self.data, self.components, self.positions, idx)


def build_run_cache(teacher, train: TaskData, components: list[Component], cfg: DistillConfig,
                    out: Path | None = None, accelerator=None) -> TeacherCache:
    """The teacher cache of ``train`` a run builds: in ``out/teacher_cache`` (written by the main process;
    every process loads it), or in memory only if ``out`` is None."""
    if out is None:  # in memory only: every rank builds its own, nothing is left on disk
        with tempfile.TemporaryDirectory(prefix="cd-cache-") as d:
            cache = build_cache(teacher, train, components, cfg.positions, d, batch_size=cfg.eval_batch_size)
            cache.path = None
        return cache
    if accelerator is None or accelerator.is_main_process:
        build_cache(teacher, train, components, cfg.positions, out / "teacher_cache", batch_size=cfg.eval_batch_size)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return TeacherCache.load(out / "teacher_cache")


def open_teacher_source(objective: Objective, cfg: DistillConfig, train: TaskData, components: list[Component], *,
                        teacher=None, cache: TeacherCache | None = None, out: Path | None = None,
                        accelerator=None) -> TeacherSource:
    """Where the run's teacher outputs of ``components`` (teacher heads) on ``train`` come from: ``cache``
    if given, a cache built now if ``cfg.use_cache`` (see ``build_run_cache``), else ``teacher`` online.
    ``ConfigError`` if the objective needs the teacher and neither is there, or the cache does not cover
    ``components`` at ``cfg.positions`` for every training row."""
    needed = teacher_needed(objective, cfg.labels)
    if needed and cache is None and cfg.use_cache:
        if teacher is None:
            raise ConfigError(f"objective {objective.name!r} needs the teacher or a teacher cache")
        cache = build_run_cache(teacher, train, components or teacher.components("head")[:1], cfg, out, accelerator)
    if needed and cache is not None:
        cache.check(components, cfg.positions, len(train))
    elif needed and teacher is None:
        raise ConfigError(f"objective {objective.name!r} needs the teacher (labels={cfg.labels!r}); "
                          "pass teacher= or a cache")
    return TeacherSource(teacher, cache, train, list(components), cfg.positions, needed)


def untrained_teacher(teacher: Model, seed: int) -> Model:
    """The untrained-teacher control: a model of ``teacher``'s architecture (its config, tokenizer, heads and
    dtype) with every weight freshly initialised from ``seed``, in eval mode. The global torch RNG is left as
    it was."""
    hf = teacher.hf
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(hf)(copy.deepcopy(hf.config))
    fresh.to(device=teacher.device, dtype=teacher.dtype).eval()
    return Model(fresh, teacher.tokenizer, build_arch(fresh), name=f"untrained({teacher.name}, seed {seed})")
