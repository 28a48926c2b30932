"""Attention patterns (model.attention): the eager switch, the forward that returns attentions, and
batch-mean patterns by real-token index checked by hand on a tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from circuit_distill import tiny_model
from circuit_distill.errors import CircuitDistillError
from circuit_distill.model import load_model
from circuit_distill.model.attention import attention_patterns, eager_attention, forward_attentions
from circuit_distill.tasks import Example, build_task_data


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    model = load_model(tiny_model("llama", tmp_path_factory.mktemp("att") / "m", n_layers=2, n_heads=4,
                                  n_kv_heads=2, d_model=32, seed=3))
    rng = random.Random(1)
    prompts = [" ".join(f"w{rng.randrange(40)}" for _ in range(rng.randrange(2, 7))) for _ in range(7)]
    ex = [Example(p, " w1", wrong_answer=" w2") for p in prompts]
    return model, build_task_data("t", model.tokenizer, ex, prompts)


def test_eager_attention_switches_and_restores(model_and_data):
    model, _ = model_and_data
    before = model.hf.config._attn_implementation
    assert before != "eager"
    with eager_attention(model):
        assert model.hf.config._attn_implementation == "eager"
    assert model.hf.config._attn_implementation == before
    with pytest.raises(RuntimeError), eager_attention(model):  # restored on errors too
        raise RuntimeError("inside")
    assert model.hf.config._attn_implementation == before


def test_forward_attentions_shapes_and_rows(model_and_data):
    model, data = model_and_data
    b = data.clean
    with torch.no_grad(), eager_attention(model):
        atts = forward_attentions(model, b.input_ids, b.attention_mask)
    n, seq = b.input_ids.shape
    assert len(atts) == 2 and all(a.shape == (n, 4, seq, seq) for a in atts)
    real = b.attention_mask.bool()
    for a in atts:  # every real query row is a distribution over real keys only
        rows = a.sum(-1)[real[:, None, :].expand(n, 4, seq)]
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=1e-5)
        assert float(a.masked_select(~real[:, None, None, :]).abs().max()) < 1e-6
    with torch.no_grad(), pytest.raises(CircuitDistillError, match="no attention patterns"):  # SDPA: none
        forward_attentions(model, b.input_ids, b.attention_mask)


def test_attention_patterns_by_hand(model_and_data):
    model, data = model_and_data
    b = data.clean  # right padding: real-token index = position
    pats = attention_patterns(model, b.input_ids, b.attention_mask, layers=[1], batch_size=3)
    assert list(pats) == [1]
    lengths = b.attention_mask.sum(1)
    T = int(lengths.max())
    with torch.no_grad(), eager_attention(model):
        a = model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, output_attentions=True).attentions[1]
    hand = torch.zeros(4, T, T, dtype=torch.float64)
    for i in range(T):  # query row i: mean over the prompts that have an i-th token
        have = lengths > i
        hand[:, i] = a[have][:, :, i, :T].double().mean(0)
    assert pats[1].shape == (4, T, T) and pats[1].dtype == torch.float32
    torch.testing.assert_close(pats[1].double(), hand, atol=1e-5, rtol=1e-5)
    # the batch size only chunks the forwards
    whole = attention_patterns(model, b.input_ids, b.attention_mask, batch_size=64)
    torch.testing.assert_close(whole[1], pats[1], atol=1e-6, rtol=1e-6)
    assert list(whole) == [0, 1]
