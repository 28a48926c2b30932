"""Logits at a few positions only. On a 49k-262k vocabulary the full ``[batch, seq, vocab]`` logits
dominate a forward pass's time and memory (and a training step's backward); most stages need one
position per row.

``unembedding_at(model, positions)`` hooks the model's output embedding (``get_output_embeddings()``:
the tied or untied ``lm_head`` / ``embed_out``, an encoder's decoder) so that it sees only the hidden
states at ``positions``. The model's own forward still runs everything else: the final norm before it,
and whatever comes after it (Gemma 2's final logit soft-capping, an encoder's prediction-head transform
runs per position before it), so the logits are the model's own at those positions, with no check and
no family list. Because the hook sits inside the model, it also works through a wrapper that calls the
model (``accelerate``'s mixed precision, DDP). ``answer_logits`` is the one-call form.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import CircuitDistillError
from .loading import position_ids_from_mask


def select_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x [batch, seq, ...]`` at ``positions`` ``[batch]`` -> ``[batch, ...]`` (or ``[batch, k]`` -> ``[batch, k, ...]``)."""
    pos = positions.to(x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, pos] if pos.dim() == 1 else x[rows[:, None], pos]


def unembed(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final-norm outputs ``[..., d_model]`` -> logits ``[..., vocab]``: the output embedding, then the
    config's ``final_logit_softcapping`` (Gemma 2) if set. For code that runs the last layers itself
    (the layer replay); a model's forward gets the same through ``unembedding_at``."""
    hf = model.hf
    logits = hf.get_output_embeddings()(hidden)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@contextmanager
def unembedding_at(model, positions: torch.Tensor):
    """Within the context, a forward of ``model`` (a ``Model``) on ``[batch, seq]`` ids returns logits
    ``[batch, 1, vocab]`` (``positions [batch]``) or ``[batch, k, vocab]`` (``positions [batch, k]``):
    the output embedding runs on the hidden states at those positions only. Call the model (or its
    ``accelerate``-prepared module) inside; every forward in the context must have ``batch`` rows.
    Yields True, or False (and changes nothing: the full logits come back) for a model without an
    output embedding."""
    head = model.hf.get_output_embeddings()
    if head is None:
        yield False
        return
    pos = positions if positions.dim() == 2 else positions[:, None]

    def pre(mod, args, kwargs):
        x = args[0] if args else kwargs["input"]
        if x.dim() != 3 or x.shape[0] != pos.shape[0]:
            raise CircuitDistillError(
                f"unembedding_at: the output embedding got {tuple(x.shape)} for {pos.shape[0]} rows of positions; "
                "run only forwards of the batch the positions belong to inside the context")
        x = select_positions(x, pos)
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, input=x))

    handle = head.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield True
    finally:
        handle.remove()


def answer_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  positions: torch.Tensor, *, module=None) -> torch.Tensor:
    """Logits at ``positions`` only: ``input_ids [batch, seq]``, ``positions [batch]`` -> ``[batch, vocab]``
    (``[batch, k]`` -> ``[batch, k, vocab]``), the model's own logits there (to float rounding).

    Runs under the caller's grad mode (a training step backpropagates through it), inside any hooks
    the caller has open, and never builds the ``[batch, seq, vocab]`` tensor. ``module``: what to call
    instead of ``model.hf`` (the ``accelerate``-prepared model of a training run)."""
    with unembedding_at(model, positions) as sliced:
        if module is None:
            logits = model(input_ids, attention_mask, **({} if model.is_encoder else {"use_cache": False}))
        else:
            kw = {} if attention_mask is None or model.is_encoder else {
                "position_ids": position_ids_from_mask(attention_mask)}
            logits = module(input_ids=input_ids, attention_mask=attention_mask, **kw).logits
    if not sliced:  # no output embedding to hook: the full logits came back
        return select_positions(logits, positions)
    return logits[:, 0] if positions.dim() == 1 else logits
