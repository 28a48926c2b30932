"""Logits at a few positions only: run the base model, then the final norm's output at the chosen
positions through the unembedding. On a 49k-262k vocabulary the full ``[batch, seq, vocab]`` logits
dominate a forward pass's time and memory; most stages need one position per row.

The base model (``hf.base_model``) already ends with the final norm, so ``answer_logits`` only adds
the output embedding and, where the config asks for it, Gemma 2's final logit soft-capping. It is
checked once per model against the model's own logits; a family that post-processes logits in some
other way falls back to the full logits (same numbers, no saving).
"""

from __future__ import annotations

import weakref

import torch

from .loading import position_ids_from_mask

_HEAD_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf module -> answer head reproduces logits


def select_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x [batch, seq, ...]`` at ``positions`` ``[batch]`` -> ``[batch, ...]`` (or ``[batch, k]`` -> ``[batch, k, ...]``)."""
    pos = positions.to(x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, pos] if pos.dim() == 1 else x[rows[:, None], pos]


def unembed(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final-norm outputs ``[..., d_model]`` -> logits ``[..., vocab]``: the output embedding, then the
    config's ``final_logit_softcapping`` (Gemma 2) if set."""
    hf = model.hf
    logits = hf.get_output_embeddings()(hidden)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _forward_kwargs(model, attention_mask: torch.Tensor | None) -> dict:
    """What ``Model.__call__`` passes besides the ids: mask-derived positions and no KV cache."""
    kw: dict = {"attention_mask": attention_mask, "use_cache": False}
    if attention_mask is not None:
        kw["position_ids"] = position_ids_from_mask(attention_mask)
    return kw


def _base_logits(model, input_ids, attention_mask, positions) -> torch.Tensor:
    hidden = model.hf.base_model(input_ids=input_ids, **_forward_kwargs(model, attention_mask))
    return unembed(model, select_positions(hidden.last_hidden_state, positions))


def _full_logits(model, input_ids, attention_mask, positions) -> torch.Tensor:
    kw = {} if model.is_encoder else {"use_cache": False}
    return select_positions(model(input_ids, attention_mask, **kw), positions)


@torch.no_grad()
def _head_reproduces_logits(model) -> bool:
    """One small forward both ways (2 rows of 5 tokens): does ``_base_logits`` give the model's logits?"""
    hf = model.hf
    if hf not in _HEAD_OK:
        ok = False
        if not model.is_encoder and hf.get_output_embeddings() is not None and hf.base_model is not hf:
            vocab = hf.get_input_embeddings().weight.shape[0]
            ids = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(0)).to(model.device)
            mask, pos = torch.ones_like(ids), torch.tensor([4, 2], device=model.device)
            want = _full_logits(model, ids, mask, pos).float()
            got = _base_logits(model, ids, mask, pos).float()
            ok = bool((got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item()))
        _HEAD_OK[hf] = ok
    return _HEAD_OK[hf]


def answer_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  positions: torch.Tensor) -> torch.Tensor:
    """Logits at ``positions`` only: ``input_ids [batch, seq]``, ``positions [batch]`` -> ``[batch, vocab]``
    (``[batch, k]`` -> ``[batch, k, vocab]``), equal to the full logits there (to float rounding).

    Runs under the caller's grad mode (so a training step can backpropagate through it) and never
    builds the ``[batch, seq, vocab]`` tensor, except for families whose logits are more than the
    unembedding of the final norm (encoders' prediction heads), where it selects from the full logits.
    """
    if _head_reproduces_logits(model):
        return _base_logits(model, input_ids, attention_mask, positions)
    return _full_logits(model, input_ids, attention_mask, positions)
