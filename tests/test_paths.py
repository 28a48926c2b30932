"""Layer-by-layer path patching through queries or keys/values (discovery.paths) against full forwards with
hooks that freeze everything off the path, on tiny Llama and Gemma 3 models (GQA/MQA, Gemma's norms after
attention); the direct path equals discovery.path_patching's."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from circuit_distill import tiny_model
from circuit_distill.discovery import path_patching
from circuit_distill.discovery.paths import path_scores
from circuit_distill.errors import CircuitDistillError
from circuit_distill.model import load_model
from circuit_distill.model.components import Component
from circuit_distill.tasks import make_task, task_vocabulary
from circuit_distill.tasks.metrics import final_logits, per_example, summarise

H = Component.make_head


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def setup(request, tmp_path_factory):
    kw = {"n_kv_heads": 2} if request.param == "llama" else {"n_kv_heads": 1}
    d = tiny_model(request.param, tmp_path_factory.mktemp(request.param), n_layers=3, n_heads=4, d_model=32,
                   words=task_vocabulary("entity_tracking"), seed=4, **kw)
    model = load_model(d)
    td = make_task("entity_tracking", model.tokenizer, 6, seed=0, n_boxes=3)
    return model, td


def _module(model, layer, part):
    f = model.arch.family
    rel = {"q": f.q_proj, "k": f.k_proj, "v": f.v_proj, "z": f.o_proj, "mlp": f.mlp}[part]
    return model.hf.get_submodule(model.arch.module_name(layer, rel))


def _capture(model, batch):
    acts = {p: {} for p in ("q", "k", "v", "z", "mlp")}
    with ExitStack() as st:
        for layer in range(model.arch.n_layers):
            for p in ("q", "k", "v", "mlp"):
                h = _module(model, layer, p).register_forward_hook(
                    lambda m, a, o, p=p, layer=layer: acts[p].__setitem__(layer, o.detach()))
                st.callback(h.remove)
            h = _module(model, layer, "z").register_forward_pre_hook(
                lambda m, a, layer=layer: acts["z"].__setitem__(layer, a[0].detach()))
            st.callback(h.remove)
        with torch.no_grad():
            model(batch.input_ids, batch.attention_mask)
    return acts


def _frozen_forward(model, td, clean, set_z, frozen_proj, capture_heads=()):
    """A full forward on the clean prompts where every head output is clean except ``set_z`` (``(layer,
    head) -> z``) and every MLP clean; what ``capture_heads`` would compute there (with the projections in
    ``frozen_proj[layer]`` clean) is recorded, their outputs stay frozen (Wang et al.'s path patching).
    Returns the LD and the captured z."""
    dh = model.arch.d_head
    got = {}
    with ExitStack() as st:
        for layer in range(model.arch.n_layers):
            def pre(m, a, layer=layer):
                z = a[0].clone()
                got[layer] = z.clone()
                for h in range(model.arch.n_heads):
                    sl = slice(h * dh, (h + 1) * dh)
                    z[..., sl] = set_z[(layer, h)][..., sl] if (layer, h) in set_z else clean["z"][layer][..., sl]
                return (z,)
            st.callback(_module(model, layer, "z").register_forward_pre_hook(pre).remove)
            for p in ["mlp"] + list(frozen_proj.get(layer, ())):
                st.callback(_module(model, layer, p).register_forward_hook(
                    lambda m, a, o, p=p, layer=layer: clean[p][layer]).remove)
        with torch.no_grad():
            logits = model(td.clean.input_ids, td.clean.attention_mask)
    ld = summarise(per_example(final_logits(logits, td.position("last")), td.answer_ids, td.wrong_ids))["logit_diff"]
    return ld, {c: got[c.layer] for c in capture_heads}


def _reference(model, td, sender, hops):
    """The path metric by full forwards: each hop's receivers recomputed with everything else frozen."""
    clean, corrupt = _capture(model, td.clean), _capture(model, td.corrupted)
    set_z = {(sender.layer, sender.head): corrupt["z"][sender.layer]}
    frozen = {"q": ("k", "v"), "kv": ("q",), "qkv": ()}
    for receivers, route in hops:
        live = {(r.layer, r.head) for r in receivers if r.layer > min(layer for layer, _ in set_z)}
        _, z = _frozen_forward(model, td, clean, set_z, {r.layer: frozen[route] for r in receivers},
                               [r for r in receivers if (r.layer, r.head) in live])
        set_z = {(r.layer, r.head): z[r] for r in receivers if (r.layer, r.head) in live}
    return _frozen_forward(model, td, clean, set_z, {})[0]


def test_direct_path_equals_path_patching(setup):
    model, td = setup
    heads = model.components("head")
    ours = path_scores(model, td, heads, batch_size=12)
    theirs = path_patching(model, td, heads, None, progress=False)
    assert ours.clean == pytest.approx(theirs.clean, abs=1e-4)
    assert ours.corrupted == pytest.approx(theirs.corrupted, abs=1e-4)
    for c in heads:
        assert ours.patched[c] == pytest.approx(theirs.patched[c], abs=1e-4), c
    assert ours.forwards < 3 + len(heads)


@pytest.mark.parametrize("route", ["q", "kv", "qkv"])
def test_one_and_two_hops_equal_frozen_full_forwards(setup, route):
    model, td = setup
    senders = [H(0, 1), H(0, 3), H(1, 2)]
    hop1 = ([H(1, 0), H(2, 1), H(2, 2)], route)
    hop2 = ([H(2, 0), H(2, 3)], "q")
    one = path_scores(model, td, senders, [hop1], batch_size=12)
    two = path_scores(model, td, senders, [hop1, hop2], batch_size=12)
    for s in senders:
        assert one.patched[s] == pytest.approx(_reference(model, td, s, [hop1]), abs=1e-4), (s, route)
        assert two.patched[s] == pytest.approx(_reference(model, td, s, [hop1, hop2]), abs=1e-4), (s, route)
    # a sender in the last layer has no path to later receivers: the clean metric
    assert path_scores(model, td, [H(2, 0)], [hop1]).patched[H(2, 0)] == pytest.approx(one.clean, abs=1e-5)


def test_sender_positions_and_errors(setup):
    model, td = setup
    # patched only where clean and corrupted prompts agree (the context before the query label): no effect
    obj = path_scores(model, td, [H(0, 0), H(1, 1)], sender_positions="object")
    assert all(abs(v) < 1e-5 for v in obj.scores.values())
    q = path_scores(model, td, [H(0, 0)], sender_positions=["query_label", "last"])
    full = path_scores(model, td, [H(0, 0)])
    assert q.patched[H(0, 0)] == pytest.approx(full.patched[H(0, 0)], abs=1e-4)  # they differ only from there on
    with pytest.raises(CircuitDistillError, match="route"):
        path_scores(model, td, [H(0, 0)], [([H(1, 0)], "values")])
    with pytest.raises(CircuitDistillError, match="head senders"):
        path_scores(model, td, [Component(0, "mlp")])
