"""Losses by hand: CE, KD (Hinton), alignment, row selection with padding, and the objective registry."""

from __future__ import annotations

import math

import pytest
import torch

from circuit_distill.distill.losses import (
    alignment_loss,
    ce_loss,
    kd_loss,
    pair_ckas,
)
from circuit_distill.distill.objectives import OBJECTIVES, get_objective, objective_loss
from circuit_distill.errors import ConfigError
from circuit_distill.similarity import linear_cka
from circuit_distill.tasks.positions import last_positions, select_rows


def test_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    z1 = math.exp(2) + 2
    z2 = 1 + math.e + math.exp(3)
    expect = (-(2 - math.log(z1)) - (1 - math.log(z2))) / 2
    assert float(ce_loss(logits, labels)) == pytest.approx(expect, rel=1e-6)
    assert float(ce_loss(logits.bfloat16(), labels)) == pytest.approx(expect, rel=1e-2)
    assert ce_loss(logits.bfloat16(), labels).dtype == torch.float32
    with pytest.raises(ConfigError, match=r"\[n, V\]"):
        ce_loss(logits[None], labels)


def test_kd_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[3.0, 1.0, -1.0], [0.5, 0.2, 0.1]])
    temp = 2.0
    expect = 0.0
    for i in range(2):
        ps = torch.softmax(s[i].detach() / temp, -1).tolist()
        pt = torch.softmax(t[i] / temp, -1).tolist()
        expect += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    expect = temp ** 2 * expect / 2
    loss = kd_loss(s, t, temperature=temp)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()
    # d/ds of T^2 KL / n = T (p_s - p_t) / n
    g = temp * (torch.softmax(s.detach() / temp, -1) - torch.softmax(t / temp, -1)) / 2
    assert torch.allclose(s.grad, g, atol=1e-6)
    assert float(kd_loss(t, t, temperature=3.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError):
        kd_loss(s, t[:, :2])
    with pytest.raises(ConfigError):
        kd_loss(s, t, temperature=0)


def test_alignment_loss_is_mean_of_one_minus_cka():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(10, 4, generator=g, requires_grad=True) for _ in range(3)]
    ys = [torch.randn(10, 6, generator=g) for _ in range(2)] + [xs[2].detach() * 3]
    loss = alignment_loss(xs, ys)
    expect = sum(1 - float(linear_cka(x.detach(), y)) for x, y in zip(xs, ys)) / 3
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert pair_ckas(xs, ys)[2].item() == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)
    dloss = alignment_loss(xs, ys, debiased=True)
    assert dloss.item() != pytest.approx(loss.item())
    with pytest.raises(ConfigError, match="at least one"):
        alignment_loss([], [])
    with pytest.raises(ConfigError, match="as many"):
        alignment_loss(xs, ys[:2])


def test_alignment_does_not_backprop_into_teacher():
    x = torch.randn(8, 3, requires_grad=True)
    y = torch.randn(8, 5, requires_grad=True)
    alignment_loss([x], [y]).backward()
    assert y.grad is None and x.grad is not None


def _acts():
    b, s, d = 3, 5, 2
    return torch.arange(b * s * d, dtype=torch.float32).reshape(b, s, d)


def test_select_rows_last_all_and_named():
    acts = _acts()
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_positions(right).tolist() == [2, 4, 0]
    assert torch.equal(select_rows(acts, right, "last"), torch.stack([acts[0, 2], acts[1, 4], acts[2, 0]]))
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert torch.equal(select_rows(acts, left, "last"), acts[:, 4])
    rows = select_rows(acts, right, "all")
    assert rows.shape == (9, 2)
    expect = torch.cat([acts[0, :3], acts[1, :5], acts[2, :1]])
    assert torch.equal(rows, expect)
    assert torch.equal(select_rows(acts, left, "all"), torch.cat([acts[0, 2:], acts[1], acts[2, 4:]]))
    assert torch.equal(select_rows(acts, None, "all"), acts.reshape(15, 2))
    pos = torch.tensor([1, 3, 0])
    assert torch.equal(select_rows(acts, right, pos), torch.stack([acts[0, 1], acts[1, 3], acts[2, 0]]))
    pos2 = torch.tensor([[0, 2], [4, 1], [0, -1]])  # -1: this row has no second named position
    out = select_rows(acts, right, pos2)
    assert torch.equal(out, torch.stack([acts[0, 0], acts[0, 2], acts[1, 4], acts[1, 1], acts[2, 0]]))
    assert torch.equal(select_rows(acts, None, 2), acts[:, 2])


def test_select_rows_keeps_gradients_and_validates():
    acts = _acts().requires_grad_(True)
    select_rows(acts, None, "last").sum().backward()
    assert acts.grad[:, -1].eq(1).all() and acts.grad[:, :-1].eq(0).all()
    with pytest.raises(ConfigError, match="positions"):
        select_rows(acts, None, "first")
    with pytest.raises(ConfigError, match="out of range"):
        select_rows(acts, None, torch.tensor([0, 5, 1]))
    with pytest.raises(ConfigError):
        select_rows(acts, None, torch.tensor([0, 1]))
    with pytest.raises(ConfigError):
        select_rows(acts[0], None, "last")


# ---- objectives ------------------------------------------------------------------------------------

def test_registry_names_and_flags():
    assert set(OBJECTIVES) == {"ce", "kd", "align_cka", "random_cka", "ce+random_cka", "ce+align_cka", "kd+align_cka",
                               "iit", "ce+iit", "kd+iit", "random_iit", "ce+random_iit", "ce+iit+align_cka"}
    o = get_objective("CE + Align CKA")
    assert o.name == "ce+align_cka" and o.uses_ce and o.uses_align and not o.uses_kd and o.pairs == "matched"
    assert get_objective("ce+rand_cka").pairs == "random"
    assert get_objective("random_cka").needs_teacher_acts and not get_objective("random_cka").uses_ce
    assert get_objective("kd").needs_teacher_logits and not get_objective("kd").needs_teacher_acts
    assert not get_objective("ce").needs_teacher_logits
    with pytest.raises(ConfigError, match="ce\\+align_cka"):
        get_objective("ce+magic")


def test_objective_loss_combines_terms():
    g = torch.Generator().manual_seed(1)
    sl = torch.randn(6, 5, generator=g, requires_grad=True)
    tl = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    sf = [torch.randn(6, 3, generator=g, requires_grad=True)]
    tf = [torch.randn(6, 4, generator=g)]
    kw = dict(student_logits=sl, labels=labels, teacher_logits=tl, student_feats=sf, teacher_feats=tf,
              lam=0.5, temperature=2.0)
    ce = ce_loss(sl, labels).item()
    kd = kd_loss(sl, tl, 2.0).item()
    al = alignment_loss(sf, tf).item()
    for name, expect in [("ce", ce), ("kd", kd), ("align_cka", 0.5 * al), ("ce+align_cka", ce + 0.5 * al),
                         ("kd+align_cka", kd + 0.5 * al), ("ce+random_cka", ce + 0.5 * al)]:
        total, parts = objective_loss(name, **kw)
        assert total.item() == pytest.approx(expect, rel=1e-6), name
        assert float(parts["total"]) == pytest.approx(expect, rel=1e-6)
    total, parts = objective_loss("ce+align_cka", **kw)
    assert set(parts) == {"ce", "align", "cka", "total"}
    assert float(parts["cka"]) == pytest.approx(1 - al, rel=1e-6)
    total.backward()
    assert sl.grad is not None and sf[0].grad is not None
    _, parts = objective_loss("ce", student_logits=sl, labels=labels)  # no teacher needed for CE
    assert set(parts) == {"ce", "total"}
    with pytest.raises(ConfigError, match="teacher_logits"):
        objective_loss("kd", student_logits=sl, labels=labels)
    with pytest.raises(ConfigError, match="student_feats"):
        objective_loss("ce+align_cka", student_logits=sl, labels=labels)


@pytest.mark.parametrize("debiased", [False, True])
def test_batched_pair_ckas_equal_one_cka_per_pair_in_value_and_gradient(debiased):
    from circuit_distill.distill.losses import pair_ckas
    from circuit_distill.similarity import linear_cka

    g = torch.Generator().manual_seed(0)
    s = [torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    t = [torch.randn(40, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    t[1] = s[1].detach() @ torch.randn(8, 12, generator=g, dtype=torch.float64)  # a related pair
    batched = pair_ckas(s, t, debiased=debiased)
    one_by_one = torch.stack([linear_cka(a, b, debiased) for a, b in zip(s, t)])
    assert torch.allclose(batched, one_by_one, atol=1e-12) and batched[1] > 3 * max(batched[0], batched[2])
    gb = torch.autograd.grad(batched.sum(), s)
    go = torch.autograd.grad(one_by_one.sum(), s)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(gb, go))
    # a stacked tensor gives the same; mixed widths fall back to one CKA per pair
    assert torch.allclose(pair_ckas(torch.stack(s), torch.stack(t), debiased=debiased), one_by_one, atol=1e-12)
    mixed = pair_ckas([s[0], s[1][:, :5]], [t[0], t[1]], debiased=debiased)
    assert torch.allclose(mixed, torch.stack([one_by_one[0], linear_cka(s[1][:, :5], t[1], debiased)]), atol=1e-12)
