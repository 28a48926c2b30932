"""Ablation values: what an ablated head or MLP outputs instead of its own activation.

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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..errors import CircuitDistillError, ComponentError, TaskError
from ..model.activations import read_activations
from ..model.components import Component, parse_components
from ..model.loading import position_ids_from_mask
from ..tasks.base import Batch, TaskData

ABLATION_METHODS = ("zero", "mean", "resample")


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


def ablatable_components(model, components: Iterable[Component | str] | None = None) -> list[Component]:
    """``components`` parsed, checked against ``model`` and sorted in forward order (duplicates
    dropped); ``None``: every head and MLP. Raises ``ComponentError`` for any other kind (residual
    points cannot be ablated or patched here)."""
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
    comps = ablatable_components(model, components)
    acts = read_activations(model, batch.input_ids, batch.attention_mask, comps, batch_size=batch_size)
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
    comps = ablatable_components(model, components)
    ref = task_data.reference
    if method == "zero":
        widths = {c: model.arch.d_head if c.is_head else model.arch.d_model for c in comps}
        return AblationValues("zero", {c: torch.zeros(1, w) for c, w in widths.items()})
    if len(ref) == 0:
        raise TaskError("task_data.reference is empty: mean/resample ablation needs reference prompts "
                        "(build the task with a reference set, or use method='zero')")
    acts = read_activations(model, ref.input_ids, ref.attention_mask, comps, batch_size=batch_size)
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
