"""Activation, path and attribution patching on tiny random models (no training)."""

from __future__ import annotations

import pytest
import torch

from circuit_distill.discovery import (
    activation_patching,
    attribution_patching,
    patched_metric,
    path_patching,
)
from circuit_distill.errors import CircuitDistillError
from circuit_distill.model import Component, capture, load_model, tiny_model
from circuit_distill.tasks import Batch, TaskData


def _task(vocab: int, n: int = 8, seq: int = 10, seed: int = 0) -> TaskData:
    """Random prompts; the corrupted prompt differs from the clean one at every position but the last."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    lens = torch.randint(seq - 3, seq + 1, (n,), generator=g)
    for i, length in enumerate(lens.tolist()):
        mask[i, length:] = 0
        ids[i, length:] = 0
    corr = torch.randint(4, vocab, (n, seq), generator=g) * mask
    clean = Batch(ids, mask)
    last = clean.last
    corr[torch.arange(n), last] = ids[torch.arange(n), last]
    ref = torch.randint(4, vocab, (n, seq), generator=g)
    return TaskData("random", clean, torch.randint(4, vocab, (n,), generator=g),
                    torch.randint(4, vocab, (n,), generator=g), Batch(corr, mask.clone()),
                    Batch(ref, torch.ones_like(ref)), {"last": last})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("patching")
    out = {}
    for fam, kw in {"llama": {"n_kv_heads": 2}, "gpt2": {}, "gpt_neox": {}}.items():
        out[fam] = load_model(tiny_model(fam, root / fam, seed=3, n_layers=3, **kw))
    return out


def _all(model) -> list[Component]:
    return model.components("head") + model.components("mlp")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_patching_everything_clean_into_corrupted_recovers_clean(models, family):
    model = models[family]
    td = _task(model.hf.config.vocab_size)
    with torch.no_grad(), capture(model, _all(model)) as cap:
        model(td.clean.input_ids, td.clean.attention_mask)
        clean_acts = {c: cap[c].clone() for c in _all(model)}
    res = activation_patching(model, td, direction="clean_to_corrupted", progress=False)
    assert abs(res.clean - res.corrupted) > 1e-3  # the corruption matters
    # every head and MLP patched together: the last position (same token) sees only clean outputs
    assert patched_metric(model, td, clean_acts, run="corrupted") == pytest.approx(res.clean, abs=1e-4)
    # and a last-layer component patched alone scores the same as a full forward with intervene
    for c in (Component(2, "head", 1), Component(2, "mlp"), Component(0, "head", 0)):
        assert res.patched[c] == pytest.approx(patched_metric(model, td, {c: clean_acts[c]}, run="corrupted"),
                                               abs=1e-5)


def test_noising_direction_and_scores(models):
    model = models["llama"]
    td = _task(model.hf.config.vocab_size, seed=1)
    with torch.no_grad(), capture(model, _all(model)) as cap:
        model(td.corrupted.input_ids, td.corrupted.attention_mask)
        corr_acts = {c: cap[c].clone() for c in _all(model)}
    res = activation_patching(model, td, direction="corrupted_to_clean", progress=False)
    for c in _all(model):
        assert res.patched[c] == pytest.approx(patched_metric(model, td, {c: corr_acts[c]}), abs=1e-5)
    s = res.scores()
    gap = res.clean - res.corrupted
    c = Component(1, "head", 2)
    assert s[c] == pytest.approx((res.clean - res.patched[c]) / gap)
    with pytest.raises(CircuitDistillError, match="direction"):
        activation_patching(model, td, direction="sideways")


def test_per_position_patching_matches_single_position_intervention(models):
    model = models["gpt2"]
    td = _task(model.hf.config.vocab_size, n=4, seq=6, seed=2)
    comps = [Component(1, "head", 0), Component(0, "mlp")]
    res = activation_patching(model, td, comps, direction="clean_to_corrupted", per_position=True, progress=False)
    with torch.no_grad(), capture(model, comps) as cap:
        model(td.clean.input_ids, td.clean.attention_mask)
        clean = {c: cap[c].clone() for c in comps}
        model(td.corrupted.input_ids, td.corrupted.attention_mask)
        corr = {c: cap[c].clone() for c in comps}
    for c in comps:
        assert res.patched[c].shape == (6,)
        for p in (0, 3, 5):
            v = corr[c].clone()
            v[:, p] = clean[c][:, p]
            assert float(res.patched[c][p]) == pytest.approx(patched_metric(model, td, {c: v}, run="corrupted"),
                                                             abs=1e-5)


def test_path_patching_direct_effect_of_last_mlp_is_its_patching_effect(models):
    model = models["llama"]
    td = _task(model.hf.config.vocab_size, seed=4)
    last_mlp = Component(2, "mlp")
    pp = path_patching(model, td, [last_mlp, Component(2, "head", 0)], progress=False)
    act = activation_patching(model, td, [last_mlp], direction="corrupted_to_clean", progress=False)
    assert pp.clean == pytest.approx(act.clean, abs=1e-5)
    assert pp.patched[last_mlp] == pytest.approx(act.patched[last_mlp], abs=1e-5)
    # a layer-2 head reaches the logits directly and through L2.MLP; its direct path alone differs
    via = path_patching(model, td, [Component(2, "head", 0), Component(0, "head", 0)], [last_mlp], progress=False)
    full = activation_patching(model, td, [Component(2, "head", 0)], direction="corrupted_to_clean", progress=False)
    direct_plus_mlp = (pp.effect()[Component(2, "head", 0)] + via.effect()[Component(2, "head", 0)])
    assert direct_plus_mlp == pytest.approx(full.clean - full.patched[Component(2, "head", 0)], rel=0.3, abs=0.02)
    # no path: a sender after every receiver has no effect
    none = path_patching(model, td, [Component(2, "head", 1)], [Component(1, "head", 0)], progress=False)
    assert none.effect()[Component(2, "head", 1)] == 0.0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attribution_patching_correlates_with_activation_patching(models, family):
    model = models[family]
    td = _task(model.hf.config.vocab_size, n=16, seed=5)
    comps = _all(model)
    attr = attribution_patching(model, td, comps, metric="logit_diff")
    exact = activation_patching(model, td, comps, direction="corrupted_to_clean", progress=False)
    x = torch.tensor([attr.scores[c] for c in comps])
    y = torch.tensor([exact.patched[c] - exact.clean for c in comps])
    r = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    print(f"{family}: Pearson r(attribution, activation patching) = {r:.3f} over {len(comps)} components")
    assert r > 0.9, f"attribution patching correlates poorly with exact patching: r = {r:.3f}"
    assert attr.clean == pytest.approx(exact.clean, abs=1e-4)
    assert set(attr.per_position) == set(comps) and attr.per_position[comps[0]].shape == (10,)
    # the parameters' requires_grad flags are restored
    assert all(p.requires_grad for p in model.hf.parameters())
