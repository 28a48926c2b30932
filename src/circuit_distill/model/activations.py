"""The one activation reader: run a model over token ids in batches and return what chosen
components output, for every stage that needs activations (ablation values, patching, alignment,
the model card, the demo's CKA matcher)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .components import Component
from .hooks import capture
from .logits import answer_logits


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, seq, vocab]`` of one forward without a KV cache (encoders take no ``use_cache``)."""
    kw = {} if getattr(model, "is_encoder", False) else {"use_cache": False}
    return model(input_ids, attention_mask, **kw)


@torch.no_grad()
def read_activations(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     components: Sequence[Component], *, batch_size: int | None = 64,
                     real_tokens: bool = False, to_cpu: bool = True) -> dict[Component, torch.Tensor]:
    """Outputs of ``components`` on ``input_ids [n, seq]`` (``attention_mask [n, seq]``, 1 = real).

    Returns ``comp -> [n, seq, d]``, or with ``real_tokens=True`` ``comp -> [m, d]`` (the real tokens,
    row-major; ``m`` = ``attention_mask.sum()``). Heads are their output before the output projection
    (``d = d_head``), MLPs and residual points ``d_model``. ``batch_size=None`` runs one forward;
    rows of a batch keep the full ``seq`` width, so batching does not change padding. ``to_cpu``:
    float32 on the CPU, else the model's device and dtype.
    """
    comps = list(components)
    n = input_ids.shape[0]
    step = n if batch_size is None else batch_size
    outs: dict[Component, list[torch.Tensor]] = {c: [] for c in comps}
    for s in range(0, n, max(step, 1)):
        ids = input_ids[s:s + step].to(model.device)
        mask = attention_mask[s:s + step].to(model.device)
        with capture(model, comps, detach=True) as cap:  # the components only: unembed one token per row
            answer_logits(model, ids, mask, torch.zeros(ids.shape[0], dtype=torch.long))
            for c in comps:
                a = cap[c]
                if real_tokens:
                    a = a[mask > 0]
                outs[c].append(a.float().cpu() if to_cpu else a)
    return {c: v[0] if len(v) == 1 else torch.cat(v) for c, v in outs.items()}
