"""``capture`` and ``intervene``: read and change component activations of an unmodified HF model.

A head's activation is its output *before* the output projection (``[batch, seq, d_head]``):
the input of the output projection, split by head, read with a forward pre-hook. That works
under eager, SDPA and flash attention alike. MLP and residual activations are ``[batch, seq,
d_model]``. Hooks are always removed, also when the block raises.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Union

import torch

from .components import Component, parse_components

Replacement = Union[None, str, float, int, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
Positions = Union[None, int, torch.Tensor]


def _arch_and_module(model):
    """Accept a ``Model`` (anything with ``.hf`` and ``.arch``)."""
    if not hasattr(model, "arch") or not hasattr(model, "hf"):
        raise TypeError("expected a circuit_distill Model (from load_model); got " + type(model).__name__)
    return model.arch, model.hf


def _in_backward() -> bool:
    # Gradient checkpointing re-runs forwards inside backward; hooks must not record those.
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - older torch
        return False


def _select(act: torch.Tensor, positions: Positions) -> torch.Tensor:
    """Pick positions from ``act [batch, seq, d]``: int -> [batch, d]; [batch] -> [batch, d]; [batch, k] -> [batch, k, d]."""
    if positions is None:
        return act
    if isinstance(positions, int):
        return act[:, positions]
    pos = positions.to(act.device)
    rows = torch.arange(act.shape[0], device=act.device)
    if pos.dim() == 1:
        return act[rows, pos]
    return act[rows[:, None], pos]


def _replace(act: torch.Tensor, repl: Replacement, positions: Positions) -> torch.Tensor:
    """Return a copy of ``act [batch, seq, d]`` with ``repl`` applied (at ``positions`` only, if given)."""
    if positions is None:
        if callable(repl) and not isinstance(repl, torch.Tensor):
            new = repl(act)
            if new.shape != act.shape:
                raise ValueError(f"intervention function returned shape {tuple(new.shape)}, expected {tuple(act.shape)}")
            return new
        if repl is None or (isinstance(repl, str) and repl == "zero"):
            return torch.zeros_like(act)
        if isinstance(repl, (int, float)):
            return torch.full_like(act, float(repl))
        return repl.to(device=act.device, dtype=act.dtype).expand_as(act).clone()
    out = act.clone()
    sel = _select(act, positions)
    if callable(repl) and not isinstance(repl, torch.Tensor):
        new = repl(sel)
    elif repl is None or (isinstance(repl, str) and repl == "zero"):
        new = torch.zeros_like(sel)
    elif isinstance(repl, (int, float)):
        new = torch.full_like(sel, float(repl))
    else:
        new = repl.to(device=act.device, dtype=act.dtype).expand_as(sel)
    if isinstance(positions, int):
        out[:, positions] = new
        return out
    pos = positions.to(act.device)
    rows = torch.arange(act.shape[0], device=act.device)
    if pos.dim() == 1:
        out[rows, pos] = new
    else:
        out[rows[:, None], pos] = new
    return out


class Captured(Mapping):
    """Activations recorded by ``capture``, keyed by ``Component`` (string names work too)."""

    def __init__(self, arch, comps: list[Component], positions: Positions):
        self._arch = arch
        self._comps = comps
        self._positions = positions
        self._z: dict[int, torch.Tensor] = {}  # layer -> o_proj input [batch, seq, n_heads*d_head]
        self._other: dict[Component, torch.Tensor] = {}

    def __getitem__(self, key) -> torch.Tensor:
        comp = Component.parse(key)
        if comp not in self._comps:
            raise KeyError(f"{comp} was not captured; captured: {', '.join(map(str, self._comps))}")
        if comp.is_head:
            if comp.layer not in self._z:
                raise KeyError(f"{comp}: no forward pass has run inside the capture block yet")
            z = self._z[comp.layer]
            a = z.view(*z.shape[:-1], self._arch.n_heads, self._arch.d_head)[..., comp.head, :]
        else:
            if comp not in self._other:
                raise KeyError(f"{comp}: no forward pass has run inside the capture block yet")
            a = self._other[comp]
        return _select(a, self._positions)

    def __iter__(self):
        return iter(self._comps)

    def __len__(self) -> int:
        return len(self._comps)

    def layer_heads(self, layer: int) -> torch.Tensor:
        """All heads of ``layer`` at once: ``[batch, seq, n_heads, d_head]`` (or selected positions)."""
        z = self._z[layer]
        a = z.view(*z.shape[:-1], self._arch.n_heads, self._arch.d_head)
        if self._positions is None:
            return a
        b, s = a.shape[:2]
        return _select(a.reshape(b, s, -1), self._positions).unflatten(-1, (self._arch.n_heads, self._arch.d_head))

    def clear(self) -> None:
        self._z.clear()
        self._other.clear()


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def capture(model, components: Iterable[Component | str] | str, positions: Positions = None,
            detach: bool = False):
    """Record the activations of ``components`` during forward passes run inside the block.

    Yields a ``Captured`` mapping: head -> ``[batch, seq, d_head]``, MLP/residual ->
    ``[batch, seq, d_model]``; with ``positions`` (an int, or a LongTensor ``[batch]`` or
    ``[batch, k]``) only those positions: ``[batch, d]`` or ``[batch, k, d]``. The autograd graph is
    kept when gradients are enabled (unless ``detach``). A later forward overwrites earlier records.
    """
    arch, hf = _arch_and_module(model)
    comps = sorted(set(arch.check_component(c) for c in parse_components(components)))
    cap = Captured(arch, comps, positions)
    handles = []
    head_layers = sorted({c.layer for c in comps if c.is_head})

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach() if detach else t

    try:
        for layer in head_layers:
            def pre(mod, args, kwargs, layer=layer):
                if not _in_backward():
                    x = args[0] if args else kwargs["hidden_states"] if "hidden_states" in kwargs else kwargs["input"]
                    cap._z[layer] = keep(x)
            handles.append(arch.o_proj(hf, layer).register_forward_pre_hook(pre, with_kwargs=True))
        for c in comps:
            if c.kind == "mlp":
                def post(mod, args, out, c=c):
                    if not _in_backward():
                        cap._other[c] = keep(_first(out))
                handles.append(arch.mlp(hf, c.layer).register_forward_hook(post))
            elif c.kind == "resid_pre":
                def pre_r(mod, args, kwargs, c=c):
                    if not _in_backward():
                        cap._other[c] = keep(args[0] if args else kwargs["hidden_states"])
                handles.append(arch.layer(hf, c.layer).register_forward_pre_hook(pre_r, with_kwargs=True))
            elif c.kind == "resid_post":
                def post_r(mod, args, out, c=c):
                    if not _in_backward():
                        cap._other[c] = keep(_first(out))
                handles.append(arch.layer(hf, c.layer).register_forward_hook(post_r))
        yield cap
    finally:
        for h in handles:
            h.remove()


@contextmanager
def intervene(model, replacements: Mapping[Component | str, Replacement], positions: Positions = None):
    """Replace component activations during forward passes run inside the block.

    ``replacements`` maps a component to ``"zero"`` (or ``None``), a number, a tensor
    broadcastable to the activation (``[batch, seq, d]``, or to the selected positions'
    ``[batch, d]`` / ``[batch, k, d]`` when ``positions`` is given) or a function of the activation
    returning the new one. Heads are replaced before the output projection, so a zeroed head
    contributes nothing (biases stay, as in the model).
    """
    arch, hf = _arch_and_module(model)
    by_layer: dict[int, list[tuple[int, Replacement]]] = defaultdict(list)
    others: list[tuple[Component, Replacement]] = []
    for key, repl in replacements.items():
        comp = arch.check_component(Component.parse(key))
        if comp.is_head:
            by_layer[comp.layer].append((comp.head, repl))
        else:
            others.append((comp, repl))
    handles = []
    H, dh = arch.n_heads, arch.d_head

    try:
        for layer, items in by_layer.items():
            def pre(mod, args, kwargs, items=items):
                if args:
                    x = args[0]
                else:
                    key = "hidden_states" if "hidden_states" in kwargs else "input"
                    x = kwargs[key]
                heads = x.view(*x.shape[:-1], H, dh)
                parts = list(heads.unbind(-2))
                for h, repl in items:
                    parts[h] = _replace(parts[h], repl, positions)
                new = torch.stack(parts, dim=-2).reshape(x.shape)
                if args:
                    return (new,) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs[key] = new
                return args, kwargs
            handles.append(arch.o_proj(hf, layer).register_forward_pre_hook(pre, with_kwargs=True))
        for comp, repl in others:
            if comp.kind in ("mlp", "resid_post"):
                mod = arch.mlp(hf, comp.layer) if comp.kind == "mlp" else arch.layer(hf, comp.layer)

                def post(mod, args, out, repl=repl):
                    if isinstance(out, tuple):
                        return (_replace(out[0], repl, positions),) + tuple(out[1:])
                    return _replace(out, repl, positions)
                handles.append(mod.register_forward_hook(post))
            else:  # resid_pre
                def pre_r(mod, args, kwargs, repl=repl):
                    if args:
                        return (_replace(args[0], repl, positions),) + tuple(args[1:]), kwargs
                    kwargs = dict(kwargs)
                    kwargs["hidden_states"] = _replace(kwargs["hidden_states"], repl, positions)
                    return args, kwargs
                handles.append(arch.layer(hf, comp.layer).register_forward_pre_hook(pre_r, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def head_contributions(model, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each head's contribution to the attention output: ``z [..., n_heads*d_head]`` -> ``[..., n_heads, d_model]``.

    Uses the output projection's weight slices (no bias): summing over heads and adding the bias
    gives the attention output.
    """
    arch, hf = _arch_and_module(model)
    W = arch.o_proj(hf, layer).weight
    if arch.family.o_conv1d:
        W = W.t()  # Conv1D stores [in, out]
    W = W.to(z.dtype).view(W.shape[0], arch.n_heads, arch.d_head)  # [d_model, H, dh]
    zh = z.view(*z.shape[:-1], arch.n_heads, arch.d_head)
    return torch.einsum("...hd,mhd->...hm", zh, W)


