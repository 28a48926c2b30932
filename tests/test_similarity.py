"""CKA: properties, an independent NumPy reference, gradients, and the distributed (global-batch) estimate."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from circuit_distill.distill.losses import alignment_loss
from circuit_distill.errors import CircuitDistillError, ConfigError
from circuit_distill.similarity import cka_matrix, gather_with_grad, linear_cka, linear_cka_batched, rbf_cka


def _rand(m: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- independent NumPy reference (float64) ----------------------------------------------------------

def np_cka_biased(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC(K, L) = tr(K H L H) / (m - 1)^2 with explicit centering matrices."""
    m = x.shape[0]
    h = np.eye(m) - np.ones((m, m)) / m
    k, l = x @ x.T, y @ y.T  # noqa: E741

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (m - 1) ** 2

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def np_cka_debiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC written out term by term (Song et al. 2012, eq. 5), not U-centering."""
    m = x.shape[0]

    def hsic_u(k, l):  # noqa: E741
        kt, lt = k.copy(), l.copy()
        np.fill_diagonal(kt, 0)
        np.fill_diagonal(lt, 0)
        one = np.ones(m)
        t1 = np.trace(kt @ lt)
        t2 = (one @ kt @ one) * (one @ lt @ one) / ((m - 1) * (m - 2))
        t3 = 2.0 / (m - 2) * (one @ kt @ lt @ one)
        return (t1 + t2 - t3) / (m * (m - 3))

    k, l = x @ x.T, y @ y.T  # noqa: E741
    return hsic_u(k, l) / np.sqrt(hsic_u(k, k) * hsic_u(l, l))


def np_cka_ucentered(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased CKA by U-centering the Gram matrices (Kornblith et al.'s formulation)."""
    def uc(g):
        n = g.shape[0]
        g = g.copy()
        np.fill_diagonal(g, 0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None]
        g -= means[None, :]
        np.fill_diagonal(g, 0)
        return g

    k, l = uc(x @ x.T), uc(y @ y.T)  # noqa: E741
    return (k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum())


@pytest.mark.parametrize("m,dx,dy,seed", [(5, 3, 7, 0), (16, 8, 4, 1), (40, 16, 32, 2)])
def test_matches_numpy_reference(m, dx, dy, seed):
    x, y = _rand(m, dx, seed), _rand(m, dy, seed + 100)
    y = y + 0.5 * x @ _rand(dx, dy, seed + 200)  # some shared structure, CKA well away from 0
    xn, yn = x.numpy(), y.numpy()
    assert abs(float(linear_cka(x, y)) - np_cka_biased(xn, yn)) < 1e-6
    ref_d = np_cka_debiased(xn, yn)
    assert abs(ref_d - np_cka_ucentered(xn, yn)) < 1e-10  # the two references agree with each other
    assert abs(float(linear_cka(x, y, debiased=True)) - ref_d) < 1e-6


def test_self_similarity_is_one_and_invariances():
    x = _rand(32, 12, 0)
    y = _rand(32, 6, 1) + x[:, :6]
    assert abs(float(linear_cka(x, x)) - 1) < 1e-9
    assert abs(float(linear_cka(x, x, debiased=True)) - 1) < 1e-9
    q, _ = torch.linalg.qr(_rand(12, 12, 3))
    base = float(linear_cka(x, y))
    assert abs(float(linear_cka(x @ q, y)) - base) < 1e-9  # orthogonal transform
    assert abs(float(linear_cka(7.5 * x, 0.01 * y)) - base) < 1e-9  # isotropic scaling
    assert abs(float(linear_cka(x + 3.0, y)) - base) < 1e-9  # translation (centring)
    base_d = float(linear_cka(x, y, debiased=True))
    assert abs(float(linear_cka(x @ q, 3 * y, debiased=True)) - base_d) < 1e-9
    assert abs(float(linear_cka(x - 5.0, y, debiased=True)) - base_d) < 1e-9
    # not invariant to anisotropic scaling: a real property of linear CKA, so the test can fail
    s = torch.diag(torch.linspace(0.1, 10, 12, dtype=torch.float64))
    assert abs(float(linear_cka(x @ s, y)) - base) > 1e-3


def test_range_and_independent_features_are_low():
    x, y = _rand(200, 8, 0), _rand(200, 8, 1)
    v = float(linear_cka(x, y))
    assert 0 <= v < 0.1
    assert abs(float(linear_cka(x, y, debiased=True))) < 0.05  # debiased is ~0 for independent features


def test_low_precision_inputs_computed_in_fp32():
    x = (_rand(64, 16, 0, torch.float32) * 300).to(torch.bfloat16)
    y = x.float().to(torch.bfloat16)
    out = linear_cka(x, y)
    assert out.dtype == torch.float32
    assert abs(float(out) - 1) < 1e-5
    big = torch.full((8, 4), 6e4, dtype=torch.float16) + torch.arange(32, dtype=torch.float16).reshape(8, 4)
    assert torch.isfinite(linear_cka(big, big)) and abs(float(linear_cka(big, big)) - 1) < 1e-3


def test_constant_features_give_zero_not_nan():
    x = torch.ones(10, 4)
    y = torch.randn(10, 3, requires_grad=True)
    v = linear_cka(x, y)
    assert float(v.detach()) == 0.0
    v.backward()
    assert torch.isfinite(y.grad).all()
    assert torch.isfinite(linear_cka(x, y.detach(), debiased=True))


@pytest.mark.parametrize("debiased,m", [(False, 1), (True, 3)])
def test_too_small_batch_is_a_clear_error(debiased, m):
    with pytest.raises(ConfigError, match="at least"):
        linear_cka(torch.randn(m, 3), torch.randn(m, 3), debiased=debiased)
    assert issubclass(ConfigError, CircuitDistillError)


def test_row_mismatch_is_an_error():
    with pytest.raises(ConfigError, match="same number of rows"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))


@pytest.mark.parametrize("debiased", [False, True])
def test_gradcheck(debiased):
    x = _rand(7, 3, 0).requires_grad_(True)
    y = _rand(7, 4, 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: linear_cka(a, b, debiased=debiased), (x, y))


def _autograd_cka(x, y):
    """The biased linear CKA formula left to autograd (reference for the hand-written backward)."""
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    hxy = (y.transpose(1, 2) @ x).pow(2).sum((1, 2))
    hxx = (x.transpose(1, 2) @ x).pow(2).sum((1, 2)).sqrt()
    hyy = (y.transpose(1, 2) @ y).pow(2).sum((1, 2)).sqrt()
    return hxy / (hxx * hyy)


def test_batched_backward_matches_autograd_and_gradcheck():
    x = torch.randn(3, 40, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 40, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64)
    gx, gy = torch.autograd.grad((linear_cka_batched(x, y) * w).sum(), (x, y))
    rx, ry = torch.autograd.grad((_autograd_cka(x, y) * w).sum(), (x, y))
    torch.testing.assert_close(gx, rx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gy, ry, rtol=1e-9, atol=1e-12)
    xs, ys = (t.detach()[:, :9, :3].clone().requires_grad_(True) for t in (x, y))
    assert torch.autograd.gradcheck(lambda a, b: linear_cka_batched(a, b), (xs, ys))
    # float32 inputs: the same gradient to float32 precision
    xf = x.detach().float().requires_grad_(True)
    gf, = torch.autograd.grad(linear_cka_batched(xf, y.detach().float()).sum(), xf)
    rf, = torch.autograd.grad(_autograd_cka(x, y.detach()).sum(), x)
    torch.testing.assert_close(gf.double(), rf, rtol=1e-4, atol=1e-6)


def test_constant_features_give_zero_cka_and_finite_zero_gradient():
    x = torch.ones(2, 10, 4, requires_grad=True)
    y = torch.randn(2, 10, 3)
    c = linear_cka_batched(x, y)
    assert torch.equal(c, torch.zeros(2))
    g, = torch.autograd.grad(c.sum(), x)
    assert torch.equal(g, torch.zeros_like(g))


def test_rbf_cka():
    x = _rand(30, 5, 0)
    assert abs(float(rbf_cka(x, x)) - 1) < 1e-9
    q, _ = torch.linalg.qr(_rand(5, 5, 1))
    y = torch.tanh(x @ _rand(5, 4, 2))
    base = float(rbf_cka(x, y))
    # distances are invariant to orthogonal maps and the bandwidth follows the median, so scaling too
    assert abs(float(rbf_cka(4.0 * x @ q, y)) - base) < 1e-9
    assert 0 < float(rbf_cka(x, _rand(30, 5, 9))) < base
    assert abs(float(rbf_cka(x, y, sigma=1e3)) - float(linear_cka(x, y))) < 1e-3  # wide kernel -> linear
    with pytest.raises(ConfigError):
        rbf_cka(x, y, sigma=0)


def test_cka_matrix():
    xs = [_rand(20, 4, i) for i in range(3)]
    mat = cka_matrix(xs, xs[::-1])
    assert mat.shape == (3, 3)
    assert abs(float(mat[0, 2]) - 1) < 1e-9 and float(mat[0, 0]) < 0.9


def test_gather_is_noop_without_distributed():
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x
    assert linear_cka(x, x.detach(), distributed=True).item() == pytest.approx(1.0)


# ---- distributed: 2 processes (gloo) compute the CKA of the global batch --------------------------

SIZES = (7, 5)  # unequal row counts per rank (e.g. positions='all' with padding)


def _global_data():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(sum(SIZES), 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = a @ torch.randn(6, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(sum(SIZES), 5, generator=g,
                                                                                    dtype=torch.float64)
    return a, w, t


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        a, w0, t = _global_data()
        lo = sum(SIZES[:rank])
        sl = slice(lo, lo + SIZES[rank])
        res = {}
        for debiased in (False, True):
            w = w0.clone().requires_grad_(True)  # a parameter shared (replicated) by both ranks, as in DDP
            x = a[sl] @ w
            cka = linear_cka(x, t[sl], debiased=debiased, distributed=True)
            cka.backward()
            grad = w.grad.clone()
            dist.all_reduce(grad)  # what DDP does: average parameter gradients over ranks
            grad /= world
            local = linear_cka(a[sl] @ w0, t[sl], debiased=debiased)  # the per-rank value, for contrast
            # alignment_loss over two pairs gathers all pairs at once: same value and DDP gradient
            w = w0.clone().requires_grad_(True)
            x = a[sl] @ w
            loss = alignment_loss([x, x[:, :2].tanh()], [t[sl], t[sl, :3]], debiased=debiased, distributed=True)
            loss.backward()
            agrad = w.grad.clone()
            dist.all_reduce(agrad)
            agrad /= world
            res[debiased] = (cka.detach(), grad, local, loss.detach(), agrad)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_cka_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, w0, t = _global_data()
    for debiased in (False, True):
        w = w0.clone().requires_grad_(True)
        ref = linear_cka(a @ w, t, debiased=debiased)
        ref.backward()
        w2 = w0.clone().requires_grad_(True)
        x = a @ w2
        aref = alignment_loss([x, x[:, :2].tanh()], [t, t[:, :3]], debiased=debiased)
        aref.backward()
        for rank in range(2):
            cka, grad, local, aloss, agrad = torch.load(tmp_path / f"rank{rank}.pt")[debiased]
            assert abs(cka.item() - ref.item()) < 1e-12
            assert torch.allclose(grad, w.grad, atol=1e-12, rtol=1e-9)
            assert abs(float(local) - ref.item()) > 1e-4  # the per-rank CKA really differs
            assert abs(float(aloss) - aref.item()) < 1e-12
            assert torch.allclose(agrad, w2.grad, atol=1e-12, rtol=1e-9)


def test_properties_hypothesis():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @given(m=st.integers(4, 24), dx=st.integers(1, 9), dy=st.integers(1, 9), seed=st.integers(0, 10_000),
           debiased=st.booleans())
    def check(m, dx, dy, seed, debiased):
        x, y = _rand(m, dx, seed), _rand(m, dy, seed + 1)
        v = float(linear_cka(x, y, debiased=debiased))
        assert float(linear_cka(y, x, debiased=debiased)) == pytest.approx(v, abs=1e-12)  # symmetric
        assert (-1 if debiased else 0) - 1e-12 <= v <= 1 + 1e-12
        perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
        assert float(linear_cka(x[perm], y[perm], debiased=debiased)) == pytest.approx(v, abs=1e-9)
        ref = (np_cka_ucentered if debiased else np_cka_biased)(x.numpy(), y.numpy())
        assert v == pytest.approx(ref, abs=1e-6)

    check()
