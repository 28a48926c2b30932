"""The layer-replay engine: re-run a decoder's layers ``L..`` from a cached clean prefix.

Replacing a component of layer ``L`` leaves the residual stream entering layer ``L`` unchanged, so
one clean forward of a batch can serve many interventions. ``LayerReplay`` runs that forward once
and keeps each decoder layer's input together with the exact arguments the model passed to it
(masks, rotary position embeddings, position ids); ``logits_from(L, hidden)`` re-runs only layers
``L..`` plus the final norm and unembedding (``model.logits.unembed``, with Gemma 2's soft-capping), at
one position per row. Several interventions share one forward: ``k`` copies of the ``n`` rows are
stacked along the batch (copy-major: ``[k * n, seq, d_model]``, copy ``j`` is rows
``j * n .. (j + 1) * n - 1``) and ``stacked_replacement`` gives each copy its own replacement;
``replay_items`` does both for a list of interventions. Replaying the model's own layer modules with
its own arguments keeps this family-agnostic; a check of the final norm + unembedding against the
model's logits guards the one piece called here (``find_final_norm``). The clean run itself unembeds
the positions only (``model.logits.answer_logits``).

Used by the fast ablation sweep (``sweep.py``) and activation patching (``patching.py``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from ..errors import ComponentError, FastSweepUnsupported
from ..model.components import Component
from ..model.logits import answer_logits, unembed
from ..tasks.base import Batch

FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_norm", "final_layernorm")
"""Attribute names of the final norm on a Hugging Face base model, tried in this order."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _tile(x, k: int, n: int):
    """Repeat every tensor whose leading dim is the batch ``n`` ``k`` times along it (copy-major)."""
    if k == 1:
        return x
    if isinstance(x, torch.Tensor):
        return x.repeat(k, *([1] * (x.dim() - 1))) if x.dim() and x.shape[0] == n and n > 1 else x
    if isinstance(x, tuple):
        return tuple(_tile(v, k, n) for v in x)
    if isinstance(x, list):
        return [_tile(v, k, n) for v in x]
    if isinstance(x, dict):
        return {key: _tile(v, k, n) for key, v in x.items()}
    return x


def find_final_norm(hf) -> torch.nn.Module:
    """The final norm (applied after the last decoder layer, before the unembedding) of a Hugging Face
    causal LM: the first of ``FINAL_NORMS`` on its base model. Raises ``FastSweepUnsupported``."""
    base = getattr(hf, "base_model", hf)
    for name in FINAL_NORMS:
        mod = getattr(base, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise FastSweepUnsupported(f"fast sweep: found no final norm ({', '.join(FINAL_NORMS)}) in "
                               f"{type(base).__name__}; use fast=False")


class LayerReplay:
    """One clean run of ``batch`` (``n`` rows) with every decoder layer's inputs kept, to re-run layers ``L..``.

    ``positions`` ``[n]``: the token of each row whose logits are wanted. After construction
    ``logits`` ``[n, vocab]`` (float32, model device) are the clean logits there. ``hidden(L)`` is
    layer ``L``'s clean input ``[n, seq, d_model]``; ``logits_from(L, hidden)`` takes a
    ``[k * n, seq, d_model]`` stack of ``k`` copies of such an input and returns logits
    ``[k * n, vocab]`` at ``positions`` (final norm + unembedding run on those positions only).
    Raises ``FastSweepUnsupported`` if the final norm + unembedding do not reproduce the model's
    logits (a family that post-processes them).
    """

    def __init__(self, model, batch: Batch, positions: torch.Tensor):
        self.model = model
        self.arch = model.arch
        hf = model.hf
        self.n = len(batch)
        self.positions = positions.to(model.device)
        self.inputs: list[tuple[tuple, dict]] = [None] * self.arch.n_layers  # type: ignore[list-item]
        self.logits, last_out = self._record(batch)
        self.norm = find_final_norm(hf)
        if hf.get_output_embeddings() is None:
            raise FastSweepUnsupported(f"{type(hf).__name__} has no output embeddings; use fast=False")
        tail = self._tail(last_out)
        err = (tail - self.logits).abs().max().item()
        if not err <= 1e-4 * max(1.0, self.logits.abs().max().item()):
            raise FastSweepUnsupported(
                f"fast sweep: final norm + unembedding do not reproduce {type(hf).__name__}'s logits "
                f"(max abs error {err:.3g}); this family post-processes logits. Use fast=False."
            )

    def _record(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean forward: fills ``self.inputs``; returns its logits at the positions ``[n, vocab]``
        (float32; the unembedding runs there only) and the last layer's output ``[n, seq, d_model]``."""
        hf = self.model.hf
        handles = []
        last_out: list[torch.Tensor] = []
        try:
            for layer in range(self.arch.n_layers):
                def pre(mod, args, kwargs, layer=layer):
                    self.inputs[layer] = (tuple(args), dict(kwargs))
                handles.append(self.arch.layer(hf, layer).register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(self.arch.layer(hf, self.arch.n_layers - 1).register_forward_hook(
                lambda m, a, o: last_out.append(_first(o))))
            with torch.no_grad():
                b = batch.to(self.model.device)
                logits = answer_logits(self.model, b.input_ids, b.attention_mask, self.positions).float()
        finally:
            for h in handles:
                h.remove()
        return logits, last_out[0]

    def hidden(self, layer: int) -> torch.Tensor:
        """The clean input of ``layer``: ``[n, seq, d_model]``."""
        args, kwargs = self.inputs[layer]
        return args[0] if args else kwargs["hidden_states"]

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + unembedding of ``h [k * n, seq, d_model]`` at the positions: ``[k * n, vocab]``."""
        k = h.shape[0] // self.n
        pos = self.positions.repeat(k)
        sel = h[torch.arange(h.shape[0], device=h.device), pos]  # [k*n, d_model]
        return unembed(self.model, self.norm(sel)).float()

    @torch.no_grad()
    def logits_from(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run layers ``layer..`` on ``hidden [k * n, seq, d_model]`` (``k`` stacked copies of the
        rows) with the recorded arguments; logits ``[k * n, vocab]`` (float32) at the positions."""
        k = hidden.shape[0] // self.n
        h = hidden
        for layer_i in range(layer, self.arch.n_layers):
            args, kwargs = self.inputs[layer_i]
            args, kwargs = _tile(args, k, self.n), _tile(kwargs, k, self.n)
            if args:
                args = (h,) + tuple(args[1:])
            else:
                kwargs = dict(kwargs, hidden_states=h)
            h = _first(self.arch.layer(self.model.hf, layer_i)(*args, **kwargs))
        return self._tail(h)


@contextmanager
def stacked_replacement(model, layer: int, items: Sequence[tuple[Component, torch.Tensor]], n: int):
    """Hooks that, in a ``[k * n, ...]`` stack of ``k`` copies of ``n`` rows run through ``layer``,
    replace component ``items[j][0]``'s activation in copy ``j`` by ``items[j][1]`` (``[n, seq, d]``:
    ``d_head`` for a head, ``d_model`` for an MLP). Copies beyond ``len(items)`` run unchanged.
    Raises ``ComponentError`` for a component that is not a head or MLP of ``layer``."""
    arch, hf = model.arch, model.hf
    H, dh = arch.n_heads, arch.d_head
    for c, _ in items:
        if c.layer != layer or c.kind not in ("head", "mlp"):
            raise ComponentError(f"{c}: stacked replacement in layer {layer} takes heads and MLPs of that layer")
    heads = [(j, c, v) for j, (c, v) in enumerate(items) if c.is_head]
    mlps = [(j, c, v) for j, (c, v) in enumerate(items) if c.kind == "mlp"]
    handles = []
    try:
        if heads:
            def pre(mod, args, kwargs):
                key = None if args else ("hidden_states" if "hidden_states" in kwargs else "input")
                x = (args[0] if args else kwargs[key]).clone()
                v = x.view(-1, n, x.shape[1], H, dh)
                for j, c, val in heads:
                    v[j, :, :, c.head] = val.to(device=x.device, dtype=x.dtype)
                if args:
                    return (x,) + tuple(args[1:]), kwargs
                return args, dict(kwargs, **{key: x})
            handles.append(arch.o_proj(hf, layer).register_forward_pre_hook(pre, with_kwargs=True))
        if mlps:
            def post(mod, args, out):
                o = _first(out).clone()
                v = o.view(-1, n, *o.shape[1:])
                for j, _c, val in mlps:
                    v[j] = val.to(device=o.device, dtype=o.dtype)
                return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o
            handles.append(arch.mlp(hf, layer).register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def replay_items(model, replay: LayerReplay, items: Sequence[tuple[Component, Callable[[], torch.Tensor]]], *,
                 batch_size: int = 64, bar=None) -> tuple[list[torch.Tensor], float]:
    """Logits ``[n, vocab]`` (float32, cpu) at the replay's positions for each item ``(comp, value_fn)``:
    ``comp``'s activation replaced by ``value_fn()`` (``[n, seq, d]``) alone, everything else as in the
    replay's clean run. Items of one layer share forwards (up to ``batch_size`` rows each);
    ``value_fn`` is called only when its forward runs. ``bar`` (a progress bar) is advanced by one per
    item. Also returns the cost in units of one full forward over the ``n`` rows (re-running ``j``
    of ``N`` layers for ``k`` copies costs ``k * j / N``)."""
    n, n_layers = replay.n, model.arch.n_layers
    per_fwd = max(1, batch_size // n)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, (c, _) in enumerate(items):
        by_layer[c.layer].append(i)
    out: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    cost = 0.0
    for layer in sorted(by_layer):
        idx = by_layer[layer]
        h0 = replay.hidden(layer)
        for s in range(0, len(idx), per_fwd):
            group = idx[s:s + per_fwd]
            k = len(group)
            with stacked_replacement(model, layer, [(items[i][0], items[i][1]()) for i in group], n):
                logits = replay.logits_from(layer, h0.repeat(k, *([1] * (h0.dim() - 1))))
            for j, i in enumerate(group):
                out[i] = logits[j * n:(j + 1) * n].cpu()
            cost += k * (n_layers - layer) / n_layers
            if bar is not None:
                bar.update(k)
    return out, cost
