"""Ablation, sweeps and circuit search; the key test recovers a known induction circuit."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from circuit_distill.discovery import (
    AblationValues,
    Circuit,
    SweepResult,
    ablate,
    ablation_sweep,
    ablation_values,
    faithfulness,
    find_circuit,
    mean_activations,
    path_patching,
)
from circuit_distill.errors import CircuitDistillError, ConfigError
from circuit_distill.model import Component, capture, intervene, load_model, tiny_model, word_level_tokenizer
from circuit_distill.tasks import (
    Batch,
    TaskData,
    final_logits,
    make_task,
    per_example,
    summarise,
    task_vocabulary,
)

FAMILIES = {"gpt2": {}, "llama": {"n_kv_heads": 2}, "mistral": {"n_kv_heads": 2}, "qwen2": {"n_kv_heads": 2},
            "qwen3": {"n_kv_heads": 2}, "gpt_neox": {}}


def _task(vocab: int, n: int = 8, seq: int = 10, ref_seq: int = 7, seed: int = 0, padding_side="right") -> TaskData:
    """Random prompts of varying length (padded); the reference set is shorter than the longest prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    lens = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    for i, length in enumerate(lens.tolist()):
        if padding_side == "right":
            mask[i, length:] = 0
            ids[i, length:] = 0
        else:
            mask[i, :seq - length] = 0
            ids[i, :seq - length] = 0
    ref = torch.randint(4, vocab, (n + 3, ref_seq), generator=g)
    ref_mask = torch.ones_like(ref)
    ref_mask[0, 4:] = 0  # one short reference row
    clean = Batch(ids, mask, padding_side)
    return TaskData("random", clean, torch.randint(4, vocab, (n,), generator=g),
                    torch.randint(4, vocab, (n,), generator=g), Batch(torch.randint(4, vocab, (n, seq)) * mask, mask,
                                                                      padding_side),
                    Batch(ref * ref_mask, ref_mask, padding_side), {"last": clean.last})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("discovery")
    return {fam: load_model(tiny_model(fam, root / fam, seed=2, n_layers=3, **kw)) for fam, kw in FAMILIES.items()}


def _max_diff(a: SweepResult, b: SweepResult) -> float:
    d = max(abs(a.clean[m] - b.clean[m]) for m in a.clean)
    return max([d] + [abs(a.ablated[c][m] - b.ablated[c][m]) for c in a.ablated for m in a.clean])


# ---- the fast sweep equals the naive loop ---------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_sweep_equals_naive_loop(models, family):
    model = models[family]
    td = _task(model.hf.config.vocab_size, seed=1)
    fast = ablation_sweep(model, td, method="mean", batch_size=24, progress=False)
    naive = ablation_sweep(model, td, method="mean", fast=False, progress=False)
    assert set(fast.ablated) == set(model.components("head") + model.components("mlp"))
    assert _max_diff(fast, naive) < 1e-5
    assert max(abs(v) for v in fast.effect("logit_diff").values()) > 1e-3  # ablations do something
    assert fast.forwards < naive.forwards


@pytest.mark.parametrize("method,per_position,padding", [("zero", True, "right"), ("resample", True, "right"),
                                                         ("mean", False, "right"), ("mean", True, "left")])
def test_fast_sweep_equals_naive_loop_other_settings(models, method, per_position, padding):
    model = models["llama"]
    td = _task(model.hf.config.vocab_size, n=5, seed=2, padding_side=padding)
    kw = dict(method=method, per_position=per_position, progress=False, batch_size=3)  # 3 < n: row chunks
    fast = ablation_sweep(model, td, **kw)
    naive = ablation_sweep(model, td, fast=False, **kw)
    assert _max_diff(fast, naive) < 1e-5
    # the naive loop is one forward per component; both are cheaper than that in the fast path
    assert naive.forwards == pytest.approx(1 + len(naive.ablated) + (0 if method == "zero" else len(td.reference) / 5))


def test_sweep_clean_matches_evaluate_and_roundtrips(models):
    from circuit_distill.tasks import evaluate

    model = models["gpt2"]
    td = _task(model.hf.config.vocab_size, seed=3)
    sw = ablation_sweep(model, td, [Component(1, "head", 2), "L0.MLP"], progress=False)
    assert sw.clean == pytest.approx(evaluate(model, td), abs=1e-6)
    back = SweepResult.from_dict(json.loads(json.dumps(sw.to_dict())))
    assert back.ablated == sw.ablated and back.clean == sw.clean and back.method == "mean"
    eff = back.effect("answer_prob")
    assert eff[Component(0, "mlp")] == pytest.approx(sw.clean["answer_prob"] - sw.ablated[Component(0, "mlp")]["answer_prob"])
    with pytest.raises(CircuitDistillError, match="metric"):
        sw.effect("nope")


# ---- ablation semantics by hand ------------------------------------------------------------------

def test_mean_activations_by_hand(models):
    model = models["qwen3"]
    td = _task(model.hf.config.vocab_size, seed=4)
    ref = td.reference
    comps = [Component(1, "head", 3), Component(2, "mlp")]
    with torch.no_grad(), capture(model, comps) as cap:
        model(ref.input_ids, ref.attention_mask)
        acts = {c: cap[c].clone() for c in comps}
    per_pos = mean_activations(model, ref, comps, per_position=True)
    overall = mean_activations(model, ref, comps, per_position=False)
    for c in comps:
        a, m = acts[c], ref.attention_mask.bool()
        assert per_pos[c].shape == (ref.input_ids.shape[1], a.shape[-1])
        for t in range(ref.input_ids.shape[1]):
            want = a[m[:, t], t].mean(0)  # right padding: the t-th real token is at position t
            torch.testing.assert_close(per_pos[c][t], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(overall[c], a[m].mean(0), atol=1e-5, rtol=1e-5)


def test_zero_and_mean_ablation_semantics_by_hand(models):
    model = models["llama"]
    td = _task(model.hf.config.vocab_size, seed=5)
    head, mlp = Component(1, "head", 1), Component(0, "mlp")
    pos = td.positions["last"]

    def manual(repl):
        with torch.no_grad(), intervene(model, repl):
            logits = final_logits(model(td.clean.input_ids, td.clean.attention_mask), pos)
        return summarise(per_example(logits, td.answer_ids, td.wrong_ids))

    # zero: the head outputs nothing, the MLP outputs zeros
    assert ablate(model, td, [head, mlp], method="zero") == pytest.approx(manual({head: "zero", mlp: "zero"}), abs=1e-6)
    # mean: position t of a clean row gets the mean at t over the reference rows with a t-th token;
    # positions past the reference length (7) get the all-token mean
    means = mean_activations(model, td.reference, [head, mlp])
    flat = mean_activations(model, td.reference, [head, mlp], per_position=False)
    seq = td.clean.input_ids.shape[1]
    repl = {}
    for c in (head, mlp):
        v = torch.stack([means[c][t] if t < means[c].shape[0] else flat[c] for t in range(seq)])
        v = v[None].expand(len(td), -1, -1).clone()
        v[td.clean.attention_mask == 0] = flat[c]
        repl[c] = v
    assert ablate(model, td, [head, mlp], method="mean") == pytest.approx(manual(repl), abs=1e-5)
    assert ablate(model, td, [head], method="mean", per_position=False) == pytest.approx(
        manual({head: flat[head]}), abs=1e-5)
    # nothing ablated: the clean metrics
    assert ablate(model, td, []) == pytest.approx(manual({}), abs=1e-6)


def test_resample_takes_a_long_enough_reference_row(models):
    model = models["gpt2"]
    td = _task(model.hf.config.vocab_size, seed=6, ref_seq=10)
    c = Component(1, "head", 0)
    vals = ablation_values(model, td, [c], method="resample", seed=3)
    assert isinstance(vals, AblationValues)
    got = vals.for_batch(td.clean, [c])[c]  # [n, seq, d_head]
    with torch.no_grad(), capture(model, [c]) as cap:
        model(td.reference.input_ids, td.reference.attention_mask)
        ref = cap[c].clone()
    ref_len = td.reference.attention_mask.sum(1)
    for i in range(len(td)):
        n_i = int(td.clean.attention_mask[i].sum())
        matches = [j for j in range(len(ref)) if ref_len[j] >= n_i
                   and torch.allclose(got[i, :n_i], ref[j, :n_i], atol=1e-6)]
        assert matches, f"row {i}: no reference row at least {n_i} tokens long supplies its activations"
    again = ablation_values(model, td, [c], method="resample", seed=3).for_batch(td.clean, [c])[c]
    assert torch.equal(got, again)  # seeded


def test_ablation_errors_say_how_to_fix(models):
    model = models["gpt2"]
    td = _task(model.hf.config.vocab_size)
    with pytest.raises(CircuitDistillError, match="zero"):
        ablation_values(model, td, ["L0.H0"], method="median")
    with pytest.raises(CircuitDistillError, match="only heads and MLPs"):
        ablation_sweep(model, td, ["L0.RESID_PRE"])
    with pytest.raises(CircuitDistillError, match="position"):
        ablation_sweep(model, td, ["L0.H0"], position="answer")


# ---- circuits ------------------------------------------------------------------------------------

def test_circuit_json_roundtrip(tmp_path):
    c = Circuit(["L1.H0", "L0.H1"], {"L0.H1": 2.0, "L1.H0": 1.5, "L0.H0": 0.1}, metric="logit_diff",
                method="ablation", task="induction", model="m", faithfulness=0.8, threshold=0.2)
    path = c.save(tmp_path / "sub" / "circuit.json")
    back = Circuit.load(path)
    assert back == c
    assert back.components == [Component(0, "head", 1), Component(1, "head", 0)]
    assert [str(x) for x, _ in back.ranked()] == ["L0.H1", "L1.H0", "L0.H0"]
    assert "L1.H0" in back and len(back) == 2
    with pytest.raises(CircuitDistillError, match="does not exist"):
        Circuit.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CircuitDistillError, match="components"):
        Circuit.load(tmp_path / "bad.json")


def test_find_circuit_topk_and_faithfulness(models):
    model = models["llama"]
    td = _task(model.hf.config.vocab_size, seed=7)
    full = ablate(model, td, [])["answer_prob"]
    every = model.components("head")
    assert faithfulness(model, td, every, "answer_prob") == pytest.approx(1.0)
    none_kept = ablate(model, td, every)["answer_prob"]
    assert faithfulness(model, td, [], "answer_prob", kind="head") == pytest.approx(none_kept / full)
    circ = find_circuit(model, td, top_k=3, metric="answer_prob", progress=False)
    sweep = ablation_sweep(model, td, every, metrics=("answer_prob",), progress=False).effect("answer_prob")
    assert set(circ.components) == set(sorted(sweep, key=lambda c: -sweep[c])[:3])
    assert circ.faithfulness == pytest.approx(faithfulness(model, td, circ.components, "answer_prob"), abs=1e-5)
    with pytest.raises(CircuitDistillError, match="search method"):
        find_circuit(model, td, method="magic")


def _counting(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records each call; returns the record."""
    calls: list = []
    real = getattr(module, name)

    def wrapper(*a, **kw):
        calls.append(a[2] if len(a) > 2 else kw.get("components"))
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _without_seconds(c: Circuit) -> dict:
    return {k: v for k, v in c.to_dict().items() if k != "seconds"}


@pytest.mark.parametrize("top_k", [None, 3])
def test_find_circuit_with_a_passed_sweep_equals_sweeping_inside(models, monkeypatch, top_k):
    import circuit_distill.discovery.circuits as circuits
    import circuit_distill.discovery.sweep as sweep_module

    model = models["llama"]
    td = _task(model.hf.config.vocab_size, seed=8)
    heads = model.components("head")
    sweeps = _counting(monkeypatch, circuits, "ablation_sweep")
    reference_runs = _counting(monkeypatch, sweep_module, "ablation_values")
    inside = find_circuit(model, td, metric="answer_prob", top_k=top_k, progress=False)
    assert len(sweeps) == 1 and reference_runs == []  # the sweep reuses find_circuit's ablation values
    # a sweep the caller already ran (more metrics than needed), on the same heads
    given = ablation_sweep(model, td, heads, metrics=("answer_prob", "logit_diff", "accuracy"), progress=False)
    passed = find_circuit(model, td, metric="answer_prob", top_k=top_k, progress=False, sweep=given)
    assert len(sweeps) == 1, "find_circuit swept again although a sweep was passed"
    assert _without_seconds(passed) == _without_seconds(inside)
    # an all-component sweep (heads and MLPs, as a comparison runs): only the candidates are scored
    wider = ablation_sweep(model, td, None, metrics=("answer_prob",), progress=False)
    both = find_circuit(model, td, metric="answer_prob", top_k=top_k, progress=False, sweep=wider)
    assert len(sweeps) == 1
    assert set(both.scores) == set(heads) and both.components == inside.components
    assert both.scores == pytest.approx(inside.scores, abs=1e-6)


def test_find_circuit_rejects_a_sweep_that_does_not_fit(models):
    model = models["llama"]
    td = _task(model.hf.config.vocab_size, seed=8)
    heads = model.components("head")
    base = ablation_sweep(model, td, heads, metrics=("answer_prob",), progress=False)
    cases = {
        "no metric 'logit_diff'": (base, {}),
        "lacks 2 candidate": (ablation_sweep(model, td, heads[:-2], metrics=("logit_diff",), progress=False), {}),
        "method='zero'": (ablation_sweep(model, td, heads, method="zero", metrics=("logit_diff",), progress=False),
                          {}),
        "on 5 prompts": (ablation_sweep(model, td.subset(slice(0, 5)), heads, metrics=("logit_diff",),
                                        progress=False), {}),
        "method='ablation' only": (base, {"method": "attribution"}),
    }
    for what, (sweep, kw) in cases.items():
        with pytest.raises(ConfigError, match="sweep") as err:
            find_circuit(model, td, top_k=2, metric="logit_diff", progress=False, sweep=sweep, **kw)
        msg = str(err.value)
        assert what in msg and "\n" not in msg, msg
        assert "sweep=None" in msg or "pass" in msg


def test_discover_cli_smoke(tmp_path):
    from circuit_distill.cli import main

    tok = word_level_tokenizer(task_vocabulary("induction"))
    path = tiny_model("llama", tmp_path / "m", tokenizer=tok, n_layers=2, n_heads=2, seed=0)
    out = tmp_path / "circuit.json"
    rc = main(["discover", "--model", str(path), "--task", "induction", "--n", "6", "--top-k", "2",
               "--metric", "answer_prob", "--out", str(out), "--quiet"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["components"]) == 2 and data["task"] == "induction" and data["top_k"] == 2
    assert len(Circuit.load(out).scores) == 4


# ---- the key test: a known induction circuit is recovered -----------------------------------------

def _induction_batch(rng: random.Random, g: torch.Generator, n: int, vocab: int, seq: int = 24, lo: int = 4):
    """Random tokens with a segment of 3-8 distinct tokens repeated at a random distance; targets are
    the repeated tokens that induction predicts."""
    ids = torch.randint(lo, vocab, (n, seq), generator=g)
    target = torch.zeros(n, seq, dtype=torch.bool)
    for i in range(n):
        L = rng.randint(3, 8)
        pre = rng.randint(1, seq - 2 * L - 1)
        gap = rng.randint(1, seq - 2 * L - pre)
        seg = torch.randperm(vocab - lo, generator=g)[:L] + lo
        ids[i, pre:pre + L] = seg
        r = pre + L + gap
        m = min(L, seq - r)
        ids[i, r:r + m] = seg[:m]
        target[i, r + 1:r + m] = True  # predicted from the previous (already repeated) token
    return ids, target


STEPS = 400  # batch 32 x 300 steps stayed on the loss plateau (3.65); a probe at 64 x 400 learned it


@pytest.fixture(scope="module")
def induction_model(tmp_path_factory):
    """A 2-layer Llama-style model (rotary positions, 2 heads per layer) trained here on induction."""
    torch.manual_seed(0)
    tok = word_level_tokenizer(task_vocabulary("induction"))
    path = tiny_model("llama", tmp_path_factory.mktemp("induction") / "m", tokenizer=tok, n_layers=2, n_heads=2,
                      d_model=64, d_mlp=128, seed=0)
    model = load_model(path)
    vocab = len(tok)
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.hf.parameters(), lr=3e-3, weight_decay=0.0)
    model.hf.train()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        ids, target = _induction_batch(rng, g, 64, vocab)
        logits = model.hf(input_ids=ids, use_cache=False).logits
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        loss = -logp[target[:, 1:]].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.hf.eval()
    print(f"induction training: {STEPS} steps in {time.perf_counter() - t0:.1f}s, final loss {loss.item():.3f}")
    return model


def _attention(model, td: TaskData, layer: int) -> torch.Tensor:
    """Attention probabilities ``[n, heads, seq, seq]`` of ``layer`` (eager attention for this call)."""
    hf = model.hf
    old = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf(input_ids=td.clean.input_ids, attention_mask=td.clean.attention_mask, output_attentions=True,
                     use_cache=False)
    finally:
        hf.set_attn_implementation(old)
    return out.attentions[layer]


def test_known_induction_circuit_is_recovered(induction_model):
    from circuit_distill.tasks import evaluate

    model = induction_model
    td = make_task("induction", model.tokenizer, 64, seed=1)
    perf = evaluate(model, td)
    assert perf["accuracy"] >= 0.9, f"the test model did not learn induction: {perf}"

    sweep = ablation_sweep(model, td, method="mean", progress=False)
    effect = sweep.effect("logit_diff")
    heads = sorted((c for c in effect if c.is_head), key=lambda c: -effect[c])
    top_l0 = next(c for c in heads if c.layer == 0)
    top_l1 = next(c for c in heads if c.layer == 1)
    assert set(heads[:2]) == {top_l0, top_l1}, f"ranking: {[(str(c), round(effect[c], 2)) for c in heads]}"
    print("ranking:", [(str(c), round(effect[c], 2)) for c in heads])

    # what they do: the layer-0 head attends to the previous token; the layer-1 head attends from the
    # last token to the token after the earlier occurrence of the last token
    n = len(td)
    a0 = _attention(model, td, 0)[:, top_l0.head]
    seq = a0.shape[-1]
    prev = torch.stack([a0[:, q, q - 1] for q in range(1, seq)], 1).mean().item()
    a1 = _attention(model, td, 1)[:, top_l1.head]
    ind = a1[torch.arange(n), td.positions["last"], td.positions["earlier_next"]].mean().item()
    print(f"top heads {top_l0} (prev-token attention {prev:.2f}) and {top_l1} (induction attention {ind:.2f})")
    assert prev > 0.5, f"{top_l0} is not a previous-token head (mean attention to q-1: {prev:.2f})"
    assert ind > 0.5, f"{top_l1} is not an induction head (mean attention to earlier_next: {ind:.2f})"

    # circuit search by iterative pruning keeps both and little else, and the circuit is faithful
    circ = find_circuit(model, td, method="ablation", kind="head", threshold=0.2, progress=False)
    assert {top_l0, top_l1} <= set(circ.components), circ.components
    assert circ.faithfulness > 0.5

    # path patching: with the repeated segment's first copy corrupted, the previous-token head acts
    # through the induction head, not directly on the logits
    seg = make_task("induction", model.tokenizer, 32, seed=2, corruption="segment")
    direct = path_patching(model, seg, [top_l0], None, metric="logit_diff").scores()[top_l0]
    via = path_patching(model, seg, [top_l0], [top_l1], metric="logit_diff").scores()[top_l0]
    print(f"path patching of {top_l0}: direct {direct:.2f}, via {top_l1} {via:.2f}")
    assert via > 0.2 and via > 3 * abs(direct)
