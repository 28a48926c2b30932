"""Named training objectives (the rows of the paper's tables), selected by name, and their loss.

====================  ===  ===  =====  ===  =======  ============================================
name                  CE   KD   align  IIT  pairs    row
====================  ===  ===  =====  ===  =======  ============================================
``ce``                yes                            standard distillation on (teacher) labels
``kd``                     yes                       Hinton KL to the teacher's softened logits
``align_cka``                   yes         matched  CKA on matched pairs only
``random_cka``                  yes         random   CKA on random pairs only (control)
``ce+random_cka``     yes       yes         random   control
``ce+align_cka``      yes       yes         matched  the method
``kd+align_cka``           yes  yes         matched  ours
``iit``                              yes    matched  interchange interventions only (``distill.iit``)
``ce+iit``            yes            yes    matched  causal distillation of the matched circuit
``kd+iit``                 yes       yes    matched  ours
``random_iit``                       yes    random   IIT on random pairs only (control)
``ce+random_iit``     yes            yes    random   control
``ce+iit+align_cka``  yes       yes  yes    matched  both mechanisms' terms
====================  ===  ===  =====  ===  =======  ============================================

The total is always ``CE + KD + lam * mean_pairs(1 - CKA) + iit_lam * IIT`` over the terms the
objective uses (IIT: the loss between the student's and the teacher's intervened answer
distributions, see ``distill.iit``). ``pairs`` tells the trainer which component map to use, for
alignment and interventions alike: the matched one, or a seeded ``match(..., method="random")`` one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError
from .losses import ce_loss, kd_loss, pair_ckas


@dataclass(frozen=True)
class Objective:
    """What one training row optimises (see the module table)."""

    name: str
    uses_ce: bool = False
    uses_kd: bool = False
    uses_align: bool = False
    pairs: str = "matched"  # "matched" | "random"; meaningful only with uses_align or uses_iit
    uses_iit: bool = False

    def __post_init__(self) -> None:
        if self.pairs not in ("matched", "random"):
            raise ConfigError(f"objective {self.name!r}: pairs must be 'matched' or 'random', got {self.pairs!r}")
        if not (self.uses_ce or self.uses_kd or self.uses_align or self.uses_iit):
            raise ConfigError(f"objective {self.name!r} uses no loss term")

    @property
    def needs_teacher_logits(self) -> bool:
        """True if the loss itself needs teacher logits (KD; IIT: the teacher's intervened ones). CE on
        teacher-argmax labels also needs a teacher forward; that is the trainer's label choice, not the objective's."""
        return self.uses_kd or self.uses_iit

    @property
    def uses_pairs(self) -> bool:
        """True if the loss uses the (student head, teacher head) pairs: alignment or interventions."""
        return self.uses_align or self.uses_iit

    @property
    def needs_teacher_acts(self) -> bool:
        """True if the loss needs teacher head activations (alignment)."""
        return self.uses_align

    def to_dict(self) -> dict:
        return {**asdict(self), "needs_teacher_logits": self.needs_teacher_logits,
                "needs_teacher_acts": self.needs_teacher_acts}


OBJECTIVES: dict[str, Objective] = {}


def register_objective(obj: Objective) -> Objective:
    """Add (or replace) a named objective."""
    OBJECTIVES[obj.name] = obj
    return obj


for _o in (
    Objective("ce", uses_ce=True),
    Objective("kd", uses_kd=True),
    Objective("align_cka", uses_align=True, pairs="matched"),
    Objective("random_cka", uses_align=True, pairs="random"),
    Objective("ce+random_cka", uses_ce=True, uses_align=True, pairs="random"),
    Objective("ce+align_cka", uses_ce=True, uses_align=True, pairs="matched"),
    Objective("kd+align_cka", uses_kd=True, uses_align=True, pairs="matched"),
    Objective("iit", uses_iit=True, pairs="matched"),
    Objective("ce+iit", uses_ce=True, uses_iit=True, pairs="matched"),
    Objective("kd+iit", uses_kd=True, uses_iit=True, pairs="matched"),
    Objective("random_iit", uses_iit=True, pairs="random"),
    Objective("ce+random_iit", uses_ce=True, uses_iit=True, pairs="random"),
    Objective("ce+iit+align_cka", uses_ce=True, uses_align=True, uses_iit=True, pairs="matched"),
):
    register_objective(_o)

_ALIASES = {"rand_cka": "random_cka", "ce+rand_cka": "ce+random_cka", "align": "align_cka",
            "ce+align": "ce+align_cka", "kd+align": "kd+align_cka", "rand_iit": "random_iit",
            "ce+rand_iit": "ce+random_iit", "ce+align_cka+iit": "ce+iit+align_cka"}


def objective_names() -> list[str]:
    return list(OBJECTIVES)


def get_objective(name: str | Objective) -> Objective:
    """The objective called ``name`` (case-insensitive; ``"CE + Align CKA"`` works; ``rand`` = ``random``)."""
    if isinstance(name, Objective):
        return name
    key = re.sub(r"\s+", "_", re.sub(r"\s*\+\s*", "+", str(name).strip().lower())).replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[key]


def objective_loss(objective: str | Objective, *, student_logits: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                   student_feats: Sequence[torch.Tensor] | None = None,
                   teacher_feats: Sequence[torch.Tensor] | None = None, lam: float = 1.0,
                   temperature: float = 1.0, debiased: bool = False,
                   distributed: bool = False, student_iit_logits: torch.Tensor | None = None,
                   teacher_iit_logits: torch.Tensor | None = None, iit_lam: float = 1.0,
                   iit_loss: str = "kl") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of ``objective`` and its parts.

    ``student_logits [n, V]``, ``labels [n]`` (CE), ``teacher_logits [n, V]`` (KD),
    ``student_feats[i] [m, d_s]`` / ``teacher_feats[i] [m, d_t]`` (one matrix per pair, alignment),
    ``student_iit_logits`` / ``teacher_iit_logits [n, V]`` (the intervened answer logits, IIT; ``iit_loss``
    ``"kl"``: ``T^2 KL`` at ``temperature``, ``"ce"``: CE on the teacher's intervened argmax).
    Returns ``(total, parts)``; ``parts`` holds detached scalars: ``ce``, ``kd``, ``align``
    (mean 1 - CKA), ``cka`` (mean CKA), ``iit`` and ``iia`` (the batch's interchange intervention
    accuracy) and ``total``, for the terms used.
    """
    obj = get_objective(objective)
    terms: list[torch.Tensor] = []
    parts: dict[str, torch.Tensor] = {}

    def need(value, what: str):
        if value is None:
            raise ConfigError(f"objective {obj.name!r} needs {what}")
        return value

    if obj.uses_ce:
        ce = ce_loss(need(student_logits, "student_logits [n, V]"), need(labels, "labels [n]"))
        terms.append(ce)
        parts["ce"] = ce.detach()
    if obj.uses_kd:
        kd = kd_loss(need(student_logits, "student_logits [n, V]"),
                     need(teacher_logits, "teacher_logits [n, V] (a teacher forward or cache)"), temperature)
        terms.append(kd)
        parts["kd"] = kd.detach()
    if obj.uses_align:
        ckas = pair_ckas(need(student_feats, "student_feats (one [m, d_s] matrix per pair)"),
                         need(teacher_feats, "teacher_feats (one [m, d_t] matrix per pair)"),
                         debiased=debiased, distributed=distributed)
        align = (1.0 - ckas).mean()
        terms.append(lam * align)
        parts["align"] = align.detach()
        parts["cka"] = ckas.mean().detach()
    if obj.uses_iit:
        s_iit = need(student_iit_logits, "student_iit_logits [n, V] (the student's intervened answer logits)")
        t_iit = need(teacher_iit_logits, "teacher_iit_logits [n, V] (a teacher forward or cache)")
        iit = iit_term(s_iit, t_iit, iit_loss, temperature)
        terms.append(iit_lam * iit)
        parts["iit"] = iit.detach()
        parts["iia"] = (s_iit.detach().argmax(-1) == t_iit.argmax(-1)).float().mean()
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    parts["total"] = total.detach()
    return total, parts


def iit_term(student_iit_logits: torch.Tensor, teacher_iit_logits: torch.Tensor, loss: str = "kl",
             temperature: float = 1.0) -> torch.Tensor:
    """The IIT loss between intervened answer logits ``[n, V]``: ``"kl"`` (``kd_loss`` at ``temperature``)
    or ``"ce"`` (cross-entropy on the teacher's intervened argmax)."""
    if loss == "kl":
        return kd_loss(student_iit_logits, teacher_iit_logits, temperature)
    if loss == "ce":
        return ce_loss(student_iit_logits, teacher_iit_logits.argmax(-1))
    raise ConfigError(f"iit_loss must be 'kl' or 'ce', got {loss!r}")
