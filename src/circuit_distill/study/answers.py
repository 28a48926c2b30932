"""Per-prompt correctness of a model on a held-out set, and its compact form in a run record.

The bootstrap of the study resamples evaluation prompts, so every run keeps which prompts it got right,
as a string of ``0``/``1`` (one character per prompt, in the set's order)."""

from __future__ import annotations

import numpy as np

from ..tasks.base import TaskData
from ..tasks.metrics import batched_final_logits, per_example


def correct_answers(model, td: TaskData, *, batch_size: int = 256) -> np.ndarray:
    """``[n]`` bool: whether ``model``'s top next token at each prompt's last position is its answer."""
    logits = batched_final_logits(model, td.clean, td.positions["last"], batch_size=batch_size, progress=False)
    return per_example(logits, td.answer_ids)["accuracy"].numpy() > 0.5


def to_bits(correct: np.ndarray) -> str:
    """``[n]`` bool -> a string of ``n`` characters ``0``/``1``."""
    return "".join("1" if c else "0" for c in np.asarray(correct, dtype=bool))


def from_bits(bits: str) -> np.ndarray:
    """The inverse of ``to_bits``: ``[n]`` bool."""
    return np.frombuffer(bits.encode("ascii"), dtype=np.uint8) == ord("1")
