"""The teacher-source step: where a run's teacher outputs come from, a teacher cache or online forwards.

``open_teacher_source`` decides once per run (building the cache if ``use_cache`` asks for one);
``TeacherSource.outputs(idx)`` then serves the teacher's head activations and answer logits of the
training rows ``idx``, the same either way. ``untrained_teacher`` makes the untrained-teacher control.

**Across tokenizers** (``teacher_data_for``): when the teacher tokenises the prompts differently from the
student, it reads its own tokenization of the same prompts (``teacher_data``, row for row, e.g. from
``analysis.named_task_pair``), and its rows are taken at the task's named positions in that tokenization,
one row per prompt (``tasks.positions.prompt_rows``). Its logits are over another vocabulary, so objectives
that use them (KD, IIT) and teacher-argmax labels are refused; CE takes the gold answers (each model's own
tokenization of the answer word).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..model.arch import build_arch
from ..model.components import Component
from ..model.loading import Model
from ..tasks.base import TaskData
from ..tasks.positions import check_same_prompts, same_tokens
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
    student_data: TaskData | None = None  # the student's tokenization of the same rows when it differs from data
    eval_data: dict[str, TaskData] = field(default_factory=dict)  # the teacher's tokenization of eval sets, by name

    @property
    def train(self) -> TaskData:
        """The student's training data (its own tokenization of the rows ``outputs`` serves)."""
        return self.data if self.student_data is None else self.student_data

    @property
    def across_tokenizers(self) -> bool:
        """True if the teacher reads its own tokenization of the prompts (rows at named positions only)."""
        return self.student_data is not None

    def outputs(self, idx: torch.Tensor) -> tuple[dict[Component, torch.Tensor], torch.Tensor]:
        """``({teacher head: [batch, seq, d_head] ("all") or [batch, d_head]}, answer logits [batch, V])`` of rows ``idx``."""
        if self.cache is not None:
            return self.cache.rows(idx, self.components)
        return teacher_outputs(self.teacher, self.data, self.components, self.positions, idx)


def teacher_data_for(objective: Objective, cfg: DistillConfig, train: TaskData,
                     teacher_data: TaskData | None) -> TaskData | None:
    """The teacher's own tokenization of ``train``'s prompts if it differs from the student's, else None (one
    tokenization: the teacher reads ``train``). ``ConfigError`` (one line) if the prompts differ, or across
    tokenizers for an objective that needs the teacher's logits (KD, IIT), ``labels="teacher"`` or alignment at
    ``positions="all"``."""
    if teacher_data is None:
        return None
    check_same_prompts(teacher_data, train)
    if same_tokens(teacher_data, train):
        return None
    if objective.needs_teacher_logits:
        raise ConfigError(f"objective {objective.name!r} compares the teacher's and the student's logits, which are not "
                          "defined across vocabularies (the two models tokenise the prompts differently): use ce, "
                          "ce+align_cka or ce+random_cka with labels=gold")
    if objective.uses_ce and cfg.labels == "teacher":
        raise ConfigError("labels='teacher' takes the teacher's argmax, a token of its own vocabulary, but the two "
                          "models tokenise differently: set labels=gold (each model's own tokens of the answer word)")
    if objective.uses_align and cfg.positions == "all":
        raise ConfigError("positions='all' aligns token by token, but the two models tokenise the prompts differently: "
                          "align at the task's named positions (e.g. positions=last or positions=object,last)")
    return teacher_data


def build_run_cache(teacher, train: TaskData, components: list[Component], cfg: DistillConfig,
                    out: Path | None = None, accelerator=None, logits: bool = True) -> TeacherCache:
    """The teacher cache of ``train`` a run builds: in ``out/teacher_cache`` (written by the main process;
    every process loads it), or in memory only if ``out`` is None; without the answer logits if not ``logits``."""
    kw = {"batch_size": cfg.eval_batch_size, "logits": logits}
    if out is None:  # in memory only: every rank builds its own, nothing is left on disk
        with tempfile.TemporaryDirectory(prefix="cd-cache-") as d:
            cache = build_cache(teacher, train, components, cfg.positions, d, **kw)
            cache.path = None
        return cache
    if accelerator is None or accelerator.is_main_process:
        build_cache(teacher, train, components, cfg.positions, out / "teacher_cache", **kw)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return TeacherCache.load(out / "teacher_cache")


def open_teacher_source(objective: Objective, cfg: DistillConfig, train: TaskData, components: list[Component], *,
                        teacher=None, cache: TeacherCache | None = None, out: Path | None = None,
                        accelerator=None, teacher_data: TaskData | None = None) -> TeacherSource:
    """Where the run's teacher outputs of ``components`` (teacher heads) on ``train`` come from: ``cache``
    if given, a cache built now if ``cfg.use_cache`` (see ``build_run_cache``), else ``teacher`` online.
    ``teacher_data``: the teacher's own tokenization of ``train``'s prompts when its tokenizer differs (the
    cache is built on it; ``teacher_data_for`` says what is refused then).
    ``ConfigError`` if the objective needs the teacher and neither is there, or the cache does not cover
    ``components`` at ``cfg.positions`` for every training row."""
    student_data = train
    theirs = teacher_data_for(objective, cfg, train, teacher_data)
    train = train if theirs is None else theirs
    needed = teacher_needed(objective, cfg.labels)
    if needed and cache is None and cfg.use_cache:
        if teacher is None:
            raise ConfigError(f"objective {objective.name!r} needs the teacher or a teacher cache")
        cache = build_run_cache(teacher, train, components or teacher.components("head")[:1], cfg, out, accelerator,
                                logits=theirs is None)
    if needed and cache is not None:
        cache.check(components, cfg.positions, len(train))
    elif needed and teacher is None:
        raise ConfigError(f"objective {objective.name!r} needs the teacher (labels={cfg.labels!r}); "
                          "pass teacher= or a cache")
    return TeacherSource(teacher, cache, train, list(components), cfg.positions, needed,
                         None if theirs is None else student_data)


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
