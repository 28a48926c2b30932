"""Task metrics of the final logits of an intervened run, as discovery reports them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import CircuitDistillError
from ..tasks.base import TaskData
from ..tasks.metrics import METRICS, per_example, summarise


def metric_means(logits: torch.Tensor, task_data: TaskData, metrics: Sequence[str]) -> dict[str, float]:
    """Mean of each of ``metrics`` over the examples, from final logits ``[n, vocab]`` of
    ``task_data``'s prompts (``logit_diff`` skips rows without a wrong answer)."""
    s = summarise(per_example(logits, task_data.answer_ids, task_data.wrong_ids))
    bad = [m for m in metrics if m not in s]
    if bad:
        raise CircuitDistillError(f"unknown metric(s) {', '.join(bad)}; available: {', '.join(METRICS)}")
    return {m: s[m] for m in metrics}
