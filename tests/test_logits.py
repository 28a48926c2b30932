"""answer_logits: logits at chosen positions only, equal to the full logits there, for every family
(soft-capped Gemma 2 included), padded rows, several positions per row, with gradients; evaluate uses it."""

from __future__ import annotations

import pytest
import torch

from circuit_distill import load_model, tiny_model
from circuit_distill.model.logits import answer_logits, select_positions
from circuit_distill.tasks import evaluate, make_task, per_example, summarise
from conftest import FAMILY_KW

FAMILIES = {**FAMILY_KW, **{f: {"n_kv_heads": 2} for f in ("gemma", "gemma2", "gemma3_text", "phi3", "olmo2")}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("logits")
    return {f: load_model(tiny_model(f, root / f, seed=3, **kw)) for f, kw in FAMILIES.items()}


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a right-padded row
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_answer_logits_equal_full_logits(models, family):
    m = models[family]
    ids, mask = _batch(len(m.tokenizer))
    with torch.no_grad():
        full = m(ids, mask, use_cache=False)
        for pos in (torch.tensor([8, 4, 0, 6]), torch.tensor([[8, 2], [4, 3], [0, 1], [6, 7]])):
            got = answer_logits(m, ids, mask, pos)
            assert got.shape == pos.shape + (full.shape[-1],)
            torch.testing.assert_close(got, select_positions(full, pos), atol=1e-5, rtol=1e-5)


def test_soft_capping_is_applied(models):
    m = models["gemma2"]
    ids, mask = _batch(len(m.tokenizer))
    pos = torch.tensor([8, 4, 0, 6])
    m.hf.config.final_logit_softcapping = 0.05  # small enough to matter on a tiny random model
    try:
        with torch.no_grad():
            got = answer_logits(m, ids, mask, pos)
            torch.testing.assert_close(got, select_positions(m(ids, mask), pos), atol=1e-6, rtol=1e-5)
        assert got.abs().max() <= 0.05
    finally:
        m.hf.config.final_logit_softcapping = 30.0


def test_gradients_match_the_full_logits_path(models):
    m = models["llama"]
    ids, mask = _batch(len(m.tokenizer))
    pos, target = torch.tensor([8, 4, 0, 6]), torch.tensor([5, 6, 7, 8])
    grads = []
    for logits_of in (lambda: answer_logits(m, ids, mask, pos), lambda: select_positions(m(ids, mask), pos)):
        m.hf.zero_grad()
        torch.nn.functional.cross_entropy(logits_of(), target).backward()
        grads.append(m.hf.get_submodule("model.layers.0.self_attn.q_proj").weight.grad.clone())
    m.hf.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_encoders_fall_back_to_the_full_logits(tiny_bert_dir):
    m = load_model(tiny_bert_dir)
    ids = torch.randint(4, len(m.tokenizer), (2, 6))
    mask = torch.ones_like(ids)
    pos = torch.tensor([3, 5])
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(m, ids, mask, pos), select_positions(m(ids, mask), pos))


def test_evaluate_equals_the_full_logits_metrics():
    m = load_model("builtin:entity-tracking-teacher")
    td = make_task("entity_tracking", m.tokenizer, 40, seed=5, n_boxes=3)
    with torch.no_grad():
        full = select_positions(m(td.clean.input_ids, td.clean.attention_mask), td.positions["last"])
    expected = summarise(per_example(full.float(), td.answer_ids, td.wrong_ids))
    got = evaluate(m, td, batch_size=16)
    assert got.keys() == expected.keys()
    for k in got:
        assert got[k] == pytest.approx(expected[k], abs=1e-6)
