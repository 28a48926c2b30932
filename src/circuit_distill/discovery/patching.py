"""Activation patching, path patching and attribution patching between clean and corrupted prompts.

Directions (activation patching):

- ``clean_to_corrupted`` (denoising): run the *corrupted* prompts and patch in the component's
  activation from the *clean* run. ``score = (patched - corrupted) / (clean - corrupted)``: the
  fraction of the clean performance the component restores.
- ``corrupted_to_clean`` (noising): run the *clean* prompts and patch in the *corrupted* activation.
  ``score = (clean - patched) / (clean - corrupted)``: the fraction of performance it destroys.

Metrics are always scored on the clean answer (``answer_ids``/``wrong_ids``) at the named position
of the run being patched, so "clean" and "corrupted" are the two end points of the same scale.

Path patching (Wang et al. 2022) measures a sender's effect through chosen receivers only: run the
clean prompts with the sender's activation taken from the corrupted run and every other head and
MLP frozen at its clean value, record what the receivers *would* compute there, then run the clean
prompts with just the receivers patched to those values. ``receivers=None`` measures the direct
path from the sender to the logits.

Attribution patching (Nanda 2023; Syed et al. 2023) estimates the noising effect of every
component at once, to first order: ``(a_corrupted - a_clean) . d metric / d a`` summed over
positions and features, from one clean forward + backward (gradients with respect to activations
only) and one corrupted forward.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..errors import CircuitDistillError
from ..model.activations import forward_logits, read_activations
from ..model.components import Component
from ..model.hooks import capture, intervene
from ..tasks.base import Batch, TaskData
from ..tasks.metrics import final_logits
from .progress import progress_bar
from .replay import LayerReplay, replay_items
from .scoring import metric_means
from .values import ablatable_components

DIRECTIONS = ("clean_to_corrupted", "corrupted_to_clean")


def _metric_value(logits: torch.Tensor, task_data: TaskData, metric: str) -> float:
    return metric_means(logits, task_data, (metric,))[metric]


def _corrupted_positions(task_data: TaskData, position: str) -> torch.Tensor:
    cp = task_data.corrupted_positions or {}
    return cp[position] if position in cp else task_data.position(position)


def _check_corrupted(task_data: TaskData) -> None:
    c, k = task_data.clean, task_data.corrupted
    if k is None or len(k) != len(c) or k.input_ids.shape[1] != c.input_ids.shape[1]:
        raise CircuitDistillError(
            f"task {task_data.name!r}: patching needs corrupted prompts aligned with the clean ones "
            "(same number of rows and width); build the task with corrupted prompts")


@dataclass
class PatchingResult:
    """Activation-patching results.

    ``patched[comp]``: the metric with that component patched (at all positions), or with
    ``per_position`` a ``[seq]`` tensor (one value per patched position). ``clean`` / ``corrupted``
    are the metric on the unpatched runs.
    """

    clean: float
    corrupted: float
    patched: dict[Component, float | torch.Tensor]
    direction: str
    metric: str
    per_position: bool = False
    seconds: float = 0.0
    forwards: float = 0.0

    def scores(self) -> dict[Component, float | torch.Tensor]:
        """Normalised effects (see the module docstring); 1 = the whole clean/corrupted gap."""
        gap = self.clean - self.corrupted
        if abs(gap) < 1e-12:
            raise CircuitDistillError(
                f"clean and corrupted {self.metric} are equal ({self.clean:.4g}): the corruption changes "
                "nothing, so patching scores are undefined; use a corruption that changes the answer")
        if self.direction == "clean_to_corrupted":
            return {c: (v - self.corrupted) / gap for c, v in self.patched.items()}
        return {c: (self.clean - v) / gap for c, v in self.patched.items()}


def _logits(model, batch: Batch) -> torch.Tensor:
    """Logits ``[n, seq, vocab]`` of one forward over ``batch`` (moved to the model's device)."""
    b = batch.to(model.device)
    return forward_logits(model, b.input_ids, b.attention_mask)


def _acts(model, batch: Batch, comps: list[Component]) -> dict[Component, torch.Tensor]:
    """Activations ``comp -> [n, seq, d]`` of one forward over ``batch`` (model device and dtype)."""
    return read_activations(model, batch.input_ids, batch.attention_mask, comps, batch_size=None, to_cpu=False)


def activation_patching(model, task_data: TaskData, components: Iterable[Component | str] | None = None, *,
                        direction: str = "clean_to_corrupted", per_position: bool = False,
                        metric: str = "logit_diff", position: str = "last", batch_size: int = 64,
                        progress: bool | None = None) -> PatchingResult:
    """Patch each component alone (optionally at each position alone) between clean and corrupted
    runs and measure ``metric``. ``components=None``: every head and MLP. One forward per component
    (and position), re-running only the layers from the component's onwards."""
    if direction not in DIRECTIONS:
        raise CircuitDistillError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    _check_corrupted(task_data)
    t0 = time.perf_counter()
    comps = ablatable_components(model, components)
    clean_pos = task_data.position(position)
    corr_pos = _corrupted_positions(task_data, position)
    if direction == "clean_to_corrupted":
        base, source, base_pos, src_pos = task_data.corrupted, task_data.clean, corr_pos, clean_pos
    else:
        base, source, base_pos, src_pos = task_data.clean, task_data.corrupted, clean_pos, corr_pos
    src_acts = _acts(model, source, comps)
    base_acts = _acts(model, base, comps) if per_position else {}
    replay = LayerReplay(model, base, base_pos)
    with torch.no_grad():
        other = final_logits(_logits(model, source), src_pos).float()
    base_val = _metric_value(replay.logits, task_data, metric)
    src_val = _metric_value(other, task_data, metric)
    clean_val, corr_val = (src_val, base_val) if direction == "clean_to_corrupted" else (base_val, src_val)
    seq = base.input_ids.shape[1]
    items = []
    keys: list[tuple[Component, int | None]] = []
    for c in comps:
        if per_position:
            for p in range(seq):
                def value(c=c, p=p):
                    v = base_acts[c].clone()
                    v[:, p] = src_acts[c][:, p]
                    return v
                items.append((c, value))
                keys.append((c, p))
        else:
            items.append((c, lambda c=c: src_acts[c]))
            keys.append((c, None))
    bar = progress_bar(progress, len(items), f"activation patching ({direction})")
    try:
        outs, cost = replay_items(model, replay, items, batch_size=batch_size, bar=bar)
    finally:
        bar.close()
    patched: dict[Component, float | torch.Tensor] = {}
    if per_position:
        for c in comps:
            patched[c] = torch.zeros(seq)
        for (c, p), o in zip(keys, outs):
            patched[c][p] = _metric_value(o, task_data, metric)
    else:
        for (c, _), o in zip(keys, outs):
            patched[c] = _metric_value(o, task_data, metric)
    forwards = 3 + (1 if per_position else 0) + cost
    return PatchingResult(clean_val, corr_val, patched, direction, metric, per_position,
                          time.perf_counter() - t0, forwards)


@torch.no_grad()
def patched_metric(model, task_data: TaskData, replacements: dict[Component, torch.Tensor], *,
                   run: str = "clean", metric: str = "logit_diff", position: str = "last") -> float:
    """``metric`` on the ``run`` (``clean``/``corrupted``) prompts with several components patched
    together to the given activations (``comp -> [n, seq, d]``)."""
    batch = task_data.clean if run == "clean" else task_data.corrupted
    pos = task_data.position(position) if run == "clean" else _corrupted_positions(task_data, position)
    with intervene(model, replacements):
        logits = _logits(model, batch)
    return _metric_value(final_logits(logits, pos).float(), task_data, metric)


# ---- path patching ---------------------------------------------------------------------------

@dataclass
class PathPatchingResult:
    """``patched[sender]``: the clean metric with the sender's effect (from the corrupted run) let
    through ``receivers`` only; ``effect()`` = clean - patched, ``scores()`` = effect / (clean - corrupted)."""

    clean: float
    corrupted: float
    patched: dict[Component, float]
    receivers: list[Component] | None
    metric: str
    seconds: float = 0.0
    forwards: float = 0.0

    def effect(self) -> dict[Component, float]:
        return {c: self.clean - v for c, v in self.patched.items()}

    def scores(self) -> dict[Component, float]:
        gap = self.clean - self.corrupted
        if abs(gap) < 1e-12:
            raise CircuitDistillError("clean and corrupted metrics are equal: path-patching scores are undefined")
        return {c: (self.clean - v) / gap for c, v in self.patched.items()}


def path_patching(model, task_data: TaskData, senders: Iterable[Component | str] | None = None,
                  receivers: Iterable[Component | str] | None = None, *, metric: str = "logit_diff",
                  position: str = "last", batch_size: int = 64, progress: bool | None = None
                  ) -> PathPatchingResult:
    """Path patching of each sender through ``receivers`` (``None``: straight to the logits).

    Senders default to every head and MLP; a sender that is also a receiver, or sits in a layer
    after every receiver, has no path and scores the clean metric (zero effect). Two forwards per
    sender (one with receivers=None).
    """
    _check_corrupted(task_data)
    t0 = time.perf_counter()
    everything = ablatable_components(model, None)
    send = ablatable_components(model, senders)
    recv = None if receivers is None else ablatable_components(model, receivers)
    pos = task_data.position(position)
    n = len(task_data)
    patched: dict[Component, float] = {}
    clean_logits, corr_logits = [], []
    per_rows: dict[Component, list[torch.Tensor]] = {c: [] for c in send}
    forwards = 0.0
    bar = progress_bar(progress, len(send) * ((n + batch_size - 1) // batch_size), "path patching")
    try:
        for s in range(0, n, batch_size):
            rows = torch.arange(s, min(s + batch_size, n))
            cb, kb = task_data.clean.subset(rows), task_data.corrupted.subset(rows)
            clean_acts, corr_acts = _acts(model, cb, everything), _acts(model, kb, everything)
            with torch.no_grad():
                clean_logits.append(final_logits(_logits(model, cb), pos[rows]).float().cpu())
                kpos = _corrupted_positions(task_data, position)[rows]
                corr_logits.append(final_logits(_logits(model, kb), kpos).float().cpu())
            forwards += 4 * len(rows) / n  # two captures (also give logits) + the two metric runs
            for snd in send:
                has_path = recv is None or any(_reaches(snd, r) for r in recv if r != snd)
                if not has_path:
                    per_rows[snd].append(clean_logits[-1])
                    bar.update(1)
                    continue
                freeze = {c: clean_acts[c] for c in everything if c != snd}
                freeze[snd] = corr_acts[snd]
                with torch.no_grad():
                    if recv is None:
                        with intervene(model, freeze):
                            logits = _logits(model, cb)
                        forwards += len(rows) / n
                    else:
                        # capture first: its hooks see what receivers compute before the freeze replaces it
                        with capture(model, recv, detach=True) as cap, intervene(model, freeze):
                            _logits(model, cb)
                            rec = {r: cap[r].clone() for r in recv}
                        with intervene(model, rec):
                            logits = _logits(model, cb)
                        forwards += 2 * len(rows) / n
                per_rows[snd].append(final_logits(logits, pos[rows]).float().cpu())
                bar.update(1)
    finally:
        bar.close()
    clean_val = _metric_value(torch.cat(clean_logits), task_data, metric)
    corr_val = _metric_value(torch.cat(corr_logits), task_data, metric)
    for snd in send:
        patched[snd] = _metric_value(torch.cat(per_rows[snd]), task_data, metric)
    return PathPatchingResult(clean_val, corr_val, patched, recv, metric, time.perf_counter() - t0, forwards)


def _reaches(sender: Component, receiver: Component) -> bool:
    """Whether ``sender``'s output can reach ``receiver``'s input (sequential blocks; an MLP reads its
    own layer's heads unless the family uses a parallel residual, which the forward pass handles)."""
    if receiver.layer > sender.layer:
        return True
    return receiver.layer == sender.layer and sender.is_head and receiver.kind == "mlp"


# ---- attribution patching --------------------------------------------------------------------

@dataclass
class AttributionResult:
    """``scores[comp]``: first-order estimate of (metric with comp patched from corrupted into clean
    - clean metric), mean over examples; ``per_position[comp]``: the same split by position ``[seq]``."""

    scores: dict[Component, float]
    metric: str
    clean: float
    corrupted: float
    per_position: dict[Component, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


def _differentiable_metric(logits: torch.Tensor, task_data: TaskData, rows: torch.Tensor, metric: str) -> torch.Tensor:
    """Sum over ``rows`` of the per-example metric (rows without a wrong answer skipped for logit_diff)."""
    logits = logits.float()
    r = torch.arange(logits.shape[0], device=logits.device)
    ans = task_data.answer_ids[rows].to(logits.device)
    if metric == "answer_prob":
        return logits.softmax(-1)[r, ans].sum()
    if metric == "logit_diff":
        w = task_data.wrong_ids[rows].to(logits.device)
        ld = logits[r, ans] - logits[r, w.clamp(min=0)]
        return ld[w >= 0].sum()
    if metric == "log_prob":
        return logits.log_softmax(-1)[r, ans].sum()
    raise CircuitDistillError(f"attribution patching needs a differentiable metric: answer_prob, logit_diff or "
                              f"log_prob (got {metric!r})")


def attribution_patching(model, task_data: TaskData, components: Iterable[Component | str] | None = None, *,
                         metric: str = "logit_diff", position: str = "last", batch_size: int = 64
                         ) -> AttributionResult:
    """Attribution patching for every component: ``(a_corrupted - a_clean) . grad`` per component.

    Per batch: one clean forward keeping the graph, one backward to the activations only (model
    parameters are not differentiated), one corrupted forward without a graph.
    """
    _check_corrupted(task_data)
    t0 = time.perf_counter()
    comps = ablatable_components(model, components)
    arch, hf = model.arch, model.hf
    pos = task_data.position(position)
    n = len(task_data)
    n_valid = n
    if metric == "logit_diff":
        n_valid = int((task_data.wrong_ids >= 0).sum())
    head_layers = sorted({c.layer for c in comps if c.is_head})
    mlp_layers = sorted({c.layer for c in comps if c.kind == "mlp"})
    H, dh = arch.n_heads, arch.d_head
    per_pos: dict[Component, torch.Tensor] = {}
    clean_logits, corr_logits = [], []
    flags = [(p, p.requires_grad) for p in hf.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for s in range(0, n, batch_size):
            rows = torch.arange(s, min(s + batch_size, n))
            cb = task_data.clean.subset(rows).to(model.device)
            kb = task_data.corrupted.subset(rows).to(model.device)
            acts: dict[tuple[str, int], torch.Tensor] = {}
            handles = []

            def embed_hook(mod, args, out):
                return out.requires_grad_(True) if not out.requires_grad else out
            handles.append(hf.get_input_embeddings().register_forward_hook(embed_hook))
            for layer in head_layers:
                def pre(mod, args, kwargs, layer=layer):
                    acts[("z", layer)] = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
                handles.append(arch.o_proj(hf, layer).register_forward_pre_hook(pre, with_kwargs=True))
            for layer in mlp_layers:
                def post(mod, args, out, layer=layer):
                    acts[("mlp", layer)] = out[0] if isinstance(out, tuple) else out
                handles.append(arch.mlp(hf, layer).register_forward_hook(post))
            try:
                with torch.enable_grad():
                    logits = _logits(model, cb)
                    clean_logits.append(final_logits(logits, pos[rows]).detach().float().cpu())
                    m = _differentiable_metric(final_logits(logits, pos[rows]), task_data, rows, metric)
                    keys = list(acts)
                    grads = dict(zip(keys, torch.autograd.grad(m, [acts[k] for k in keys], allow_unused=True)))
                clean_acts = {k: v.detach() for k, v in acts.items()}
                acts.clear()
                with torch.no_grad():
                    klog = _logits(model, kb)
                    kpos = _corrupted_positions(task_data, position)[rows]
                    corr_logits.append(final_logits(klog, kpos).float().cpu())
                corr = dict(acts)
            finally:
                for h in handles:
                    h.remove()
            for c in comps:
                key = ("z", c.layer) if c.is_head else ("mlp", c.layer)
                g, a, b = grads[key], clean_acts[key], corr[key]
                if g is None:
                    contrib = torch.zeros(a.shape[:2])
                else:
                    diff = (b - a) * g
                    if c.is_head:
                        diff = diff.view(*diff.shape[:2], H, dh)[..., c.head, :]
                    contrib = diff.float().sum(-1).cpu()  # [rows, seq]
                per_pos[c] = per_pos.get(c, 0) + contrib.sum(0)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    per_pos = {c: v / max(n_valid, 1) for c, v in per_pos.items()}
    scores = {c: float(v.sum()) for c, v in per_pos.items()}
    clean_val = _metric_value(torch.cat(clean_logits), task_data, metric) if metric != "log_prob" else float("nan")
    corr_val = _metric_value(torch.cat(corr_logits), task_data, metric) if metric != "log_prob" else float("nan")
    return AttributionResult(scores, metric, clean_val, corr_val, per_pos, time.perf_counter() - t0)
