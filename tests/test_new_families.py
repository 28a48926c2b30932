"""Gemma, Gemma 2, Gemma 3 (text), Phi-3 and OLMo 2: tiny random models built from configs, saved and
loaded through load_model, checked like the original families (self-check, capture against a hand
recomputation, zero ablation against zeroed weights, per-head parameter slices, the fast sweep)."""

from __future__ import annotations

import pytest
import torch

from circuit_distill import load_model, tiny_model
from circuit_distill.discovery import ablation_sweep
from circuit_distill.model import Component, capture, intervene
from circuit_distill.tasks import Batch, TaskData
from conftest import random_batch

NEW_FAMILIES = ("gemma", "gemma2", "gemma3_text", "phi3", "olmo2")


@pytest.fixture(scope="module")
def new_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("new-families")
    return {fam: tiny_model(fam, root / fam, seed=1, n_kv_heads=2) for fam in NEW_FAMILIES}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_load_and_self_check(new_dirs, family):
    m = load_model(new_dirs[family])
    assert m.arch.family.name == family
    assert m.self_check_error is not None and m.self_check_error < 1e-5
    assert (m.arch.n_layers, m.arch.n_heads, m.arch.n_kv_heads, m.arch.d_head) == (2, 4, 2, 16)
    assert m(torch.tensor([[5, 6, 7]])).shape == (1, 3, len(m.tokenizer))


def test_gemma_tiny_models_use_sliding_and_full_attention(new_dirs):
    for family in ("gemma2", "gemma3_text"):
        cfg = load_model(new_dirs[family]).hf.config
        assert cfg.layer_types == ["sliding_attention", "full_attention"] and cfg.sliding_window == 4
    assert load_model(new_dirs["gemma2"]).hf.config.final_logit_softcapping  # exercised by answer_logits


def _v_of(m, layer: int, head: int, x: torch.Tensor) -> torch.Tensor:
    """The head's values from its value-weight slice (bias if any), whatever the qkv layout."""
    out = None
    for s in m.arch.head_slices(layer, head).v:
        t = s.of(m.hf)
        out = out + t if s.name.endswith("bias") else x @ t.t()
    return out


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_capture_equals_hand_recomputation(new_dirs, family):
    """z_h = attention probabilities @ V of the head's KV group (the fused Phi-3 slices included)."""
    m = load_model(new_dirs[family], attn_implementation="eager")
    ids = random_batch(len(m.tokenizer), batch=2, seq=7)  # longer than the sliding window (4)
    seen = {}
    for layer in range(2):
        h = m.arch.attn(m.hf, layer).register_forward_pre_hook(
            lambda mod, a, kw, layer=layer: seen.__setitem__(layer, a[0] if a else kw["hidden_states"]),
            with_kwargs=True)
        try:
            with torch.no_grad(), capture(m, m.components("head")) as cap:
                out = m.hf(input_ids=ids, output_attentions=True)
        finally:
            h.remove()
        for head in range(4):
            z = out.attentions[layer][:, head] @ _v_of(m, layer, head, seen[layer])
            torch.testing.assert_close(cap[f"L{layer}.H{head}"], z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_zero_ablation_equals_zeroed_output_columns(new_dirs, family):
    m, ref = load_model(new_dirs[family]), load_model(new_dirs[family])
    ids = random_batch(len(m.tokenizer))
    comp = Component(1, "head", 3)
    with torch.no_grad():
        for s in ref.arch.head_slices(1, 3).o:
            s.of(ref.hf).zero_()
        with intervene(m, {comp: "zero"}):
            got = m(ids)
        torch.testing.assert_close(got, ref(ids), atol=1e-5, rtol=0)
        assert not torch.allclose(got, m(ids), atol=1e-4)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_query_slice_moves_one_head_and_kv_slices_their_group(new_dirs, family):
    m = load_model(new_dirs[family])
    ids = random_batch(len(m.tokenizer))

    def heads_changed(slices) -> set[int]:
        with torch.no_grad(), capture(m, m.components("head")) as cap:
            m(ids)
            before = {c: cap[c].clone() for c in cap}
            saved = [(s, s.of(m.hf).clone()) for s in slices]
            for s, _ in saved:
                s.of(m.hf).add_(torch.randn_like(s.of(m.hf)))
            m(ids)
            changed = {c.head for c in cap if c.layer == 1 and not torch.allclose(cap[c], before[c], atol=1e-6)}
            for s, t in saved:
                s.of(m.hf).copy_(t)
        return changed

    sl = m.arch.head_slices(1, 3)
    assert heads_changed(sl.v) == {2, 3}  # heads 2 and 3 share KV group 1
    # OLMo 2 norms all queries together and all keys together, so those slices move every head
    every = {0, 1, 2, 3}
    assert heads_changed(sl.k) == (every if family == "olmo2" else {2, 3})
    assert heads_changed(sl.q) == (every if family == "olmo2" else {3})


def _random_task(vocab: int, n: int = 6, seq: int = 9) -> TaskData:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    clean = Batch(ids * mask, mask)
    ref = Batch(torch.randint(4, vocab, (n, seq), generator=g), torch.ones_like(ids))
    answers = torch.randint(4, vocab, (n,), generator=g)
    return TaskData("random", clean, answers, torch.randint(4, vocab, (n,), generator=g), clean, ref,
                    {"last": clean.last})


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_fast_sweep_equals_naive_loop(new_dirs, family):
    m = load_model(new_dirs[family])
    td = _random_task(len(m.tokenizer))
    if family == "gemma2":  # soft-capped logits: the fast sweep's unembedding caps them too
        m.hf.config.final_logit_softcapping = 0.05  # tiny random logits are too small for the cap of 30 to show
    naive = ablation_sweep(m, td, method="mean", fast=False, progress=False)
    fast = ablation_sweep(m, td, method="mean", progress=False)
    diff = max(abs(fast.ablated[c][k] - naive.ablated[c][k]) for c in naive.ablated for k in naive.clean)
    assert diff < 1e-5
    if family == "gemma2":  # the cap changes the metrics, so the agreement above covers the capping
        m.hf.config.final_logit_softcapping = None
        uncapped = ablation_sweep(m, td, method="mean", progress=False)
        assert abs(uncapped.clean["logit_diff"] - fast.clean["logit_diff"]) > 1e-3
