"""Trainable subsets: exact counts by hand (GQA Llama, GPT-2) and frozen weights bit-identical under AdamW."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from circuit_distill import Component, capture, load_model, tiny_model
from circuit_distill.distill.trainable import set_trainable
from circuit_distill.errors import ConfigError

D, H, KV, DH = 64, 4, 2, 16  # tiny models: d_model, query heads, KV heads (Llama), head width


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("trainable") / "llama", n_heads=H, n_kv_heads=KV, d_model=D,
                      seed=3)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return tiny_model("gpt2", tmp_path_factory.mktemp("trainable") / "gpt2", n_heads=H, d_model=D, seed=3)


def _llama_total(vocab: int) -> int:
    attn = D * D + 2 * (KV * DH * D) + D * D  # q, k, v, o (no biases)
    mlp = 3 * D * 4 * D  # gate, up, down
    return 2 * vocab * D + 2 * (attn + mlp + 2 * D) + D  # embed + lm_head + 2 blocks (+2 norms) + final norm


HEADS = [Component(0, "head", 0), Component(0, "head", 1), Component(1, "head", 3)]


def test_counts_by_hand_llama_gqa(llama_dir):
    m = load_model(llama_dir)
    vocab = m.hf.config.vocab_size
    per_head = DH * D + D * DH  # q rows + o columns
    per_group = 2 * DH * D  # k rows + v rows of one KV group
    info = set_trainable(m, "matched_heads", HEADS)
    assert info.count == 3 * per_head == 6144
    assert info.total == _llama_total(vocab) == m.n_params
    assert info.fraction == pytest.approx(6144 / info.total)
    assert info.attention_total == 2 * (2 * D * D + 2 * KV * DH * D) == 24576
    # L0.H0 and L0.H1 share KV group 0 of layer 0: counted once; L1.H3 -> group 1 of layer 1
    info_kv = set_trainable(m, "matched_heads", HEADS, train_kv=True)
    assert info_kv.count == 3 * per_head + 2 * per_group == 10240
    assert set_trainable(m, "matched_heads", ["L0.H0", "L0.H1"], train_kv=True).count == 2 * per_head + per_group
    assert set_trainable(m, "attention").count == 24576
    assert set_trainable(m, "all").count == m.n_params
    assert sum(p.numel() for p in m.hf.parameters() if p.requires_grad) == m.n_params
    info = set_trainable(m, "matched_heads", HEADS)
    assert sum(int(p.requires_grad) for p in m.hf.parameters()) == 4  # q_proj and o_proj of layers 0 and 1
    mask = info.masks["model.layers.0.self_attn.q_proj.weight"]
    assert mask[: 2 * DH].all() and not mask[2 * DH:].any()
    omask = info.masks["model.layers.1.self_attn.o_proj.weight"]
    assert omask[:, 3 * DH:].all() and not omask[:, : 3 * DH].any()
    assert info.to_dict()["trainable_params"] == 6144


def test_counts_by_hand_gpt2(gpt2_dir):
    m = load_model(gpt2_dir)
    q = D * DH + DH  # Conv1D c_attn columns + their bias entries
    o = DH * D  # c_proj rows (Conv1D stores [in, out]); the output bias is shared, not counted
    assert set_trainable(m, "matched_heads", ["L1.H2"]).count == q + o
    assert set_trainable(m, "matched_heads", ["L1.H2"], train_kv=True).count == 3 * q + o
    attn = (D * 3 * D + 3 * D) + (D * D + D)
    assert set_trainable(m, "attention").count == 2 * attn


def test_errors(llama_dir):
    m = load_model(llama_dir)
    with pytest.raises(ConfigError, match="heads"):
        set_trainable(m, "matched_heads")
    with pytest.raises(ConfigError, match="attention heads"):
        set_trainable(m, "matched_heads", ["L0.MLP"])
    with pytest.raises(ConfigError, match="one of"):
        set_trainable(m, "some")
    with pytest.raises(Exception, match="out of range"):
        set_trainable(m, "matched_heads", ["L0.H9"])


def _adamw_steps(m, info, attach: bool, steps: int = 3, all_params: bool = False):
    params = list(m.hf.parameters()) if all_params else info.parameters()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if attach:
        info.attach(opt)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, m.hf.config.vocab_size, (4, 6), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        logits = m(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()


@pytest.mark.parametrize("family,train_kv,all_params", [("llama", False, False), ("llama", True, True),
                                                        ("gpt2", True, False)])
def test_frozen_weights_bit_identical_under_adamw(llama_dir, gpt2_dir, family, train_kv, all_params):
    m = load_model(llama_dir if family == "llama" else gpt2_dir)
    before = {n: p.detach().clone() for n, p in m.hf.named_parameters()}
    info = set_trainable(m, "matched_heads", HEADS, train_kv=train_kv)
    _adamw_steps(m, info, attach=True, all_params=all_params)
    changed_entries = 0
    for n, p in m.hf.named_parameters():
        if n not in info.masks:
            assert torch.equal(p, before[n]), n
            continue
        mask = info.masks[n]
        if mask is None:
            assert not torch.equal(p, before[n]), n
            changed_entries += p.numel()
            continue
        assert torch.equal(p[~mask], before[n][~mask]), n  # bit for bit
        assert (p[mask] != before[n][mask]).float().mean() > 0.9, n  # the slices really train
        changed_entries += int(mask.sum())
    assert changed_entries == info.count
    assert info.max_frozen_change() == 0.0


def test_without_restore_weight_decay_would_move_frozen_entries(llama_dir):
    m = load_model(llama_dir)
    info = set_trainable(m, "matched_heads", HEADS)
    _adamw_steps(m, info, attach=False, steps=2)
    assert info.max_frozen_change() > 0  # the gradient mask alone does not freeze under AdamW
    info.restore_frozen()
    assert info.max_frozen_change() == 0.0


def test_gradient_mask_zeroes_outside_slices(llama_dir):
    m = load_model(llama_dir)
    info = set_trainable(m, "matched_heads", ["L1.H2"])
    ids = torch.randint(4, m.hf.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    m(ids).pow(2).mean().backward()
    for n, p in info.named_parameters():
        mask = info.masks[n]
        assert p.grad[~mask].eq(0).all() and p.grad[mask].ne(0).any()
    assert all(p.grad is None for n, p in m.hf.named_parameters() if n not in info.masks)
    # a second call replaces the first: the old mask (head 2) must not zero head 0's gradient
    info2 = set_trainable(m, "matched_heads", ["L1.H0"])
    m.hf.zero_grad(set_to_none=True)
    m(ids).pow(2).mean().backward()
    g = m.hf.get_parameter("model.layers.1.self_attn.q_proj.weight").grad
    assert g[:DH].ne(0).any() and g[DH:].eq(0).all()
    assert info2.masks["model.layers.1.self_attn.q_proj.weight"][:DH].all()


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed (optional extra)")
def test_lora(llama_dir):
    m = load_model(llama_dir)
    base = m.n_params
    info = set_trainable(m, "lora", ["L1.H0"], lora_r=4)
    # q_proj and o_proj of layer 1, each 64 -> 64: A [4, 64] + B [64, 4]
    assert info.count == 2 * (4 * D + D * 4)
    assert info.total == base + info.count
    assert all(("lora_" in n) == p.requires_grad for n, p in m.hf.named_parameters())
    ids = torch.randint(4, m.hf.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with capture(m, ["L1.H0"]) as cap:  # module paths unchanged: hooks still work
        m(ids).sum().backward()
    assert cap["L1.H0"].shape == (2, 5, DH)
    assert all(p.grad is not None for p in info.parameters())


def test_lora_without_peft_says_how_to_install(llama_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake(name, *a, **kw):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("no peft")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ConfigError, match=r"pip install 'circuit-distill\[peft\]'"):
        set_trainable(load_model(llama_dir), "lora", ["L0.H0"])


def test_alignment_training_end_to_end(llama_dir, tmp_path):
    """capture -> select_rows('all') -> align_cka objective -> masked AdamW: CKA rises, frozen entries stay."""
    from circuit_distill.distill.objectives import objective_loss
    from circuit_distill.tasks.positions import select_rows

    student = load_model(llama_dir)
    teacher = load_model(tiny_model("llama", tmp_path / "teacher", n_heads=4, n_kv_heads=2, d_model=96, seed=5))
    pairs = [(Component(1, "head", 0), Component(1, "head", 2)), (Component(1, "head", 3), Component(0, "head", 1))]
    before = {n: p.detach().clone() for n, p in student.hf.named_parameters()}
    info = set_trainable(student, "matched_heads", [s for s, _ in pairs], train_kv=True)
    opt = torch.optim.AdamW(info.parameters(), lr=3e-2, weight_decay=0.1)
    info.attach(opt)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, student.hf.config.vocab_size, (8, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[:3, 4:] = 0  # some right padding
    with torch.no_grad(), capture(teacher, [t for _, t in pairs]) as tcap:
        teacher(ids, mask)
    tfeats = [select_rows(tcap[t], mask, "all") for _, t in pairs]
    ckas = []
    for _ in range(10):
        opt.zero_grad()
        with capture(student, [s for s, _ in pairs]) as scap:
            student(ids, mask)
        sfeats = [select_rows(scap[s], mask, "all") for s, _ in pairs]
        assert sfeats[0].shape == (8 * 6 - 6, DH) and tfeats[0].shape == (42, 24)
        total, parts = objective_loss("align_cka", student_feats=sfeats, teacher_feats=tfeats)
        ckas.append(float(parts["cka"]))
        total.backward()
        opt.step()
    assert ckas[-1] > ckas[0] + 0.1, ckas
    for n, p in student.hf.named_parameters():
        if n in info.masks and info.masks[n] is None:  # layer-1 k/v: both KV groups selected, whole weight
            assert n.startswith("model.layers.1.") and not torch.equal(p, before[n]), n
            continue
        m = info.masks.get(n, torch.zeros(p.shape, dtype=torch.bool))
        assert torch.equal(p[~m], before[n][~m]), n
