"""Control pairs for a comparison: what the alignment score is when the mechanism is taken away.

A control copy keeps a model's architecture, tokenizer and parameter statistics but not its
circuits:

- ``shuffle_heads``: every attention head's query weights and output-projection columns are moved
  to another head slot, drawn by one random permutation over all ``(layer, head)`` slots of the model
  (key/value weights, which grouped-query attention shares, stay); a head so moved reads another
  layer's residual stream and writes into another, so the copy computes something else with the
  same weights;
- ``reinit``: every matrix of every decoder layer is redrawn from a normal distribution with that
  matrix's own standard deviation (norm weights and biases stay), so only the embeddings remain.

``control_comparisons`` compares each model with the control copy of the other (``teacher ~ student*``,
``teacher* ~ student``) and with its own control copy (``teacher ~ teacher*``, ``student ~ student*``),
reusing the true comparison's sweeps, and records each pair's alignment score and mean similarity: a
comparison that measures a shared mechanism scores the true pair above every control pair.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ..model.loading import Model
from ..tasks.base import TaskData

CONTROLS = ("shuffle_heads", "reinit")


@torch.no_grad()
def control_copy(model, kind: str = "shuffle_heads", seed: int = 0) -> Model:
    """A copy of ``model`` (``Model``) whose circuits are destroyed by ``kind`` (see the module docstring)."""
    if kind not in CONTROLS:
        raise ConfigError(f"unknown control {kind!r}; use one of {', '.join(CONTROLS)}")
    hf = copy.deepcopy(model.hf)
    arch = model.arch
    g = torch.Generator().manual_seed(seed)
    if kind == "shuffle_heads":
        slots = [(layer, h) for layer in range(arch.n_layers) for h in range(arch.n_heads)]
        perm = torch.randperm(len(slots), generator=g).tolist()
        src = {s: [p.of(model.hf).detach().clone() for p in _qo(arch, *s)] for s in slots}
        for dst, j in zip(slots, perm):
            for view, value in zip([p.of(hf) for p in _qo(arch, *dst)], src[slots[j]]):
                view.copy_(value)
    else:
        for layer in range(arch.n_layers):
            for p in arch.layer(hf, layer).parameters():
                if p.dim() >= 2:
                    std = float(p.float().std())
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    return Model(hf, model.tokenizer, arch, name=f"{model.name}+{kind}", self_check_error=None)


def _qo(arch, layer: int, head: int):
    hs = arch.head_slices(layer, head)
    return hs.q + hs.o


def _summary(cmp) -> dict:
    return {"alignment": float(cmp.alignment), "mean_similarity": float(cmp.mean_similarity),
            "alignment_by_kind": {k: float(v) for k, v in cmp.alignment_by_kind.items()},
            "teacher_clean": dict(cmp.teacher_sweep.clean), "student_clean": dict(cmp.student_sweep.clean)}


def control_comparisons(teacher, student, teacher_data: TaskData, student_data: TaskData, true_cmp,
                        *, controls: Sequence[str] = ("shuffle_heads",), sides: Sequence[str] = ("teacher", "student"),
                        seed: int = 0, sweeps: dict | None = None, **compare_kw) -> dict[str, dict]:
    """Control pairs of ``true_cmp`` (the ``Comparison`` of ``teacher`` and ``student``), by control kind:
    ``{"<kind>: teacher ~ student*": summary, ...}`` with the four pairs of the module docstring, or
    only the two that need a control copy of a model in ``sides`` (each control copy costs a sweep).

    ``sweeps``: an optional dict ``name -> SweepResult`` of control sweeps already run (names
    ``"teacher+<kind>"``/``"student+<kind>"``); new ones are added to it, so a caller can save them
    and resume. ``compare_kw`` are ``compare``'s options (as for ``true_cmp``).
    """
    from .compare import compare

    sweeps = {} if sweeps is None else sweeps
    out: dict[str, dict] = {}
    ts, ss = true_cmp.teacher_sweep, true_cmp.student_sweep
    bad = [x for x in sides if x not in ("teacher", "student")]
    if bad or not sides:
        raise ConfigError(f"sides must be a non-empty subset of teacher, student; got {list(sides)}")
    for kind in controls:
        t_ctl = control_copy(teacher, kind, seed) if "teacher" in sides else None
        s_ctl = control_copy(student, kind, seed) if "student" in sides else None
        tk, sk = f"teacher+{kind}", f"student+{kind}"
        runs = (
            ("teacher ~ student*", teacher, s_ctl, teacher_data, student_data, ts, sweeps.get(sk), (None, sk)),
            ("teacher* ~ student", t_ctl, student, teacher_data, student_data, sweeps.get(tk), ss, (tk, None)),
            ("teacher ~ teacher*", teacher, t_ctl, teacher_data, teacher_data, ts, sweeps.get(tk), (None, tk)),
            ("student ~ student*", student, s_ctl, student_data, student_data, ss, sweeps.get(sk), (None, sk)),
        )
        for name, t, s, td, sd, t_sw, s_sw, keys in runs:
            if t is None or s is None:
                continue
            cmp = compare(t, s, td, student_data=sd, teacher_sweep=t_sw if t_sw is not None else sweeps.get(keys[0]),
                          student_sweep=s_sw if s_sw is not None else sweeps.get(keys[1]), **compare_kw)
            for key, sw in zip(keys, (cmp.teacher_sweep, cmp.student_sweep)):
                if key is not None:
                    sweeps[key] = sw
            out[f"{kind}: {name}"] = _summary(cmp)
        del t_ctl, s_ctl
    return out
