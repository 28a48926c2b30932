"""Representation similarity: linear CKA (biased and debiased).

CKA compares activation matrices of different widths: ``x [m, d1]`` and ``y [m, d2]`` hold one row
per example (or token) for the same ``m`` inputs. Always computed in float32 (or float64 if the
input is), whatever the model's dtype, with an epsilon so constant features give 0, not NaN.
"""

from __future__ import annotations

import torch

from .errors import CircuitDistillError

EPS = 1e-8


def _prep(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1)
    return x if x.dtype == torch.float64 else x.float()


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = False, eps: float = EPS) -> torch.Tensor:
    """Linear CKA of ``x [m, d1]`` and ``y [m, d2]`` (Kornblith et al. 2019), a differentiable scalar.

    Biased: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``.
    ``debiased``: the same ratio of unbiased HSIC estimates (Song et al. 2012), needs m >= 4.
    """
    if x.shape[0] != y.shape[0]:
        raise CircuitDistillError(f"CKA needs the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    m = x.shape[0]
    need = 4 if debiased else 2
    if m < need:
        raise CircuitDistillError(
            f"CKA over {m} rows is undefined: the {'debiased' if debiased else 'biased'} estimator needs at "
            f"least {need} rows (examples or tokens); use a larger batch or more positions"
        )
    x, y = _prep(x), _prep(y)
    if not debiased:
        x = x - x.mean(0, keepdim=True)
        y = y - y.mean(0, keepdim=True)
        hxy = (y.t() @ x).pow(2).sum()
        hxx = (x.t() @ x).pow(2).sum().sqrt()
        hyy = (y.t() @ y).pow(2).sum().sqrt()
        return hxy / (hxx * hyy + eps)
    kx, ky = x @ x.t(), y @ y.t()
    hxy, hxx, hyy = _hsic_unbiased(kx, ky), _hsic_unbiased(kx, kx), _hsic_unbiased(ky, ky)
    return hxy / ((hxx.clamp(min=0) * hyy.clamp(min=0)).sqrt() + eps)


def _hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Unbiased HSIC of Gram matrices ``[m, m]`` (Song et al. 2012), up to a constant that cancels in CKA."""
    m = k.shape[0]
    k = k - torch.diag_embed(torch.diagonal(k))
    l = l - torch.diag_embed(torch.diagonal(l))  # noqa: E741
    kl = k @ l
    term = torch.trace(kl) + k.sum() * l.sum() / ((m - 1) * (m - 2)) - 2 * kl.sum() / (m - 2)
    return term / (m * (m - 3))
