"""Joint ablation: the final logits and metrics with a set of heads and MLPs ablated together
(zero, mean or resample; see ``values.py``). Faithfulness and pruning are built on it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..model.components import Component
from ..model.hooks import intervene
from ..model.logits import answer_logits
from ..tasks.base import TaskData
from ..tasks.metrics import METRICS
from .scoring import metric_means
from .values import AblationValues, ablatable_components, ablation_values


@torch.no_grad()
def ablated_logits(model, task_data: TaskData, components: Iterable[Component | str], *,
                   values: AblationValues | None = None, method: str = "mean", per_position: bool = True,
                   position: str = "last", batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """Final logits ``[n, vocab]`` (float32, cpu) at named ``position`` of the clean prompts with
    ``components`` ablated together (``values``: precomputed replacements, else built by ``method``)."""
    comps = ablatable_components(model, components) if components else []
    if values is None and comps:
        values = ablation_values(model, task_data, comps, method=method, per_position=per_position,
                                 seed=seed, batch_size=batch_size)
    pos = task_data.position(position)
    outs = []
    for s in range(0, len(task_data), batch_size):
        rows = torch.arange(s, min(s + batch_size, len(task_data)))
        b = task_data.clean.subset(rows).to(model.device)
        repl = values.for_batch(task_data.clean, comps, rows=rows) if comps else {}
        with intervene(model, repl):  # unembedding at the answer positions only
            logits = answer_logits(model, b.input_ids, b.attention_mask, pos[rows])
        outs.append(logits.float().cpu())
    return torch.cat(outs)


def ablate(model, task_data: TaskData, components: Iterable[Component | str], *, method: str = "mean",
           per_position: bool = True, metrics: Sequence[str] = METRICS, position: str = "last",
           batch_size: int = 64, values: AblationValues | None = None, seed: int = 0) -> dict[str, float]:
    """Mean ``metrics`` over the clean prompts with all ``components`` ablated together
    (an empty set gives the clean metrics). Used for faithfulness and pruning."""
    logits = ablated_logits(model, task_data, list(components), values=values, method=method,
                            per_position=per_position, position=position, batch_size=batch_size, seed=seed)
    return metric_means(logits, task_data, metrics)
