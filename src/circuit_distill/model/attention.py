"""Attention patterns: a forward that returns every layer's attention probabilities, the eager-attention
switch it needs (SDPA and flash attention return no patterns), and batch-mean patterns indexed by
real-token position (padding side does not matter)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch

from ..errors import CircuitDistillError
from .loading import position_ids_from_mask


@contextmanager
def eager_attention(model):
    """Run ``model`` with eager attention inside the block (SDPA and flash attention return no
    patterns), then switch back to what it had."""
    hf = model.hf
    was = getattr(hf.config, "_attn_implementation", None)
    switched = was != "eager"
    if switched:
        if not hasattr(hf, "set_attn_implementation"):
            raise CircuitDistillError(
                f"{type(hf).__name__} runs {was!r} attention, which returns no attention patterns; load it "
                "with load_model(..., attn_implementation='eager') or use similarity='cka'")
        hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switched:
            hf.set_attn_implementation(was)


def forward_attentions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One forward of ``input_ids [batch, seq]`` (``attention_mask [batch, seq]``, 1 = real) returning the
    attention probabilities of every layer: ``n_layers`` tensors ``[batch, n_heads, seq, seq]`` (query,
    key). Needs eager attention (see ``eager_attention``); decoders get position ids from the mask, so
    left padding does not shift positions."""
    kw = {} if model.is_encoder else {"position_ids": position_ids_from_mask(attention_mask), "use_cache": False}
    out = model.hf(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, **kw)
    atts = getattr(out, "attentions", None)
    if not atts or any(a is None for a in atts):
        raise CircuitDistillError(f"{type(model.hf).__name__} returned no attention patterns; load it with "
                                  "attn_implementation='eager' or use similarity='cka'")
    return atts


@torch.no_grad()
def attention_patterns(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       layers: Iterable[int] | None = None, *, batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Batch-mean attention patterns ``layer -> [n_heads, T, T]`` (float32, cpu) of the prompts
    ``input_ids [batch, seq]`` (``attention_mask [batch, seq]``, 1 = real).

    Indexed by real-token index (row ``i`` = the ``i``-th real query token, column ``j`` = the
    ``j``-th real key token), so padding side does not matter; query row ``i`` is averaged over the
    prompts that have an ``i``-th token. ``T`` = the longest prompt. Runs ``batch_size`` prompts per
    forward; switches the model to eager attention for the call and back afterwards.
    """
    layers = list(range(model.arch.n_layers)) if layers is None else sorted(set(layers))
    T = int(attention_mask.sum(1).max())
    H = model.arch.n_heads
    sums = {layer: torch.zeros(H, T, T, dtype=torch.float64) for layer in layers}
    counts = torch.zeros(T, dtype=torch.float64)
    with eager_attention(model):
        for s in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[s:s + batch_size].to(model.device)
            mask = attention_mask[s:s + batch_size].to(model.device)
            out = forward_attentions(model, ids, mask)
            mask = mask.cpu()
            for r in range(ids.shape[0]):
                real = torch.nonzero(mask[r] > 0).flatten()
                L = len(real)
                counts[:L] += 1
                for layer in layers:
                    a = out[layer][r].float().cpu()  # [H, seq, seq]
                    sums[layer][:, :L, :L] += a[:, real][:, :, real].double()
    return {layer: (sums[layer] / counts.clamp(min=1)[None, :, None]).float() for layer in layers}
