"""Exactness of capture/intervene against the model's own computation, for every family."""

import pytest
import torch

from circuit_distill import Component, capture, intervene, load_model
from circuit_distill.model.hooks import head_contributions
from conftest import DECODER_FAMILIES, random_batch


def _apply_slices(x: torch.Tensor, slices, hf) -> torch.Tensor:
    """x @ (the weight slice) + (bias slice), whatever the storage layout (Linear rows or Conv1D columns)."""
    out = None
    for s in slices:
        t = s.of(hf)
        if s.name.endswith("bias"):
            out = out + t
        else:
            out = x @ (t.t() if s.dim == 0 else t)
    return out


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_capture_equals_hand_recomputation(tiny_dirs, family):
    """z_h = softmax-attention(h) @ V_g, with V computed by hand from the head's value-weight slice."""
    m = load_model(tiny_dirs[family], attn_implementation="eager")
    ids = random_batch(len(m.tokenizer), batch=2, seq=6)
    layer = 1
    attn_in = {}

    def grab(mod, args, kwargs):
        attn_in["x"] = args[0] if args else kwargs["hidden_states"]

    h = m.arch.attn(m.hf, layer).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), capture(m, [Component(layer, "head", i) for i in range(4)]) as cap:
            out = m.hf(input_ids=ids, output_attentions=True)
    finally:
        h.remove()
    probs = out.attentions[layer]  # [b, H, q, k]
    for head in range(4):
        sl = m.arch.head_slices(layer, head)
        v = _apply_slices(attn_in["x"], sl.v, m.hf)  # [b, k, d_head]
        z = probs[:, head] @ v
        torch.testing.assert_close(cap[f"L{layer}.H{head}"], z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_zero_ablation_equals_zeroed_output_columns(tiny_dirs, family):
    m = load_model(tiny_dirs[family])
    ref = load_model(tiny_dirs[family])
    ids = random_batch(len(m.tokenizer))
    for comp in (Component(0, "head", 1), Component(1, "head", 3)):
        with torch.no_grad():
            for s in ref.arch.head_slices(comp.layer, comp.head).o:
                s.of(ref.hf).zero_()
            expected = ref(ids)
            with intervene(m, {comp: "zero"}):
                got = m(ids)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(got, m(ids).detach(), atol=1e-4), "ablation had no effect"
        ref = load_model(tiny_dirs[family])


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_patch_at_one_position_changes_only_later_positions(tiny_dirs, family):
    m = load_model(tiny_dirs[family])
    ids = random_batch(len(m.tokenizer), seq=8)
    p = 4
    with torch.no_grad():
        clean = m(ids)
        with intervene(m, {"L0.H2": torch.randn(m.arch.d_head) * 5}, positions=p):
            patched = m(ids)
    assert torch.allclose(patched[:, :p], clean[:, :p], atol=1e-6)
    assert (patched[:, p:] - clean[:, p:]).abs().amax(dim=(0, 2)).min() > 1e-4


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_head_slices_and_gqa_groups(tiny_dirs, family):
    m = load_model(tiny_dirs[family])
    a = m.arch
    ids = random_batch(len(m.tokenizer))
    for h in range(a.n_heads):
        assert a.kv_group(h) == h // (a.n_heads // a.n_kv_heads)

    def heads_changed(perturb) -> set[int]:
        with torch.no_grad(), capture(m, m.components("head")) as cap:
            m(ids)
            before = {c: cap[c].clone() for c in cap}
        saved = [(s, s.of(m.hf).clone()) for s in perturb]
        with torch.no_grad():
            for s, _ in saved:
                s.of(m.hf).add_(torch.randn_like(s.of(m.hf)))
            with capture(m, m.components("head")) as cap:
                m(ids)
                changed = {c.head for c in cap if c.layer == 1 and not torch.allclose(cap[c], before[c], atol=1e-6)}
            for s, t in saved:
                s.of(m.hf).copy_(t)
        return changed

    sl = a.head_slices(1, 3)
    assert heads_changed(sl.q) == {3}
    group = {h for h in range(a.n_heads) if a.kv_group(h) == a.kv_group(3)}
    assert heads_changed(sl.v) == group
    assert heads_changed(sl.k) == group
    if a.n_kv_heads < a.n_heads:
        assert len(group) == a.n_heads // a.n_kv_heads > 1


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches(tiny_dirs, family, side):
    """Activations at real tokens of a padded batch equal those of each sequence run alone."""
    m = load_model(tiny_dirs[family])
    seqs = [[5, 9, 7, 11, 6], [8, 12, 4], [10, 6, 13, 9]]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    comps = ["L1.H2", "L0.MLP", "L1.RESID_POST", "L0.RESID_PRE"]
    with torch.no_grad(), capture(m, comps) as cap:
        m(ids, mask)
        batched = {c: cap[c].clone() for c in cap}
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        with torch.no_grad(), capture(m, comps) as cap:
            m(torch.tensor([s]))
            for c in cap:
                torch.testing.assert_close(batched[c][i, sl], cap[c][0], atol=1e-5, rtol=1e-5)


def test_capture_positions_and_mlp_resid_parity(tiny_dirs):
    m = load_model(tiny_dirs["llama"])
    ids = random_batch(len(m.tokenizer), seq=6)
    pos = torch.tensor([5, 2, 3])
    with torch.no_grad(), capture(m, ["L1.H1", "L0.MLP", "L1.RESID_PRE", "L0.RESID_POST"]) as full:
        out = m.hf(input_ids=ids, output_hidden_states=True)
        full = {c: full[c].clone() for c in full}
    with torch.no_grad(), capture(m, ["L1.H1", "L0.MLP"], positions=pos) as sel:
        m(ids)
        assert sel["L1.H1"].shape == (3, m.arch.d_head)
        torch.testing.assert_close(sel["L1.H1"], full[Component.parse("L1.H1")][torch.arange(3), pos])
    # residual stream: HF's own hidden_states[1] is the output of block 0 = input of block 1
    torch.testing.assert_close(full[Component.parse("L1.RESID_PRE")], out.hidden_states[1])
    torch.testing.assert_close(full[Component.parse("L0.RESID_POST")], out.hidden_states[1])
    with torch.no_grad(), capture(m, ["L0.H0"], positions=torch.tensor([[0, 1], [2, 3], [4, 5]])) as cap:
        m(ids)
        assert cap["L0.H0"].shape == (3, 2, m.arch.d_head)


def test_capture_keeps_graph(tiny_dirs):
    m = load_model(tiny_dirs["qwen2"])
    ids = random_batch(len(m.tokenizer))
    with capture(m, ["L0.H1"]) as cap:
        m(ids)
        cap["L0.H1"].pow(2).sum().backward()
    q = m.hf.get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert q.grad is not None and q.grad[16:32].abs().sum() > 0 and q.grad[:16].abs().sum() == 0
    with capture(m, ["L0.H1"], detach=True) as cap:
        m(ids)
        assert not cap["L0.H1"].requires_grad


def test_hooks_removed_on_exception(tiny_dirs):
    m = load_model(tiny_dirs["gpt2"])
    mods = [m.arch.o_proj(m.hf, 0), m.arch.mlp(m.hf, 0), m.arch.layer(m.hf, 1)]
    with pytest.raises(RuntimeError, match="boom"):
        with capture(m, ["L0.H0", "L0.MLP", "L1.RESID_PRE"]), intervene(m, {"L0.H1": "zero", "L1.RESID_POST": 0.0}):
            raise RuntimeError("boom")
    for mod in mods:
        assert not mod._forward_pre_hooks and not mod._forward_hooks


def test_intervene_function_and_tensor_replacements(tiny_dirs):
    m = load_model(tiny_dirs["llama"])
    ids = random_batch(len(m.tokenizer))
    with torch.no_grad():
        clean = m(ids)
        with intervene(m, {"L1.H0": lambda a: a}):  # identity function changes nothing
            torch.testing.assert_close(m(ids), clean, atol=0, rtol=0)
        with intervene(m, {"L1.H0": lambda a: a * 0}):
            via_fn = m(ids)
        with intervene(m, {"L1.H0": torch.zeros(1, 1, m.arch.d_head)}):
            via_tensor = m(ids)
        with intervene(m, {"L1.H0": "zero"}):
            via_zero = m(ids)
    torch.testing.assert_close(via_fn, via_zero, atol=0, rtol=0)
    torch.testing.assert_close(via_tensor, via_zero, atol=0, rtol=0)
    # mean-ablation at one position per example (e.g. the "last" token of each row)
    pos = torch.tensor([6, 3, 5])
    mean = torch.randn(m.arch.d_head)
    with torch.no_grad(), intervene(m, {"L0.MLP": torch.zeros(m.arch.d_model), "L1.H2": mean}, positions=pos), \
            capture(m, ["L1.H2"]) as cap:
        m(ids)
        z = cap["L1.H2"]  # capture sees the activation before the intervention at this module
    assert z.shape == (3, 7, m.arch.d_head)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_head_contributions_sum_to_attention_output(tiny_dirs, family):
    m = load_model(tiny_dirs[family])
    ids = random_batch(len(m.tokenizer))
    o = m.arch.o_proj(m.hf, 1)
    got = {}
    h = o.register_forward_hook(lambda mod, a, out: got.update(z=a[0], out=out) and None)
    try:
        with torch.no_grad():
            m(ids)
    finally:
        h.remove()
    total = head_contributions(m, 1, got["z"]).sum(-2) + (o.bias if o.bias is not None else 0)
    torch.testing.assert_close(total, got["out"], atol=1e-5, rtol=1e-5)


def test_encoder_capture(tiny_bert_dir):
    m = load_model(tiny_bert_dir)
    ids = random_batch(len(m.tokenizer))
    with torch.no_grad(), capture(m, ["L1.H0", "L1.MLP"]) as cap, intervene(m, {"L0.H1": "zero"}):
        logits = m(ids)
        assert cap["L1.H0"].shape == (3, 7, 16) and cap["L1.MLP"].shape == (3, 7, 64)
    assert logits.shape[:2] == (3, 7)
