"""Path patching through receivers' queries or keys/values, layer by layer (Prakash et al. 2024's tool).

``path_patching`` (``patching.py``) lets a sender's effect through receivers and then runs the rest of
the model live, one full forward per sender. Here every component off the path stays frozen at its
clean value, so a path is a chain of single-layer runs:

1. **sender**: layer ``l`` re-run on its clean input with the sender head's output (before the
   output projection) taken from the corrupted run at the chosen positions, its MLP frozen; the
   sender's contribution to the residual stream is ``delta = out' - out_clean`` (``[n, seq, d_model]``;
   with Gemma's norms after attention inside it).
2. **each hop** ``(receivers, route)``: every layer holding a receiver is re-run on ``clean input +
   the deltas written by earlier layers``, with only the receivers recomputed (every other head's
   output and the MLP frozen at clean values) and only through ``route``: ``"q"`` recomputes their
   queries (keys and values frozen at clean), ``"kv"`` their keys and values (queries frozen),
   ``"qkv"`` all three. Their own contribution change becomes the next hop's delta.
3. **logits**: the last deltas are added to the clean final residual stream; final norm and
   unembedding at the scored position. No hop = the sender's direct effect on the logits.

``score = (m_clean - m_patched) / (m_clean - m_corrupted)`` (1 = the whole clean/corrupted gap).

Cost: one run of one layer per sender and per receiver layer of each hop, ``k`` senders stacked per
run; reported in forward-equivalents (one layer over ``n`` rows = ``1 / n_layers``). Families with
separate query/key/value projections only (Llama, Mistral, Qwen, Gemma, OLMo 2).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import CircuitDistillError
from ..model.components import Component, parse_components
from ..model.logits import unembed
from ..tasks.base import TaskData
from .replay import LayerReplay
from .scoring import metric_means

ROUTES = ("q", "kv", "qkv")
Hop = tuple[Sequence[Component], str]


@dataclass
class PathScores:
    """``scores[sender]`` (normalised, module docstring), ``patched[sender]`` the metric, the clean and
    corrupted metric, the hops used, ``seconds`` and ``forwards`` (forward-equivalents)."""

    scores: dict[Component, float]
    patched: dict[Component, float]
    clean: float
    corrupted: float
    hops: list[tuple[list[str], str]]
    positions: str
    seconds: float
    forwards: float

    def to_dict(self) -> dict:
        return {"scores": {str(c): v for c, v in sorted(self.scores.items())},
                "patched": {str(c): v for c, v in sorted(self.patched.items())}, "clean": self.clean,
                "corrupted": self.corrupted, "hops": self.hops, "positions": self.positions,
                "seconds": self.seconds, "forwards": self.forwards}


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _tile(x, k: int, n: int):
    if k == 1:
        return x
    if isinstance(x, torch.Tensor):
        return x.repeat(k, *([1] * (x.dim() - 1))) if x.dim() and x.shape[0] == n and n > 1 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_tile(v, k, n) for v in x)
    if isinstance(x, dict):
        return {key: _tile(v, k, n) for key, v in x.items()}
    return x


class _Run:
    """Clean and corrupted activations of one batch, and single-layer re-runs from them."""

    PARTS = ("z", "q", "k", "v", "mlp", "out")

    def __init__(self, model, td: TaskData, position: str):
        self.model, self.arch = model, model.arch
        if self.arch.family.qkv != "separate":
            raise CircuitDistillError(f"query/key path patching needs separate q/k/v projections; family "
                                      f"{self.arch.family.name!r} fuses them")
        c, k = td.clean, td.corrupted
        if k is None or k.input_ids.shape != c.input_ids.shape or not torch.equal(k.attention_mask, c.attention_mask):
            raise CircuitDistillError("path patching here needs corrupted prompts of the clean prompts' token "
                                      "lengths (e.g. entity tracking with corruption='query' or 'objects')")
        self.n = len(c)
        self.replay = LayerReplay(model, c, td.position(position))
        self.clean = self._capture(c)
        self.corrupt = self._capture(k)
        fin = self.clean["out"][self.arch.n_layers - 1]
        self.final = fin[torch.arange(self.n), td.position(position)]  # [n, d_model]
        self.td = td

    def _module(self, layer: int, part: str):
        f = self.arch.family
        rel = {"q": f.q_proj, "k": f.k_proj, "v": f.v_proj, "z": f.o_proj, "mlp": f.mlp}[part]
        return self.model.hf.get_submodule(self.arch.module_name(layer, rel))

    @torch.no_grad()
    def _capture(self, batch) -> dict[str, dict[int, torch.Tensor]]:
        acts: dict[str, dict[int, torch.Tensor]] = {p: {} for p in self.PARTS}
        handles = []
        try:
            for layer in range(self.arch.n_layers):
                for part in ("q", "k", "v", "mlp"):
                    handles.append(self._module(layer, part).register_forward_hook(
                        lambda m, a, o, part=part, layer=layer: acts[part].__setitem__(layer, _first(o).detach())))
                handles.append(self._module(layer, "z").register_forward_pre_hook(
                    lambda m, a, kw, layer=layer: acts["z"].__setitem__(
                        layer, (a[0] if a else next(iter(kw.values()))).detach()), with_kwargs=True))
                handles.append(self.arch.layer(self.model.hf, layer).register_forward_hook(
                    lambda m, a, o, layer=layer: acts["out"].__setitem__(layer, _first(o).detach())))
            b = batch.to(self.model.device)
            self.model(b.input_ids, b.attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return acts

    @contextmanager
    def _hooks(self, layer: int, k: int, z_fn: Callable, frozen: Sequence[str]):
        """Inside: layer ``layer`` takes ``k`` stacked copies; its head outputs go through ``z_fn``, the
        projections in ``frozen`` and the MLP output are the clean ones."""
        handles = []
        n = self.n
        try:
            for part in list(frozen) + ["mlp"]:
                clean = _tile(self.clean[part][layer], k, n)
                handles.append(self._module(layer, part).register_forward_hook(
                    lambda m, a, o, clean=clean: (clean,) + tuple(o[1:]) if isinstance(o, tuple) else clean))

            def pre(m, args, kwargs):
                if args:
                    return (z_fn(args[0].clone()),) + tuple(args[1:]), kwargs
                key = next(iter(kwargs))
                return args, dict(kwargs, **{key: z_fn(kwargs[key].clone())})
            handles.append(self._module(layer, "z").register_forward_pre_hook(pre, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def layer_delta(self, layer: int, hidden: torch.Tensor, z_fn: Callable, frozen: Sequence[str]) -> torch.Tensor:
        """``out' - hidden - (out_clean - in_clean)`` of ``layer`` run on ``hidden [k * n, seq, d]``."""
        k = hidden.shape[0] // self.n
        args, kwargs = self.replay.inputs[layer]
        args, kwargs = _tile(args, k, self.n), _tile(kwargs, k, self.n)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs = dict(kwargs, hidden_states=hidden)
        with self._hooks(layer, k, z_fn, frozen):
            out = _first(self.arch.layer(self.model.hf, layer)(*args, **kwargs))
        own = self.clean["out"][layer] - self.replay.hidden(layer)
        return out - hidden - _tile(own, k, self.n)

    def metric(self, final: torch.Tensor, metric: str) -> list[float]:
        """``metric`` of each of the ``k`` copies in ``final [k * n, d_model]`` (residual at the position)."""
        logits = unembed(self.replay.model, self.replay.norm(final)).float().cpu()
        return [metric_means(logits[j * self.n:(j + 1) * self.n], self.td, (metric,))[metric]
                for j in range(final.shape[0] // self.n)]


def _set_heads(z: torch.Tensor, values: dict[int, torch.Tensor], dh: int, pos: torch.Tensor | None) -> torch.Tensor:
    """``z [n, seq, H * dh]`` with head ``h``'s slice set to ``values[h]`` (at ``pos`` ``[n, seq]`` bool, if given)."""
    for h, v in values.items():
        sl = slice(h * dh, (h + 1) * dh)
        if pos is None:
            z[..., sl] = v[..., sl]
        else:
            z[..., sl] = torch.where(pos[..., None], v[..., sl], z[..., sl])
    return z


def _position_mask(td: TaskData, positions: str | Sequence[str]) -> torch.Tensor | None:
    """``[n, seq]`` bool mask of the named positions (``"all"``: None)."""
    if positions == "all":
        return None
    names = [positions] if isinstance(positions, str) else list(positions)
    mask = torch.zeros(td.clean.input_ids.shape, dtype=torch.bool)
    for nm in names:
        mask[torch.arange(len(td)), td.position(nm)] = True
    return mask


def _hop(run: _Run, deltas: dict[int, torch.Tensor], receivers: Sequence[Component], route: str,
         k: int) -> tuple[dict[int, torch.Tensor], float]:
    """The receivers' contribution changes per layer given the incoming ``deltas`` (layer -> ``[k*n, s, d]``)."""
    frozen = {"q": ("k", "v"), "kv": ("q",), "qkv": ()}[route]
    dh, n = run.arch.d_head, run.n
    out: dict[int, torch.Tensor] = {}
    cost = 0.0
    for layer in sorted({r.layer for r in receivers}):
        incoming = [d for src, d in deltas.items() if src < layer]
        if not incoming:
            continue
        heads = {r.head for r in receivers if r.layer == layer}
        clean_z = _tile(run.clean["z"][layer], k, n)
        frozen_z = {h: clean_z for h in range(run.arch.n_heads) if h not in heads}
        hidden = _tile(run.replay.hidden(layer), k, n) + sum(incoming)
        out[layer] = run.layer_delta(layer, hidden, lambda z: _set_heads(z, frozen_z, dh, None), frozen)
        cost += k / run.arch.n_layers
    return out, cost


def path_scores(model, td: TaskData, senders: Iterable[Component | str], hops: Sequence[Hop] = (), *,
                sender_positions: str | Sequence[str] = "all", metric: str = "logit_diff", position: str = "last",
                batch_size: int = 64) -> PathScores:
    """Path-patching score of each sender head through ``hops`` (module docstring; ``()``: direct effect).

    ``sender_positions``: where the sender's output is taken from the corrupted run (``"all"`` or
    named positions of ``td``). ``hops``: ``[(receivers, route), ...]`` from the sender towards the
    logits, e.g. ``[(value_fetchers, "q")]`` for heads that act through those heads' queries.
    """
    t0 = time.perf_counter()
    send = list(parse_components(senders))
    if any(not c.is_head for c in send):
        raise CircuitDistillError("path_scores takes head senders only")
    for _, route in hops:
        if route not in ROUTES:
            raise CircuitDistillError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    run = _Run(model, td, position)
    clean = run.metric(run.final, metric)[0]
    last = run.corrupt["out"][model.arch.n_layers - 1]
    corrupted = run.metric(last[torch.arange(run.n), td.corrupted_positions[position]
                                if td.corrupted_positions and position in td.corrupted_positions
                                else td.position(position)], metric)[0]
    mask = _position_mask(td, sender_positions)
    per_fwd = max(1, batch_size // run.n)
    patched: dict[Component, float] = {}
    forwards = 3.0
    for layer in sorted({s.layer for s in send}):
        here = [s for s in send if s.layer == layer]
        for i in range(0, len(here), per_fwd):
            group = here[i:i + per_fwd]
            vals, cost = _group_metric(run, layer, group, hops, mask, metric)
            patched.update(zip(group, vals))
            forwards += cost
    gap = clean - corrupted
    if abs(gap) < 1e-12:
        raise CircuitDistillError("clean and corrupted metrics are equal: path-patching scores are undefined")
    scores = {c: (clean - v) / gap for c, v in patched.items()}
    return PathScores(scores, patched, clean, corrupted, [([str(r) for r in rs], rt) for rs, rt in hops],
                      sender_positions if isinstance(sender_positions, str) else ",".join(sender_positions),
                      time.perf_counter() - t0, forwards)


def _group_metric(run: _Run, layer: int, group: list[Component], hops: Sequence[Hop], mask, metric: str
                  ) -> tuple[list[float], float]:
    """The metric with each sender of ``group`` (all in ``layer``) patched alone, and the cost."""
    n, k, dh = run.n, len(group), run.arch.d_head
    zk = run.corrupt["z"][layer]
    pos = None if mask is None else mask.to(zk.device).repeat(k, 1)

    def z_fn(z):
        v = z.view(k, n, *z.shape[1:])
        for j, s in enumerate(group):
            m = None if pos is None else pos[j * n:(j + 1) * n]
            v[j] = _set_heads(v[j], {s.head: zk}, dh, m)
        return z

    hidden = _tile(run.replay.hidden(layer), k, n)
    deltas = {layer: run.layer_delta(layer, hidden, z_fn, ())}
    cost = k / run.arch.n_layers
    for receivers, route in hops:
        deltas, c = _hop(run, deltas, receivers, route, k)
        cost += c
    final = _tile(run.final, k, n)
    idx, at = torch.arange(k * n), run.replay.positions.repeat(k)
    for d in deltas.values():
        final = final + d[idx, at]
    return run.metric(final, metric), cost
