"""Zero, mean and resample ablation of heads and MLPs; joint ablation; fast single-component sweeps.

Ablation values
---------------
An ablated component's activation (a head's output before the output projection ``[batch, seq,
d_head]``, an MLP's output ``[batch, seq, d_model]``) is replaced at every position by:

- ``zero``: zeros (biases of the output projection stay, as in the model);
- ``mean``: its mean over ``task_data.reference``. Per position (default) the mean at token ``t``
  is taken over the reference rows that *have* a real ``t``-th token, counting real tokens only (so
  left and right padding agree and padding never enters a mean). Clean tokens beyond the longest
  reference row (and padding slots) get the mean over all real reference tokens. With
  ``per_position=False`` every position gets that all-token mean;
- ``resample``: its activation on a reference prompt drawn at random (seeded) for each clean row,
  preferring reference rows at least as long as the clean row; at the ``t``-th real token the
  drawn row's ``t``-th real token, and the all-token mean beyond its length.

The fast sweep
--------------
Ablating a component of layer ``L`` leaves the residual stream entering layer ``L`` unchanged, so
``ablation_sweep(fast=True)`` runs the clean forward once, keeps each layer's input together with
the exact arguments the model passed to it (masks, rotary position embeddings, position ids), and
for each ablation re-runs only layers ``L..`` plus the final norm and unembedding, at the metric
position only. Several ablations share one forward: copies of the rows are stacked along the batch
and copy ``j`` gets ablation ``j``. Replaying the model's own layer modules with its own arguments
keeps this family-agnostic; a check of the final norm + unembedding against the model's logits
guards the one piece we call ourselves.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import CircuitDistillError, ComponentError, FastSweepUnsupported, TaskError
from ..model.components import Component, parse_components
from ..model.hooks import capture, intervene
from ..model.loading import position_ids_from_mask
from ..tasks.base import Batch, TaskData
from ..tasks.metrics import METRICS, final_logits, per_example, summarise

ABLATION_METHODS = ("zero", "mean", "resample")


# ---- ablation values ---------------------------------------------------------------------------

@dataclass
class AblationValues:
    """Replacement activations for a set of components, independent of the batch they are applied to.

    ``table[comp]`` is ``[T + 1, d]``: row ``t < T`` is used at a row's ``t``-th real token, row ``T``
    everywhere else (beyond the table, padding). For ``zero`` the table is all zeros; without
    per-position means every row is the all-token mean. ``resample`` keeps per-reference-row
    activations in ``rows[comp]`` (``[n_ref, T_ref, d]``) and the reference lengths in ``lengths``.
    """

    method: str
    table: dict[Component, torch.Tensor] = field(default_factory=dict)
    rows: dict[Component, torch.Tensor] = field(default_factory=dict)
    lengths: torch.Tensor | None = None
    seed: int = 0

    def for_batch(self, batch: Batch, components: Iterable[Component] | None = None,
                  rows: torch.Tensor | None = None) -> dict[Component, torch.Tensor]:
        """Per-row replacements ``comp -> [n, seq, d]`` for ``batch`` (``rows``: which rows of it)."""
        mask = batch.attention_mask if rows is None else batch.attention_mask[rows]
        comps = list(self.table) if components is None else list(components)
        pos = position_ids_from_mask(mask)  # [n, seq]: t-th real token
        out = {}
        src = self._resample_sources(batch) if self.method == "resample" else None
        if src is not None and rows is not None:
            src = src[rows]
        for c in comps:
            tab = self.table[c]
            T = tab.shape[0] - 1
            idx = torch.where((pos < T) & (mask > 0), pos, torch.full_like(pos, T))
            vals = tab[idx.to(tab.device)]  # [n, seq, d]
            if src is not None:
                act = self.rows[c]  # [n_ref, T_ref, d]
                L = self.lengths[src]  # [n]
                ok = (pos < L[:, None]) & (mask > 0)
                t = pos.clamp(max=act.shape[1] - 1)
                picked = act[src[:, None].expand_as(t), t]
                vals = torch.where(ok[..., None].to(vals.device), picked.to(vals.device), vals)
            out[c] = vals
        return out

    def _resample_sources(self, batch: Batch) -> torch.Tensor:
        """A reference row for every row of ``batch`` (seeded), at least as long as it when possible."""
        g = torch.Generator().manual_seed(self.seed)
        need = batch.attention_mask.sum(1).cpu()
        lengths = self.lengths.cpu()
        src = torch.empty(len(need), dtype=torch.long)
        for i, n in enumerate(need.tolist()):
            ok = torch.nonzero(lengths >= n).flatten()
            pool = ok if len(ok) else torch.arange(len(lengths))
            src[i] = pool[torch.randint(len(pool), (1,), generator=g)]
        return src


@torch.no_grad()
def _run_capture(model, batch: Batch, components: list[Component], batch_size: int):
    """Activations ``comp -> [n, seq, d]`` of ``components`` on ``batch`` (cpu, float32)."""
    outs: dict[Component, list[torch.Tensor]] = defaultdict(list)
    for s in range(0, len(batch), batch_size):
        b = batch.subset(slice(s, s + batch_size)).to(model.device)
        with capture(model, components, detach=True) as cap:
            _forward(model, b)
            for c in components:
                outs[c].append(cap[c].float().cpu())
    return {c: torch.cat(v) for c, v in outs.items()}


def _forward(model, b: Batch) -> torch.Tensor:
    """Logits ``[n, seq, vocab]`` of ``b`` without a KV cache."""
    return model(b.input_ids, b.attention_mask, use_cache=False)


def _check_components(model, components) -> list[Component]:
    comps = parse_components(model.components("head") + model.components("mlp") if components is None
                             else components)
    for c in comps:
        model.arch.check_component(c)
        if c.kind not in ("head", "mlp"):
            raise ComponentError(f"{c}: only heads and MLPs can be ablated here (got kind {c.kind!r})")
    return sorted(set(comps))


def _masked_mean(act: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-real-token-index mean ``[T, d]`` and all-token mean ``[d]`` of ``act [n, seq, d]``."""
    pos = position_ids_from_mask(mask)
    real = mask > 0
    T = int(mask.sum(1).max())
    d = act.shape[-1]
    sums = torch.zeros(T, d, dtype=torch.float64)
    counts = torch.zeros(T, dtype=torch.float64)
    sums.index_add_(0, pos[real], act[real].double())
    counts.index_add_(0, pos[real], torch.ones(int(real.sum()), dtype=torch.float64))
    per_pos = (sums / counts.clamp(min=1)[:, None]).float()
    overall = act[real].double().mean(0).float()
    return per_pos, overall


def mean_activations(model, batch: Batch, components: Iterable[Component | str] | None = None, *,
                     per_position: bool = True, batch_size: int = 64) -> dict[Component, torch.Tensor]:
    """Mean activation of each component over the real tokens of ``batch``.

    ``per_position=True``: ``[T, d]``, row ``t`` the mean over rows that have a ``t``-th real token
    (``T`` = the longest row); ``False``: ``[d]``, the mean over all real tokens. Heads are their
    output before the output projection (``d = d_head``), MLPs their output (``d = d_model``).
    """
    comps = _check_components(model, components)
    acts = _run_capture(model, batch, comps, batch_size)
    mask = batch.attention_mask.cpu()
    out = {}
    for c in comps:
        per_pos, overall = _masked_mean(acts[c], mask)
        out[c] = per_pos if per_position else overall
    return out


def ablation_values(model, task_data: TaskData, components: Iterable[Component | str] | None = None, *,
                    method: str = "mean", per_position: bool = True, seed: int = 0,
                    batch_size: int = 64) -> AblationValues:
    """Replacement activations for ``components`` by ``method`` (``zero``, ``mean``, ``resample``;
    see the module docstring), computed from ``task_data.reference``."""
    if method not in ABLATION_METHODS:
        raise CircuitDistillError(f"unknown ablation method {method!r}; use one of {', '.join(ABLATION_METHODS)}")
    comps = _check_components(model, components)
    ref = task_data.reference
    if method == "zero":
        widths = {c: model.arch.d_head if c.is_head else model.arch.d_model for c in comps}
        return AblationValues("zero", {c: torch.zeros(1, w) for c, w in widths.items()})
    if len(ref) == 0:
        raise TaskError("task_data.reference is empty: mean/resample ablation needs reference prompts "
                        "(build the task with a reference set, or use method='zero')")
    acts = _run_capture(model, ref, comps, batch_size)
    mask = ref.attention_mask.cpu()
    vals = AblationValues(method, seed=seed)
    lengths = mask.sum(1).long()
    for c in comps:
        per_pos, overall = _masked_mean(acts[c], mask)
        if not per_position and method == "mean":
            per_pos = overall[None].expand_as(per_pos)
        vals.table[c] = torch.cat([per_pos, overall[None]])
        if method == "resample":
            # re-index rows by real-token index so left padding works like right padding
            a = acts[c]
            pos = position_ids_from_mask(mask)
            aligned = torch.zeros(a.shape[0], int(lengths.max()), a.shape[-1])
            rows = torch.arange(a.shape[0])[:, None].expand_as(pos)
            real = mask > 0
            aligned[rows[real], pos[real]] = a[real]
            vals.rows[c] = aligned
    if method == "resample":
        vals.lengths = lengths
    return vals


# ---- joint ablation ------------------------------------------------------------------------

def _metric_positions(task_data: TaskData, position: str) -> torch.Tensor:
    if position not in task_data.positions:
        raise TaskError(f"task {task_data.name!r} has no position {position!r}; it has "
                        f"{', '.join(sorted(task_data.positions))}")
    return task_data.positions[position]


def _summarise(logits: torch.Tensor, task_data: TaskData, metrics: Sequence[str]) -> dict[str, float]:
    s = summarise(per_example(logits, task_data.answer_ids, task_data.wrong_ids))
    bad = [m for m in metrics if m not in s]
    if bad:
        raise CircuitDistillError(f"unknown metric(s) {', '.join(bad)}; available: {', '.join(METRICS)}")
    return {m: s[m] for m in metrics}


@torch.no_grad()
def ablated_logits(model, task_data: TaskData, components: Iterable[Component | str], *,
                   values: AblationValues | None = None, method: str = "mean", per_position: bool = True,
                   position: str = "last", batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """Final logits ``[n, vocab]`` (float32, cpu) on the clean prompts with ``components`` ablated together."""
    comps = _check_components(model, components) if components else []
    if values is None and comps:
        values = ablation_values(model, task_data, comps, method=method, per_position=per_position,
                                 seed=seed, batch_size=batch_size)
    pos = _metric_positions(task_data, position)
    outs = []
    for s in range(0, len(task_data), batch_size):
        rows = torch.arange(s, min(s + batch_size, len(task_data)))
        b = task_data.clean.subset(rows).to(model.device)
        repl = values.for_batch(task_data.clean, comps, rows=rows) if comps else {}
        with intervene(model, repl):
            logits = _forward(model, b)
        outs.append(final_logits(logits, pos[rows]).float().cpu())
    return torch.cat(outs)


def ablate(model, task_data: TaskData, components: Iterable[Component | str], *, method: str = "mean",
           per_position: bool = True, metrics: Sequence[str] = METRICS, position: str = "last",
           batch_size: int = 64, values: AblationValues | None = None, seed: int = 0) -> dict[str, float]:
    """Mean ``metrics`` over the clean prompts with all ``components`` ablated together
    (an empty set gives the clean metrics). Used for faithfulness and pruning."""
    logits = ablated_logits(model, task_data, list(components), values=values, method=method,
                            per_position=per_position, position=position, batch_size=batch_size, seed=seed)
    return _summarise(logits, task_data, metrics)


# ---- layer replay: re-run layers L.. from a cached clean prefix ----------------------------------

_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_norm", "final_layernorm")


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


class LayerReplay:
    """One clean run of ``batch`` with every decoder layer's inputs kept, to re-run layers ``L..``.

    ``logits_from(L, hidden)`` takes a ``[k * n, seq, d_model]`` stack of ``k`` copies of layer ``L``'s
    input and returns logits ``[k * n, vocab]`` at ``positions`` (final norm + unembedding run on
    those positions only).
    """

    def __init__(self, model, batch: Batch, positions: torch.Tensor):
        self.model = model
        self.arch = model.arch
        hf = model.hf
        self.n = len(batch)
        self.positions = positions.to(model.device)
        self.inputs: list[tuple[tuple, dict]] = [None] * self.arch.n_layers  # type: ignore[list-item]
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
                logits = _forward(model, batch.to(model.device))
        finally:
            for h in handles:
                h.remove()
        self.logits = final_logits(logits, self.positions).float()
        self.norm = self._find_norm(hf)
        self.unembed = hf.get_output_embeddings()
        if self.unembed is None:
            raise FastSweepUnsupported(f"{type(hf).__name__} has no output embeddings; use fast=False")
        tail = self._tail(last_out[0])
        err = (tail - self.logits).abs().max().item()
        if not err <= 1e-4 * max(1.0, self.logits.abs().max().item()):
            raise FastSweepUnsupported(
                f"fast sweep: final norm + unembedding do not reproduce {type(hf).__name__}'s logits "
                f"(max abs error {err:.3g}); this family post-processes logits. Use fast=False."
            )

    @staticmethod
    def _find_norm(hf) -> torch.nn.Module:
        base = getattr(hf, "base_model", hf)
        for name in _FINAL_NORMS:
            mod = getattr(base, name, None)
            if isinstance(mod, torch.nn.Module):
                return mod
        raise FastSweepUnsupported(f"fast sweep: found no final norm ({', '.join(_FINAL_NORMS)}) in "
                                  f"{type(base).__name__}; use fast=False")

    def hidden(self, layer: int) -> torch.Tensor:
        """The clean input of ``layer``: ``[n, seq, d_model]``."""
        args, kwargs = self.inputs[layer]
        return args[0] if args else kwargs["hidden_states"]

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        k = h.shape[0] // self.n
        pos = self.positions.repeat(k)
        sel = h[torch.arange(h.shape[0], device=h.device), pos]  # [k*n, d_model]
        return self.unembed(self.norm(sel)).float()

    @torch.no_grad()
    def logits_from(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
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
    replace component ``items[j][0]``'s activation in copy ``j`` by ``items[j][1]`` (``[n, seq, d]``).
    Copies beyond ``len(items)`` run unchanged."""
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
    """Logits ``[n, vocab]`` at the replay's positions for each item ``(comp, value_fn)``: ``comp``'s
    activation replaced by ``value_fn()`` (``[n, seq, d]``) alone, everything else as in the replay's
    base run. Items of one layer share forwards (up to ``batch_size`` rows each). Also returns the
    cost in units of one full forward over the ``n`` rows."""
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


# ---- sweeps --------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """Single-component ablation sweep.

    ``clean``: metric -> mean over examples with nothing ablated; ``ablated[comp]``: metric -> mean
    with that one component ablated. Cost: ``seconds`` of wall time and ``forwards`` in
    forward-equivalents (one full forward over all examples = 1; a re-run of ``k`` of ``N`` layers
    counts ``k / N``).
    """

    clean: dict[str, float]
    ablated: dict[Component, dict[str, float]]
    method: str
    seconds: float
    forwards: float
    per_position: bool = True
    position: str = "last"
    n_examples: int = 0
    fast: bool = True

    def effect(self, metric: str = "answer_prob") -> dict[Component, float]:
        """``clean - ablated`` per component (dP of METHOD section 1.3)."""
        if metric not in self.clean:
            raise CircuitDistillError(f"metric {metric!r} not in this sweep; it has {', '.join(self.clean)}")
        return {c: self.clean[metric] - v[metric] for c, v in self.ablated.items()}

    @property
    def components(self) -> list[Component]:
        return sorted(self.ablated)

    def to_dict(self) -> dict:
        return {
            "clean": dict(self.clean),
            "ablated": {str(c): dict(v) for c, v in sorted(self.ablated.items())},
            "method": self.method, "seconds": self.seconds, "forwards": self.forwards,
            "per_position": self.per_position, "position": self.position, "n_examples": self.n_examples,
            "fast": self.fast,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SweepResult:
        return cls(
            clean={k: float(v) for k, v in d["clean"].items()},
            ablated={Component.parse(k): {m: float(x) for m, x in v.items()} for k, v in d["ablated"].items()},
            method=d["method"], seconds=float(d["seconds"]), forwards=float(d["forwards"]),
            per_position=bool(d.get("per_position", True)), position=d.get("position", "last"),
            n_examples=int(d.get("n_examples", 0)), fast=bool(d.get("fast", True)),
        )


def _progress_bar(progress, total: int, desc: str):
    from tqdm.auto import tqdm

    show = progress if progress is not None else total >= 32
    return tqdm(total=total, desc=desc, disable=not show, leave=False)


def ablation_sweep(model, task_data: TaskData, components: Iterable[Component | str] | None = None, *,
                   method: str = "mean", per_position: bool = True, metrics: Sequence[str] = METRICS,
                   position: str = "last", batch_size: int = 64, fast: bool = True,
                   progress: bool | None = None, seed: int = 0,
                   values: AblationValues | None = None) -> SweepResult:
    """Ablate each component alone and measure ``metrics`` on the clean prompts.

    ``components=None``: every head and MLP. ``method``: ``mean`` (over ``task_data.reference``),
    ``zero`` or ``resample``. ``fast=True`` re-runs only the layers after each ablated component,
    several ablations per forward (up to ``batch_size`` rows); ``fast=False`` runs one full forward
    per component with ``intervene``. Both give the same numbers (to float rounding).
    """
    t0 = time.perf_counter()
    comps = _check_components(model, components)
    n = len(task_data)
    if n == 0:
        raise TaskError("task_data has no examples")
    metrics = tuple(metrics)
    forwards = 0.0
    if values is None:
        values = ablation_values(model, task_data, comps, method=method, per_position=per_position,
                                 seed=seed, batch_size=batch_size)
        if method != "zero":
            forwards += len(task_data.reference) / n
    pos = _metric_positions(task_data, position)
    chunks = [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    clean_logits: list[torch.Tensor] = []
    abl_logits: dict[Component, list[torch.Tensor]] = defaultdict(list)
    bar = _progress_bar(progress, len(comps) * len(chunks), f"{method}-ablation sweep")
    try:
        for rows in chunks:
            b = task_data.clean.subset(rows)
            repl = values.for_batch(task_data.clean, comps, rows=rows)
            repl = {c: v.to(model.device) for c, v in repl.items()}
            if fast:
                replay = LayerReplay(model, b, pos[rows])
                clean_logits.append(replay.logits.cpu())
                forwards += len(rows) / n
                outs, cost = replay_items(model, replay, [(c, (lambda c=c: repl[c])) for c in comps],
                                          batch_size=batch_size, bar=bar)
                for c, o in zip(comps, outs):
                    abl_logits[c].append(o)
                forwards += cost * len(rows) / n
            else:
                bd = b.to(model.device)
                with torch.no_grad():
                    clean_logits.append(final_logits(_forward(model, bd), pos[rows]).float().cpu())
                forwards += len(rows) / n
                for c in comps:
                    with torch.no_grad(), intervene(model, {c: repl[c]}):
                        abl_logits[c].append(final_logits(_forward(model, bd), pos[rows]).float().cpu())
                    forwards += len(rows) / n
                    bar.update(1)
    finally:
        bar.close()
    clean = _summarise(torch.cat(clean_logits), task_data, metrics)
    ablated = {c: _summarise(torch.cat(abl_logits[c]), task_data, metrics) for c in comps}
    return SweepResult(clean, ablated, method, time.perf_counter() - t0, forwards, per_position, position,
                       n, fast)

