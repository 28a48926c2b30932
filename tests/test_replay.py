"""The layer-replay engine and discovery's small public helpers, on tiny random models."""

from __future__ import annotations

import pytest
import torch

from circuit_distill.discovery import (
    FINAL_NORMS,
    LayerReplay,
    ablatable_components,
    find_final_norm,
    metric_means,
    progress_bar,
    replay_items,
    stacked_replacement,
)
from circuit_distill.errors import CircuitDistillError, ComponentError, FastSweepUnsupported
from circuit_distill.model import Component, intervene, load_model, tiny_model
from circuit_distill.model.activations import forward_logits
from circuit_distill.tasks import Batch, TaskData, final_logits, per_example, summarise

FAMILIES = {"llama": {"n_kv_heads": 2}, "gpt2": {}, "gpt_neox": {}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    return {fam: load_model(tiny_model(fam, root / fam, seed=4, n_layers=3, **kw)) for fam, kw in FAMILIES.items()}


def _batch(vocab: int, n: int = 5, seq: int = 9, seed: int = 0, padding_side: str = "right") -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    for i, length in enumerate(torch.randint(seq // 2, seq + 1, (n,), generator=g).tolist()):
        pad = slice(length, None) if padding_side == "right" else slice(None, seq - length)
        mask[i, pad] = 0
        ids[i, pad] = 0
    return Batch(ids, mask, padding_side)


def _plain(model, batch: Batch, pos: torch.Tensor, repl=None) -> torch.Tensor:
    """Final logits ``[n, vocab]`` of an ordinary forward (with ``repl`` patched in by ``intervene``)."""
    with torch.no_grad(), intervene(model, repl or {}):
        return final_logits(forward_logits(model, batch.input_ids, batch.attention_mask), pos).float()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_layer_replay_reproduces_the_plain_forward(models, family, padding_side):
    model = models[family]
    b = _batch(model.hf.config.vocab_size, padding_side=padding_side)
    pos = b.last
    plain = _plain(model, b, pos)
    replay = LayerReplay(model, b, pos)
    # the recording run is the plain forward (unembedded at the positions only: equal to float rounding)
    torch.testing.assert_close(replay.logits, plain, atol=1e-6, rtol=1e-6)
    for layer in range(model.arch.n_layers):
        h = replay.hidden(layer)
        assert h.shape == (len(b), b.input_ids.shape[1], model.arch.d_model)
        torch.testing.assert_close(replay.logits_from(layer, h), plain, atol=1e-5, rtol=1e-5)
        stacked = replay.logits_from(layer, h.repeat(3, 1, 1))  # three copies, copy-major
        assert stacked.shape == (3 * len(b), plain.shape[-1])
        for j in range(3):
            torch.testing.assert_close(stacked[j * len(b):(j + 1) * len(b)], plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_find_final_norm_is_the_norm_before_the_unembedding(models, family):
    model = models[family]
    norm = find_final_norm(model.hf)
    assert isinstance(norm, torch.nn.Module)
    base = model.hf.base_model
    assert any(getattr(base, name, None) is norm for name in FINAL_NORMS)
    with pytest.raises(FastSweepUnsupported, match="fast=False"):
        find_final_norm(torch.nn.Linear(2, 2))


def test_stacked_replacement_gives_each_copy_its_own_replacement(models):
    model = models["llama"]
    b = _batch(model.hf.config.vocab_size, seed=1)
    n, seq, pos = len(b), b.input_ids.shape[1], b.last
    g = torch.Generator().manual_seed(0)
    head, mlp = Component(1, "head", 2), Component(1, "mlp")
    vh = torch.randn(n, seq, model.arch.d_head, generator=g)
    vm = torch.randn(n, seq, model.arch.d_model, generator=g)
    replay = LayerReplay(model, b, pos)
    h = replay.hidden(1).repeat(3, 1, 1)
    with stacked_replacement(model, 1, [(head, vh), (mlp, vm)], n):
        out = replay.logits_from(1, h)
    torch.testing.assert_close(out[:n], _plain(model, b, pos, {head: vh}), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[n:2 * n], _plain(model, b, pos, {mlp: vm}), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2 * n:], replay.logits, atol=1e-5, rtol=1e-5)  # beyond the items: unchanged
    # the hooks are gone afterwards
    torch.testing.assert_close(replay.logits_from(1, replay.hidden(1)), replay.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ComponentError, match="layer 0"):
        with stacked_replacement(model, 0, [(head, vh)], n):
            pass


def test_replay_items_match_single_interventions_and_count_cost(models):
    model = models["gpt2"]
    b = _batch(model.hf.config.vocab_size, n=4, seed=2)
    n, seq, pos = len(b), b.input_ids.shape[1], b.last
    g = torch.Generator().manual_seed(1)
    comps = [Component(0, "head", 1), Component(2, "mlp"), Component(0, "mlp"), Component(2, "head", 3)]
    vals = {c: torch.randn(n, seq, model.arch.d_head if c.is_head else model.arch.d_model, generator=g)
            for c in comps}
    calls = []

    def value(c):
        calls.append(c)
        return vals[c]

    replay = LayerReplay(model, b, pos)
    outs, cost = replay_items(model, replay, [(c, lambda c=c: value(c)) for c in comps], batch_size=8)
    assert sorted(calls) == sorted(comps)  # each value built once
    for c, o in zip(comps, outs):
        assert o.device.type == "cpu" and o.shape == (n, model.hf.config.vocab_size)
        torch.testing.assert_close(o, _plain(model, b, pos, {c: vals[c]}).cpu(), atol=1e-5, rtol=1e-5)
    # batch_size 8 = two copies of 4 rows per forward; layer 0 re-runs 3/3 layers, layer 2 re-runs 1/3
    assert cost == pytest.approx(2 * 3 / 3 + 2 * 1 / 3)


def test_ablatable_components(models):
    model = models["llama"]
    every = ablatable_components(model)
    assert every == sorted(model.components("head") + model.components("mlp"))
    assert ablatable_components(model, ["L2.MLP", "L0.H1", Component(0, "head", 1)]) == [
        Component(0, "head", 1), Component(2, "mlp")]
    with pytest.raises(ComponentError, match="only heads and MLPs"):
        ablatable_components(model, ["L0.RESID_PRE"])
    with pytest.raises(ComponentError):
        ablatable_components(model, ["L7.H0"])  # no layer 7


def test_metric_means_and_progress_bar():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g)
    ids = Batch(torch.zeros(6, 3, dtype=torch.long), torch.ones(6, 3, dtype=torch.long))
    wrong = torch.tensor([1, 2, -1, 3, 4, -1])
    td = TaskData("t", ids, torch.tensor([0, 1, 2, 3, 4, 5]), wrong, ids, ids, {"last": torch.full((6,), 2)})
    want = summarise(per_example(logits, td.answer_ids, wrong))
    got = metric_means(logits, td, ("logit_diff", "answer_prob"))
    assert list(got) == ["logit_diff", "answer_prob"]
    assert got == {"logit_diff": want["logit_diff"], "answer_prob": want["answer_prob"]}
    assert got["logit_diff"] == pytest.approx(float((logits[[0, 1, 3, 4], [0, 1, 3, 4]]
                                                      - logits[[0, 1, 3, 4], [1, 2, 3, 4]]).mean()))
    with pytest.raises(CircuitDistillError, match="available"):
        metric_means(logits, td, ("nope",))
    for progress, total, shown in ((None, 31, False), (None, 32, True), (False, 100, False), (True, 1, True)):
        bar = progress_bar(progress, total, "x")
        assert bar.disable is (not shown) and bar.total == total
        bar.close()
