"""What every run of a study shares, built once per process and only when a run needs it: the teacher and
its untrained twin, the prompt sets, the teacher caches, and per warmth level the warm student with its
circuits, component maps and measurements before distillation."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass

import torch

from ..distill import TeacherCache, build_cache
from ..distill.teacher import untrained_teacher
from ..errors import CircuitDistillError
from ..matching import discover_and_match
from ..matching.pipeline import MatchedCircuits
from ..model import load_model
from .answers import correct_answers, to_bits
from .config import StudyConfig
from .transfer import Roles, teacher_roles, transfer_check


@dataclass
class WarmStudent:
    """One warmth level: the warm student (never trained itself: every run distils a copy), both circuits
    and every matcher's map (``found``), and its measurements before distillation (``before``)."""

    model: object
    found: MatchedCircuits
    before: dict

    def fresh_copy(self):
        """A copy of the warm student to distil."""
        return dataclasses.replace(self.model, hf=copy.deepcopy(self.model.hf))


def accuracy_record(model, data: dict, n_curve: int) -> dict:
    """Accuracy on the evaluation and harder sets, on their first ``n_curve`` prompts (the curves' sets) and
    the per-prompt correctness (``to_bits``)."""
    rec = {}
    for key, name in (("acc", "eval"), ("acc_hard", "hard")):
        ok = correct_answers(model, data[name])
        rec[key], rec[f"{key}_curve"], rec[f"correct_{name}"] = float(ok.mean()), float(ok[:n_curve].mean()), to_bits(ok)
    return rec


class StudyContext:
    """The shared parts of a study's runs (see the module docstring); ``log`` receives progress lines."""

    def __init__(self, cfg: StudyConfig, log=print):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.log = cfg, log
        self.teacher = load_model(cfg.teacher)
        self.data = cfg.make_data(self.teacher.tokenizer)
        n = min(cfg.n_curve, cfg.n_eval)
        self.curve_sets = {k: self.data[k].subset(slice(0, n)) for k in ("eval", "hard")}
        self._students: dict[str, WarmStudent] = {}
        self._caches: dict[tuple[str, str], TeacherCache] = {}
        self._untrained = None
        self.teacher_sweep = None
        self.teacher_side: Roles | None = None

    def student(self, warmth: str) -> WarmStudent:
        """The warm student of ``warmth``: loaded, its circuit discovered and matched, measured before."""
        if warmth not in self._students:
            cfg, td = self.cfg, self.data["discovery"]
            model = load_model(cfg.students[warmth])
            if model.tokenizer.get_vocab() != self.teacher.tokenizer.get_vocab():
                raise CircuitDistillError(f"student {cfg.students[warmth]} does not share the teacher's tokenizer")
            self.log(f"{warmth}: discovering circuits and matching ({cfg.students[warmth]})")
            found = discover_and_match(self.teacher, model, td, top_k=cfg.circuit_top_k, kinds=("head", "mlp"))
            if self.teacher_side is None:
                self.teacher_sweep = found.teacher.sweep
                self.teacher_side = teacher_roles(self.teacher, td, self.teacher_sweep)
            pairs = {f"role@{k}": list(m.pairs) for k, m in found.maps.items()}
            check = transfer_check(self.teacher, model, td, self.teacher_side, self.teacher_sweep, pairs,
                                   student_sweep=found.student.sweep)
            before = {"model": cfg.students[warmth], "params": model.n_params,
                      **accuracy_record(model, self.data, len(self.curve_sets["eval"])), **check,
                      "circuit": [str(c) for c in found.student.circuit.components],
                      "maps": {k: [[str(s), str(t)] for s, t in m.pairs] for k, m in found.maps.items()}}
            self._students[warmth] = WarmStudent(model, found, before)
        return self._students[warmth]

    def teacher_record(self) -> dict:
        """The teacher's accuracies and circuit (the ceiling of every cell)."""
        warm = self.student(next(iter(self.cfg.students)))
        return {"model": self.cfg.teacher, "params": self.teacher.n_params,
                **accuracy_record(self.teacher, self.data, len(self.curve_sets["eval"])),
                "circuit": [str(c) for c in warm.found.teacher.circuit.components]}

    def untrained(self):
        """The untrained-teacher control (``distill.teacher.untrained_teacher``, seed ``untrained_seed``)."""
        if self._untrained is None:
            self._untrained = untrained_teacher(self.teacher, self.cfg.untrained_seed)
        return self._untrained

    def cache(self, positions: str, teacher: str = "trained") -> TeacherCache:
        """The cache of every teacher head over the training prompts at ``positions``, held in memory: of the
        trained teacher, or (``"untrained"``) the untrained teacher's activations with the trained one's logits."""
        key = (positions, teacher)
        if key not in self._caches:
            model = self.teacher if teacher == "trained" else self.untrained()
            with tempfile.TemporaryDirectory(prefix="cd-study-cache-") as d:
                cache = build_cache(model, self.data["train"], model.components("head"), positions, d)
                cache.path = None
            if teacher != "trained":
                cache = cache.with_logits_of(self.cache(positions))
            self._caches[key] = cache
        return self._caches[key]
