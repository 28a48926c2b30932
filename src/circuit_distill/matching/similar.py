"""The Distilled-Circuits matcher: every student component to its most similar teacher component of the
same kind (or the reverse), read off a ``SimilarityTable``; ``Pair`` is one row of the resulting pair
table once influences are attached (``analysis.alignment.align``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError
from ..model.components import Component

DIRECTIONS = ("student_to_teacher", "teacher_to_student")


@dataclass
class SimilarityTable:
    """Similarity of every student component to every teacher component of the same kind.

    ``values[kind]`` is ``[n_student_of_kind, n_teacher_of_kind]``; rows follow ``student[kind]``,
    columns ``teacher[kind]`` (forward order); ``method`` names the similarity (``attention``, ``cka``).
    """

    method: str
    teacher: dict[str, list[Component]]
    student: dict[str, list[Component]]
    values: dict[str, torch.Tensor]


@dataclass
class Pair:
    """One matched pair: the student and teacher components, their similarity ``S``, raw
    influences and influences normalised over the pair list, and ``S (1 - |I~_S - I~_T|)``."""

    student: Component
    teacher: Component
    similarity: float
    influence_student: float
    influence_teacher: float
    norm_student: float = 0.0
    norm_teacher: float = 0.0
    contribution: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["student"], d["teacher"] = str(self.student), str(self.teacher)
        d["kind"] = self.student.kind
        return d


def match_components(table: SimilarityTable, direction: str = "student_to_teacher"
                     ) -> list[tuple[Component, Component, float]]:
    """Best match per component: ``(student, teacher, S)`` triples.

    ``student_to_teacher``: one triple per student component (its most similar teacher component
    of the same kind); ``teacher_to_student``: one per teacher component. Many-to-one allowed; ties
    go to the earliest component in forward order.
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    out = []
    for kd, vals in table.values.items():
        sc, tc = table.student[kd], table.teacher[kd]
        if not sc or not tc:
            continue
        if direction == "student_to_teacher":
            best = vals.argmax(1)  # first maximum: forward order
            out += [(s, tc[int(best[i])], float(vals[i, best[i]])) for i, s in enumerate(sc)]
        else:
            best = vals.argmax(0)
            out += [(sc[int(best[j])], t, float(vals[best[j], j])) for j, t in enumerate(tc)]
    return out
