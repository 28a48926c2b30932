"""``ComponentMap``: the pairs (student component, teacher component) a matcher chose, with their
distances, a quality summary and JSON io.

``ComponentMap.quality()`` reports how degenerate a map is (distinct teacher heads, the largest
reuse of one teacher head, ties): ablation matching with a weak student tends to send every
student head to the same near-zero-effect teacher head.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write_json
from ..model.components import Component


@dataclass
class ComponentMap:
    """Pairs ``(student component, teacher component)`` with the distance of each pair.

    ``distances[i]`` is the matching distance of ``pairs[i]`` (``|dP_s - dP_t|`` for ablation,
    hungarian and random; ``1 - CKA`` for cka; NaN when unknown). ``info`` holds extra facts from
    the matcher (tie count, unmatched heads, the effects used).
    """

    pairs: list[tuple[Component, Component]]
    distances: list[float] = field(default_factory=list)
    method: str = "ablation"
    seed: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pairs = [(Component.parse(s), Component.parse(t)) for s, t in self.pairs]
        if not self.distances:
            self.distances = [math.nan] * len(self.pairs)
        if len(self.distances) != len(self.pairs):
            raise ConfigError(f"ComponentMap: {len(self.pairs)} pairs but {len(self.distances)} distances")
        self.distances = [float(d) for d in self.distances]

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    @property
    def student_components(self) -> list[Component]:
        """Student side of every pair, in pair order."""
        return [s for s, _ in self.pairs]

    @property
    def teacher_components(self) -> list[Component]:
        """Teacher side of every pair, in pair order (repeats when many-to-one)."""
        return [t for _, t in self.pairs]

    def teacher_for(self, student: Component | str) -> Component:
        """The teacher component paired with ``student``."""
        s = Component.parse(student)
        for a, b in self.pairs:
            if a == s:
                return b
        raise ConfigError(f"{s} is not in this component map; its student components are "
                          f"{', '.join(map(str, self.student_components))}")

    def quality(self) -> dict:
        """Matching-quality summary: sizes, distinct teacher heads used, reuse and distances."""
        uses = Counter(self.teacher_components)
        finite = [d for d in self.distances if math.isfinite(d)]
        n = len(self.pairs)
        q = {
            "n_pairs": n,
            "n_student": len(set(self.student_components)),
            "n_teacher_distinct": len(uses),
            "max_teacher_reuse": max(uses.values()) if uses else 0,
            "most_used_teacher": str(uses.most_common(1)[0][0]) if uses else None,
            "mean_distance": sum(finite) / len(finite) if finite else None,
            "max_distance": max(finite) if finite else None,
            "degenerate": n > 1 and len(uses) == 1,
            "teacher_uses": {str(t): k for t, k in sorted(uses.items())},
        }
        for k in ("n_teacher_circuit", "n_ties", "unmatched_students"):
            if k in self.info:
                q[k] = self.info[k]
        return q

    # ---- io -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "seed": self.seed,
            "pairs": [
                {"student": str(s), "teacher": str(t), "distance": d if math.isfinite(d) else None}
                for (s, t), d in zip(self.pairs, self.distances)
            ],
            "quality": self.quality(),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ComponentMap:
        """Inverse of ``to_dict``; also accepts ``{"pairs": [["L0.H1", "L3.H2"], ...]}`` and ``{"L0.H1": "L3.H2"}``."""
        if "pairs" not in d:
            try:
                pairs = [(Component.parse(s), Component.parse(t)) for s, t in d.items()]
            except Exception as e:
                raise ConfigError("a component map needs a 'pairs' list or a {student: teacher} mapping") from e
            return cls(pairs)
        pairs, dists = [], []
        for p in d["pairs"]:
            if isinstance(p, Mapping):
                pairs.append((p["student"], p["teacher"]))
                dv = p.get("distance")
            else:
                pairs.append((p[0], p[1]))
                dv = p[2] if len(p) > 2 else None
            dists.append(math.nan if dv is None else float(dv))
        return cls(pairs, dists, str(d.get("method", "unknown")), int(d.get("seed", 0)), dict(d.get("info", {})))

    def to_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ComponentMap:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"component map {path} does not exist; write one with `circuit-distill match`") from e
        return cls.from_dict(data)
