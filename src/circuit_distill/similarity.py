"""Representation similarity: linear CKA (biased and debiased), RBF CKA, and distributed CKA; the
row-wise cosine of attention patterns and the similarity of principal subspaces.

CKA compares activation matrices of different widths: ``x [rows, d1]`` and ``y [rows, d2]`` hold one row
per example (or token) for the same inputs. Always computed in float32 (or float64 if the
input is), whatever the model's dtype, with an epsilon so constant features give 0, not NaN.

Under data parallelism CKA is *not* additive across ranks: the mean of per-rank CKAs is a biased,
noisier estimate than the CKA of the global batch. ``linear_cka(..., distributed=True)`` gathers
the rows of every rank first (``gather_with_grad``), so every rank computes the CKA of the global
batch and gradients flow back to each rank's own rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import ConfigError

EPS = 1e-8
SUBSPACES = ("samples", "features")  # principal_subspace: left or right singular vectors
_TINY = 1e-30  # keeps sqrt() and division differentiable at 0 (constant features)


def _prep(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1)
    return x if x.dtype == torch.float64 else x.float()


def _check_rows(x: torch.Tensor, y: torch.Tensor, debiased: bool, what: str = "CKA") -> int:
    if x.dim() < 1 or y.dim() < 1:
        raise ConfigError(f"{what} needs matrices [rows, d]; got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"{what} needs the same number of rows (examples or tokens) in both matrices, got "
            f"{x.shape[0]} and {y.shape[0]}; select the same positions of the same inputs in both models"
        )
    m = x.shape[0]
    need = min_rows(debiased)
    if m < need:
        raise ConfigError(
            f"{what} over {m} rows is undefined: the {'debiased' if debiased else 'biased'} estimator needs at "
            f"least {need} rows (examples or tokens); use a larger batch or more positions (e.g. positions='all')"
        )
    return m


def min_rows(debiased: bool = False) -> int:
    """Smallest number of rows CKA is defined for: 2 (biased) or 4 (debiased, unbiased HSIC)."""
    return 4 if debiased else 2


# ---- distributed ----------------------------------------------------------------------------------

def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_dist_active = is_distributed


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different row counts); backward sums the gradient of the
    gathered tensor over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        sizes_l = [int(s.item()) for s in sizes]
        biggest = max(sizes_l)
        xc = x.contiguous()
        if x.shape[0] < biggest:
            pad = xc.new_zeros((biggest - x.shape[0], *x.shape[1:]))
            xc = torch.cat([xc, pad], 0)
        bufs = [torch.empty_like(xc) for _ in range(world)]
        dist.all_gather(bufs, xc)
        rank = dist.get_rank()
        ctx.start = sum(sizes_l[:rank])
        ctx.n = sizes_l[rank]
        return torch.cat([b[:s] for b, s in zip(bufs, sizes_l)], 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start: ctx.start + ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x [n_rank, ...]`` of every rank along dim 0 -> ``[sum n_rank, ...]``, rank order.

    Ranks may hold different numbers of rows (e.g. ``positions='all'`` with padding). Gradients reach
    this rank's rows. Backward *sums* the gradient over ranks (like
    ``torch.distributed.nn.functional.all_gather``): when every rank computes the same global loss and
    DDP averages parameter gradients, the result is exactly the single-process gradient of that loss
    on the global batch. A no-op when ``torch.distributed`` is not initialised or has one rank.
    """
    if not _dist_active():
        return x
    return _GatherWithGrad.apply(x)


# ---- linear CKA -----------------------------------------------------------------------------------

def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False, *, distributed: bool = False,
               eps: float = EPS) -> torch.Tensor:
    """Linear CKA of ``x [rows, d1]`` and ``y [rows, d2]`` (Kornblith et al. 2019), a differentiable scalar.

    Biased: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``, in
    [0, 1]; costs O(rows d^2), fine for thousands of rows. ``debiased``: the same ratio of unbiased
    HSIC estimates (Song et al. 2012; computed by U-centering the ``[rows, rows]`` Gram matrices), needs
    rows >= 4 and can be slightly negative for unrelated features. ``distributed``: first gather the
    rows of every rank (``gather_with_grad``), so the CKA is that of the global batch; ignored
    without ``torch.distributed``. Constant features give 0 (``eps`` guards the denominator; inputs
    are scale-normalised first, so it never biases a non-degenerate value). Raises ``ConfigError``
    if there are too few rows. A batch of one for ``linear_cka_batched``.
    """
    if distributed:
        x, y = gather_with_grad(x), gather_with_grad(y)
    _check_rows(x, y, debiased)
    return linear_cka_batched(_prep(x)[None], _prep(y)[None], debiased, eps=eps)[0]


def linear_cka_batched(x: torch.Tensor, y: torch.Tensor, debiased: bool = False, *, distributed: bool = False,
                       eps: float = EPS) -> torch.Tensor:
    """Linear CKA of ``P`` pairs at once: ``x [P, rows, d1]`` and ``y [P, rows, d2]`` -> ``[P]``.

    The same values as ``linear_cka(x[p], y[p])`` for every ``p``, with a fixed number of tensor
    operations whatever ``P`` (on CPU, a handful of pairs of small head matrices cost mostly per-op
    overhead). ``distributed`` gathers the rows of every rank, as ``linear_cka`` does.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"linear_cka_batched needs [P, rows, d1] and [P, rows, d2]; got shapes {tuple(x.shape)} "
                          f"and {tuple(y.shape)}")
    if distributed and _dist_active():
        x, y = _gather_rows(x), _gather_rows(y)
    _check_rows(x[0], y[0], debiased)
    x = x if x.dtype == torch.float64 else x.float()
    y = y if y.dtype == torch.float64 else y.float()
    if debiased:
        x, y = _centred_unit(x)[0], _centred_unit(y)[0]
        return _cka_from_grams(x @ x.transpose(1, 2), y @ y.transpose(1, 2), debiased=True, eps=eps)
    return _BiasedLinearCKA.apply(x, y, eps)


def _centred_unit(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-centre each matrix of ``t [P, rows, d]`` and scale it to unit Frobenius norm -> ``(tn, norm [P, 1, 1])``.

    Centring changes neither CKA estimator, nor does scale; with unit-norm inputs, fp32 sums stay far
    from overflow."""
    tc = t - t.mean(1, keepdim=True)
    s = tc.norm(dim=(1, 2), keepdim=True).clamp_min(_TINY)
    return tc / s, s


class _BiasedLinearCKA(torch.autograd.Function):
    """Biased linear CKA of ``x [P, rows, d1]``, ``y [P, rows, d2]`` with a hand-written backward.

    The forward is the feature-space formula; the backward is its analytic gradient, a few batched
    matrix products instead of the ~40 small operations autograd would record (on CPU and small
    heads, the per-operation overhead is most of the alignment's cost). With ``Xn`` the centred,
    unit-norm ``x``, ``A = Xn^T Xn``, ``C = Yn^T Xn``, ``hxy = ||C||^2``, ``hxx = ||A||``,
    ``den = hxx hyy``: ``d CKA / d Xn = 2 Yn C / den - 2 (hxy hyy / den^2) Xn A / hxx``, then back through
    the normalisation (``(I - Xn Xn^T) / ||Xc||``); the centring's backward is the identity here. The same for ``y``.
    Equal to autograd's gradient of the composed formula (gradcheck in float64, tests/test_similarity.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        (xn, sx), (yn, sy) = _centred_unit(x), _centred_unit(y)
        a, b, c = xn.transpose(1, 2) @ xn, yn.transpose(1, 2) @ yn, yn.transpose(1, 2) @ xn
        # per-pair scalars kept as [P, 1, 1]
        hxy = c.pow(2).sum((1, 2), keepdim=True)
        hxx = a.pow(2).sum((1, 2), keepdim=True).clamp_min(_TINY).sqrt()
        hyy = b.pow(2).sum((1, 2), keepdim=True).clamp_min(_TINY).sqrt()
        den = hxx * hyy
        live = den > eps  # the denominator's clamp passes no gradient to hxx, hyy
        den = den.clamp_min(eps)
        cka = hxy / den
        ctx.save_for_backward(xn, yn, a, b, c, sx, sy, cka, hxx, hyy, den, live)
        return cka.reshape(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xn, yn, a, b, c, sx, sy, cka, hxx, hyy, den, live = ctx.saved_tensors
        g2 = 2 * grad.reshape(-1, 1, 1)
        cross = g2 / den
        self_w = g2 * cka * live
        gx = gy = None

        def back(n, s, gn):  # through n = (v - mean) / ||v - mean||
            # gn is a sum of centred matrices times matrices (Yn C, Xn A), so its column means are already 0
            # and the centring's backward (subtract the row mean) is the identity
            return (gn - n * (n * gn).sum((1, 2), keepdim=True)) / s

        if ctx.needs_input_grad[0]:  # d hxx / d Xn = 2 Xn A / hxx, and d cka / d hxx = -cka / hxx
            gx = back(xn, sx, cross * (yn @ c) - (self_w / hxx.square()) * (xn @ a))
        if ctx.needs_input_grad[1]:
            gy = back(yn, sy, cross * (xn @ c.transpose(1, 2)) - (self_w / hyy.square()) * (yn @ b))
        return gx, gy, None


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``gather_with_grad`` along the row dimension of ``x [P, rows, d]``."""
    p, m, d = x.shape
    g = gather_with_grad(x.transpose(0, 1).reshape(m, p * d))
    return g.reshape(g.shape[0], p, d).transpose(0, 1)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """Scale each matrix of ``t [..., a, b]`` to unit Frobenius norm."""
    return t / t.norm(dim=(-2, -1), keepdim=True).clamp_min(_TINY)


def _center(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` with ``H = I - 11^T / m`` for each Gram matrix of ``k [..., m, m]``."""
    return k - k.mean(-2, keepdim=True) - k.mean(-1, keepdim=True) + k.mean((-2, -1), keepdim=True)


def _u_center(k: torch.Tensor) -> torch.Tensor:
    """U-centred Gram matrices (Szekely & Rizzo 2014) of ``k [..., m, m]``: ``<U(K), U(L)> / (m (m - 3))``
    is the unbiased HSIC."""
    m = k.shape[-1]
    eye = torch.eye(m, dtype=torch.bool, device=k.device)
    k = k.masked_fill(eye, 0)
    means = k.sum(-2) / (m - 2)  # [..., m]
    means = means - means.sum(-1, keepdim=True) / (2 * (m - 1))
    return (k - means[..., :, None] - means[..., None, :]).masked_fill(eye, 0)


def _cka_from_grams(kx: torch.Tensor, ky: torch.Tensor, *, debiased: bool, eps: float) -> torch.Tensor:
    """CKA of Gram matrices ``[..., m, m]``: the cosine of their (U-)centred versions -> ``[...]``."""
    kc, lc = (_u_center(kx), _u_center(ky)) if debiased else (_center(kx), _center(ky))
    kc, lc = _unit(kc), _unit(lc)  # the HSIC normalisers cancel: CKA is a cosine
    hxx = kc.pow(2).sum((-2, -1)).clamp_min(_TINY).sqrt()
    hyy = lc.pow(2).sum((-2, -1)).clamp_min(_TINY).sqrt()
    return (kc * lc).sum((-2, -1)) / (hxx * hyy).clamp_min(eps)


# ---- RBF CKA (evaluation) -------------------------------------------------------------------------

def _rbf_gram(x: torch.Tensor, sigma: float) -> torch.Tensor:
    sq = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(-1)  # [rows, rows], exact zeros on the diagonal
    off = sq[~torch.eye(sq.shape[0], dtype=torch.bool, device=sq.device)]
    med = off.median() if off.numel() else sq.new_tensor(0.0)
    bandwidth2 = (sigma ** 2) * med
    if float(bandwidth2) <= 0:  # all rows identical: constant kernel, CKA 0 by the epsilon
        return torch.ones_like(sq)
    return torch.exp(-sq / (2 * bandwidth2))


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma: float = 0.8, *, debiased: bool = False,
            distributed: bool = False, eps: float = EPS) -> torch.Tensor:
    """CKA with Gaussian (RBF) kernels of ``x [rows, d1]`` and ``y [rows, d2]``, for evaluation.

    Kernel ``k(a, b) = exp(-||a - b||^2 / (2 (sigma * median_dist)^2))`` where ``median_dist^2`` is the
    median squared distance between distinct rows (Kornblith et al. 2019's convention; ``sigma`` is a
    fraction of the median distance). Builds ``[rows, rows]`` Gram matrices: memory is O(rows^2).
    """
    if sigma <= 0:
        raise ConfigError(f"rbf_cka: sigma must be > 0 (a fraction of the median distance), got {sigma}")
    if distributed:
        x, y = gather_with_grad(x), gather_with_grad(y)
    _check_rows(x, y, debiased, what="RBF CKA")
    x, y = _prep(x), _prep(y)
    return _cka_from_grams(_rbf_gram(x, sigma), _rbf_gram(y, sigma), debiased=debiased, eps=eps)


def cka_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor], *, debiased: bool = False,
               kernel: str = "linear", sigma: float = 0.8) -> torch.Tensor:
    """Pairwise CKA ``[len(xs), len(ys)]`` of matrices ``xs[i] [rows, d_i]`` and ``ys[j] [rows, d_j]`` (no grad)."""
    if kernel not in ("linear", "rbf"):
        raise ConfigError(f"unknown CKA kernel {kernel!r}; use 'linear' or 'rbf'")
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    with torch.no_grad():
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                v = linear_cka(x, y, debiased) if kernel == "linear" else rbf_cka(x, y, sigma, debiased=debiased)
                out[i, j] = float(v)
    return out


# ---- attention patterns and principal subspaces ---------------------------------------------------

def rowwise_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over query rows of cos(``a[i]``, ``b[i]``) for patterns ``[T, T]`` (rows of zeros give 0)."""
    if a.shape != b.shape:
        raise ConfigError(f"attention patterns differ in shape {tuple(a.shape)} vs {tuple(b.shape)}: "
                          "compute them on the same prompts")
    a, b = a.double(), b.double()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return float((num / den.clamp_min(eps)).mean())


def principal_subspace(x: torch.Tensor, k: int = 3, space: str = "samples") -> torch.Tensor:
    """Orthonormal top-``k`` principal directions of the column-centred ``x [rows, d]``:
    ``[rows, k]`` (``space="samples"``: left singular vectors) or ``[d, k]`` (``"features"``)."""
    if space not in SUBSPACES:
        raise ConfigError(f"unknown subspace {space!r}; use one of {', '.join(SUBSPACES)}")
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, int((s > s.max() * 1e-10).sum()) if s.numel() and s.max() > 0 else 0)
    return u[:, :k] if space == "samples" else vh[:k].t()


def subspace_similarity(u: torch.Tensor, v: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spaces of orthonormal
    ``u [n, k1]`` and ``v [n, k2]``: ``||u^T v||_F^2 / max(k1, k2)`` in [0, 1] (0 if either is empty)."""
    if u.shape[0] != v.shape[0]:
        raise ConfigError(f"subspaces live in spaces of different size ({u.shape[0]} vs {v.shape[0]}); with "
                          "different model widths use mlp_space='samples'")
    k = max(u.shape[1], v.shape[1])
    if k == 0 or min(u.shape[1], v.shape[1]) == 0:
        return 0.0
    return float((u.t().double() @ v.double()).pow(2).sum() / k)
