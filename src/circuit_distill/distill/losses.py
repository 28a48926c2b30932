"""Distillation losses: pure functions of tensors, usable in any training loop.

Everything is computed in float32 (float64 if given), whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..similarity import gather_with_grad, is_distributed, linear_cka, linear_cka_batched


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``student_logits [n, V]`` against ``labels [n]`` (``ignore_index`` rows skipped)."""
    if student_logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != student_logits.shape[0]:
        raise ConfigError(
            f"ce_loss expects logits [n, V] and labels [n]; got {tuple(student_logits.shape)} and "
            f"{tuple(labels.shape)} (select the answer position's logits first)"
        )
    return F.cross_entropy(_f32(student_logits), labels.long(), ignore_index=ignore_index)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton distillation loss ``T^2 * KL(p_t || p_s)`` with ``p = softmax(logits / T)``, mean over rows.

    ``student_logits``, ``teacher_logits``: ``[n, V]`` (same vocabulary). Gradients flow to the
    student only (the teacher logits are detached).
    """
    if temperature <= 0:
        raise ConfigError(f"kd_loss: temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ConfigError(
            f"kd_loss expects student and teacher logits of the same shape [n, V]; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} (teacher and student must share "
            "a tokenizer/vocabulary)"
        )
    log_ps = F.log_softmax(_f32(student_logits) / temperature, dim=-1)
    log_pt = F.log_softmax(_f32(teacher_logits).detach() / temperature, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def pair_ckas(student_feats: Sequence[torch.Tensor] | torch.Tensor, teacher_feats: Sequence[torch.Tensor] | torch.Tensor,
              *, debiased: bool = False, distributed: bool = False) -> torch.Tensor:
    """Linear CKA of each pair: ``student_feats[i] [m, d_s]`` vs ``teacher_feats[i] [m, d_t]`` -> ``[n_pairs]``.

    Either side may also be one tensor ``[n_pairs, m, d]``. Pairs of equal widths are computed in one
    batched CKA (``linear_cka_batched``); mixed widths fall back to one CKA per pair.
    """
    if len(student_feats) != len(teacher_feats):
        raise ConfigError(f"alignment needs as many student as teacher features, got {len(student_feats)} "
                          f"and {len(teacher_feats)}")
    if len(student_feats) == 0:
        raise ConfigError("alignment needs at least one (student, teacher) pair; check the component map")
    if isinstance(teacher_feats, torch.Tensor):
        teacher_feats = teacher_feats.detach()
    else:
        teacher_feats = [t.detach() for t in teacher_feats]
    stacked = [_stack(f) for f in (student_feats, teacher_feats)]
    if all(f is not None for f in stacked) and stacked[0].shape[1] == stacked[1].shape[1]:
        return linear_cka_batched(stacked[0], stacked[1], debiased, distributed=distributed)
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    rows = {f.shape[0] for f in (*student_feats, *teacher_feats)}
    if distributed and is_distributed() and len(rows) == 1:
        # one collective per side instead of one per pair: gather [m, sum of widths] and split
        student_feats = _gather_many(student_feats)
        teacher_feats = _gather_many(teacher_feats)
        distributed = False
    return torch.stack([
        linear_cka(s, t, debiased, distributed=distributed) for s, t in zip(student_feats, teacher_feats)
    ])


def _gather_many(feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    flat = [_f32(f.reshape(f.shape[0], -1)) for f in feats]
    dtype = torch.float64 if any(f.dtype == torch.float64 for f in flat) else torch.float32
    widths = [f.shape[1] for f in flat]
    return list(gather_with_grad(torch.cat([f.to(dtype) for f in flat], 1)).split(widths, 1))


def _stack(feats: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor | None:
    """``[n_pairs, m, d]`` from one tensor or a list of same-shaped ``[m, d]`` matrices, else None."""
    if isinstance(feats, torch.Tensor):
        if feats.dim() != 3:
            raise ConfigError(f"stacked features must be [n_pairs, m, d], got shape {tuple(feats.shape)}")
        return feats
    flat = [f.reshape(f.shape[0], -1) for f in feats]
    if len({tuple(f.shape) for f in flat}) != 1 or len({f.dtype for f in flat}) != 1:
        return None
    return torch.stack(flat)


def alignment_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], *,
                   debiased: bool = False, distributed: bool = False) -> torch.Tensor:
    """Mean over pairs of ``1 - linear CKA(student_feats[i] [m, d_s], teacher_feats[i] [m, d_t])``.

    Teacher features are detached. ``distributed``: CKA of the global batch across data-parallel
    ranks (see ``similarity.gather_with_grad``).
    """
    return (1.0 - pair_ckas(student_feats, teacher_feats, debiased=debiased, distributed=distributed)).mean()
