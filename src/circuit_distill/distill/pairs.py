"""The pairs step: which (student head, teacher head) pairs a run aligns and trains.

The matched component map as given, or for the ``random`` objectives (the control rows) the same
student heads each paired with a seeded random teacher head.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..matching import ComponentMap, match
from ..model.components import Component
from .config import DistillConfig
from .objectives import Objective


def random_map(cmap: ComponentMap, teacher_heads: list[Component], seed: int) -> ComponentMap:
    """A seeded random pairing of ``cmap``'s student heads with ``teacher_heads`` (the random-pairs control)."""
    return match(None, None, teacher_heads, cmap.student_components, method="random", seed=seed)


def choose_pairs(objective: Objective, component_map: ComponentMap | None, cfg: DistillConfig, *,
                 teacher=None, cache=None) -> ComponentMap | None:
    """The component map the run uses: ``component_map``, or for random-pairs objectives a seeded random
    map (seed ``cfg.seed``) of its student heads onto the teacher's heads (from ``teacher``, else the
    heads held by the teacher ``cache``). ``ConfigError`` if an alignment or IIT objective or
    ``trainable="matched_heads"`` has no map."""
    if component_map is None and (objective.uses_pairs or cfg.trainable == "matched_heads"):
        raise ConfigError(f"objective {objective.name!r} with trainable={cfg.trainable!r} needs a component map "
                          "(student head -> teacher head); run discovery + matching or pass component_map")
    if not (objective.uses_pairs and objective.pairs == "random"):
        return component_map
    if teacher is not None:
        pool = teacher.components("head")
    elif cache is not None:
        pool = [c for c in cache.components if c.is_head]
    else:
        raise ConfigError("random pairs need the teacher (or a teacher cache holding all its heads)")
    return random_map(component_map, pool, cfg.seed)
