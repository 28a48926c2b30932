"""What ``train_tiny`` needs of each task it trains on: a curriculum per task name.

A curriculum gives the tokenizer, the training rows of a batch (drawn from a seeded RNG), the words
whose embeddings stay frozen (and whether input and output embeddings are tied), the words whose
embeddings are drawn afresh at every step, the keys of the
stopping rule and of the final report, the held-out accuracy of one key, and the task's sentences
of the training card.
"""

from __future__ import annotations

from ...errors import ConfigError
from .entity_tracking import EntityTrackingCurriculum
from .theory_of_mind import TheoryOfMindCurriculum

CURRICULA = {c.name: c for c in (EntityTrackingCurriculum(), TheoryOfMindCurriculum())}


def curriculum_for(task: str):
    """The curriculum of ``task`` (``ConfigError`` naming the trainable tasks otherwise)."""
    if task not in CURRICULA:
        raise ConfigError(f"train_tiny cannot train task {task!r}; choose one of {', '.join(CURRICULA)}")
    return CURRICULA[task]
