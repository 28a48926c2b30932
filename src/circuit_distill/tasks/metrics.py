"""Task metrics from next-token logits: answer probability, accuracy and logit difference."""

from __future__ import annotations

import torch

from ..model.logits import answer_logits
from .base import Batch, TaskData

METRICS = ("answer_prob", "accuracy", "logit_diff")


def final_logits(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick each row's logits at its answer position: ``[n, seq, vocab]`` x ``[n]`` -> ``[n, vocab]``."""
    return logits[torch.arange(logits.shape[0], device=logits.device), positions.to(logits.device)]


def per_example(logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
    """Per-example metrics from final logits ``[n, vocab]``: each value is ``[n]`` (float32).

    ``logit_diff`` is logit(answer) - logit(wrong); rows whose wrong id is negative (no wrong
    answer) get NaN there.
    """
    logits = logits.float()
    rows = torch.arange(logits.shape[0], device=logits.device)
    ans = answer_ids.to(logits.device)
    out = {
        "answer_prob": logits.softmax(-1)[rows, ans],
        "accuracy": (logits.argmax(-1) == ans).float(),
    }
    if wrong_ids is not None:
        w = wrong_ids.to(logits.device)
        ld = logits[rows, ans] - logits[rows, w.clamp(min=0)]
        out["logit_diff"] = torch.where(w >= 0, ld, torch.full_like(ld, float("nan")))
    return out


def summarise(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over examples (NaN-aware for logit difference)."""
    return {k: float(v.nanmean()) if v.numel() else float("nan") for k, v in values.items()}


@torch.no_grad()
def batched_final_logits(model, batch: Batch, positions: torch.Tensor, *, batch_size: int = 64,
                         progress: bool | None = None, desc: str = "evaluate") -> torch.Tensor:
    """Run ``model`` over ``batch`` in chunks and return ``[n, vocab]`` logits at ``positions`` (the
    unembedding runs at those positions only, see ``model.logits.answer_logits``)."""
    from tqdm.auto import tqdm

    n = len(batch)
    chunks = range(0, n, batch_size)
    show = progress if progress is not None else n > 20 * batch_size
    outs = []
    for s in tqdm(chunks, desc=desc, disable=not show, leave=False):
        b = batch.subset(slice(s, s + batch_size)).to(model.device)
        logits = answer_logits(model, b.input_ids, b.attention_mask, positions[s:s + batch_size])
        outs.append(logits.float().cpu())
    return torch.cat(outs)


def evaluate(model, task_data: TaskData, *, batch_size: int = 64, progress: bool | None = None,
             position: str = "last") -> dict[str, float]:
    """Mean ``accuracy``, ``answer_prob`` and ``logit_diff`` of ``model`` on ``task_data``'s clean
    prompts, predicting the answer at named position ``position`` (default the last token)."""
    logits = batched_final_logits(model, task_data.clean, task_data.position(position),
                                  batch_size=batch_size, progress=progress)
    return summarise(per_example(logits, task_data.answer_ids, task_data.wrong_ids))
