"""Teacher/student comparison: influence, alignment score by hand, matching, similarity, compare() on
models of different depth and width (and BERT), the HTML report and the compare CLI."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from circuit_distill import tiny_model
from circuit_distill.analysis import (
    Comparison,
    SimilarityTable,
    align,
    alignment_score,
    attention_patterns,
    compare,
    influence,
    match_components,
    principal_subspace,
    rowwise_cosine,
    subspace_similarity,
)
from circuit_distill.analysis.report import head_grid, write_report
from circuit_distill.discovery.sweep import SweepResult
from circuit_distill.errors import CircuitDistillError, ConfigError
from circuit_distill.model import load_model
from circuit_distill.model.components import Component
from circuit_distill.model.tokenizer import word_level_tokenizer
from circuit_distill.tasks import Example, build_task_data

H = Component.make_head
M = Component.make_mlp


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention (measured ~50x
    slower with 2 threads under load), so this module runs single-threaded and restores the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- pure functions by hand ------------------------------------------------------------------

def test_alignment_score_by_hand():
    # I~_S = [.25, .75], I~_T = [.5, .5]: terms 1 * .75 and .5 * .75
    a, ns, nt = alignment_score([1.0, 0.5], [1.0, 3.0], [2.0, 2.0])
    assert a == pytest.approx((0.75 + 0.375) / 2)
    assert ns == pytest.approx([0.25, 0.75]) and nt == pytest.approx([0.5, 0.5])
    # identical influence shares and S = 1 everywhere -> 1
    assert alignment_score([1, 1, 1], [1, 2, 3], [10, 20, 30])[0] == pytest.approx(1.0)
    # all influence on different components: |dI~| = 1 on both pairs -> 0
    assert alignment_score([1, 1], [1, 0], [0, 1])[0] == pytest.approx(0.0)
    # a column of zeros becomes uniform 1/N
    a, ns, _ = alignment_score([1, 1], [0, 0], [1, 3])
    assert ns == [0.5, 0.5] and a == pytest.approx(1 - 0.25)
    with pytest.raises(ConfigError):
        alignment_score([1.5], [1], [1])
    with pytest.raises(ConfigError):
        alignment_score([1, 1], [1], [1, 1])
    with pytest.raises(ConfigError):
        alignment_score([], [], [])


def test_influence_by_hand():
    sw = SweepResult({"logit_diff": 2.0}, {H(0, 0): {"logit_diff": 1.0}, H(0, 1): {"logit_diff": 3.0},
                                           M(0): {"logit_diff": -2.0}}, "mean", 0.0, 0.0)
    assert influence(sw) == {H(0, 0): 50.0, H(0, 1): 50.0, M(0): 200.0}
    with pytest.raises(CircuitDistillError, match="undefined"):
        influence(SweepResult({"logit_diff": 0.0}, {}, "mean", 0.0, 0.0))


def test_matching_and_pair_table_by_hand():
    tc = {"head": [H(0, 0), H(0, 1), H(1, 0)], "mlp": [M(0), M(1)]}
    sc = {"head": [H(0, 0), H(0, 1)], "mlp": [M(0)]}
    vals = {"head": torch.tensor([[0.9, 0.9, 0.2], [0.1, 0.3, 0.8]], dtype=torch.float64),
            "mlp": torch.tensor([[0.4, 0.6]], dtype=torch.float64)}
    table = SimilarityTable("attention", tc, sc, vals)
    s2t = match_components(table, "student_to_teacher")
    # tie on row 0 goes to the first teacher head in forward order
    assert s2t == [(H(0, 0), H(0, 0), 0.9), (H(0, 1), H(1, 0), 0.8), (M(0), M(1), 0.6)]
    t2s = match_components(table, "teacher_to_student")
    assert [(str(s), str(t)) for s, t, _ in t2s] == [
        ("L0.H0", "L0.H0"), ("L0.H0", "L0.H1"), ("L0.H1", "L1.H0"), ("L0.MLP", "L0.MLP"), ("L0.MLP", "L1.MLP")]
    i_s = {H(0, 0): 10.0, H(0, 1): 30.0, M(0): 0.0}
    i_t = {H(0, 0): 5.0, H(0, 1): 5.0, H(1, 0): 5.0, M(0): 1.0, M(1): 5.0}
    a, pairs = align(s2t, i_s, i_t)
    # I~_S = [.25, .75, 0], I~_T = [1/3, 1/3, 1/3]
    expect = (0.9 * (1 - 1 / 12) + 0.8 * (1 - (0.75 - 1 / 3)) + 0.6 * (1 - 1 / 3)) / 3
    assert a == pytest.approx(expect)
    assert [p.contribution for p in pairs] == pytest.approx(
        [0.9 * (1 - 1 / 12), 0.8 * (1 - (0.75 - 1 / 3)), 0.6 * (1 - 1 / 3)])
    assert pairs[1].to_dict()["teacher"] == "L1.H0" and pairs[2].to_dict()["kind"] == "mlp"
    with pytest.raises(ConfigError, match="no influence"):
        align(s2t, {}, i_t)
    with pytest.raises(ConfigError):
        match_components(table, "sideways")


def test_similarity_primitives():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert rowwise_cosine(a, a) == pytest.approx(1.0)
    b = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    assert rowwise_cosine(a, b) == pytest.approx(0.5)  # rows: cos 0 and cos 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    # a rotation (and a change of width) keeps the sample-space principal subspace
    wide = torch.cat([x @ q, torch.zeros(50, 4)], 1)
    assert subspace_similarity(principal_subspace(x), principal_subspace(wide)) == pytest.approx(1.0)
    y = torch.randn(50, 8, generator=g)
    assert subspace_similarity(principal_subspace(x), principal_subspace(y)) < 0.5
    with pytest.raises(ConfigError):
        subspace_similarity(principal_subspace(x, space="features"), principal_subspace(wide, space="features"))


# ---- models --------------------------------------------------------------------------------

def _toy_task(tokenizer, n: int = 24, seed: int = 0):
    rng = random.Random(seed)

    def ex():
        ws = [f"w{rng.randrange(40)}" for _ in range(rng.randrange(4, 8))]
        return Example(" ".join(ws), " " + ws[0], wrong_answer=" " + ws[1])

    examples = [ex() for _ in range(n)]
    reference = [" ".join(f"w{rng.randrange(40)}" for _ in range(rng.randrange(4, 8))) for _ in range(n)]
    return build_task_data("toy", tokenizer, examples, reference)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    kw = dict(n_layers=2, n_heads=4, d_model=64)
    teacher = load_model(tiny_model("gpt2", root / "t", seed=1, **kw))
    perturbed = load_model(root / "t")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.hf.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.std())
    unrelated = load_model(tiny_model("gpt2", root / "r", seed=7, **kw))
    return teacher, perturbed, unrelated, _toy_task(teacher.tokenizer)


def test_self_perturbed_random_ordering(pair):
    teacher, perturbed, unrelated, data = pair
    sweeps = {}
    for sim in ("attention", "cka"):
        scores = {}
        for name, student in (("self", teacher), ("near", perturbed), ("far", unrelated)):
            # one ablation sweep per model, reused across similarities (and as the self-student's)
            cmp = compare(teacher, student, data, similarity=sim, n_boot=200, teacher_sweep=sweeps.get("self"),
                          student_sweep=sweeps.get(name))
            sweeps.setdefault("self", cmp.teacher_sweep)
            sweeps.setdefault(name, cmp.student_sweep)
            scores[name] = cmp
        own, near, far = scores["self"], scores["near"], scores["far"]
        assert own.alignment == pytest.approx(1.0, abs=1e-6)
        assert all(p.student == p.teacher for p in own.pairs)
        assert far.alignment < near.alignment < 1.0 + 1e-9, (sim, far.alignment, near.alignment)
        assert near.alignment > 0.95
        assert far.alignment_by_kind["mlp"] < near.alignment_by_kind["mlp"]


def test_attention_patterns_ignore_padding_side(pair):
    teacher = pair[0]
    rng = random.Random(3)
    prompts = [" ".join(f"w{rng.randrange(40)}" for _ in range(rng.randrange(3, 7))) for _ in range(6)]
    ex = [Example(p, " w1", wrong_answer=" w2") for p in prompts]
    right = build_task_data("t", teacher.tokenizer, ex, prompts)
    left = build_task_data("t", teacher.tokenizer, ex, prompts, padding_side="left")
    pr, pl = attention_patterns(teacher, right.clean), attention_patterns(teacher, left.clean)
    assert teacher.hf.config._attn_implementation != "eager"  # switched back afterwards
    for layer in pr:
        assert pr[layer].shape == (4, 6, 6)
        torch.testing.assert_close(pr[layer], pl[layer], atol=1e-5, rtol=1e-5)
        # each query row is a distribution over the keys it can see
        torch.testing.assert_close(pr[layer].sum(-1), torch.ones(4, 6), atol=1e-5, rtol=1e-5)


def test_different_depth_width_and_family(tmp_path):
    teacher = load_model(tiny_model("llama", tmp_path / "t", n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=1))
    student = load_model(tiny_model("gpt2", tmp_path / "s", n_layers=2, n_heads=2, d_model=32, seed=2))
    data = _toy_task(teacher.tokenizer, n=16)
    first = compare(teacher, student, data, n_boot=300)
    assert len(first.pairs) == 2 * 2 + 2
    # the sweeps can be reused: the reverse direction needs no new ablations
    cmp = compare(teacher, student, data, direction="teacher_to_student", n_boot=300,
                  teacher_sweep=first.teacher_sweep, student_sweep=first.student_sweep)
    assert cmp.teacher_sweep is first.teacher_sweep and len(cmp.pairs) == 3 * 4 + 3
    for c in (first, cmp):
        assert 0.0 <= c.alignment <= 1.0
        assert all(p.student.kind == p.teacher.kind for p in c.pairs)
    assert cmp.teacher_shape == (3, 4) and cmp.student_shape == (2, 2)
    assert len(cmp.layer_cka) == 3 and len(cmp.layer_cka[0]) == 2
    assert cmp.compression == pytest.approx((teacher.n_params - student.n_params) / teacher.n_params)
    assert len(cmp.teacher_influence) == 3 * 4 + 3 and len(cmp.student_drop) == 2 * 2 + 2
    # the CKA similarity also handles different head widths (16 vs 16) and model widths (64 vs 32)
    ck = compare(teacher, student, data, similarity="cka", kinds=("mlp",), n_boot=300,
                 teacher_sweep=first.teacher_sweep, student_sweep=first.student_sweep)
    assert len(ck.pairs) == 2 and ck.kinds == ("mlp",)
    assert head_grid(cmp.student_influence, cmp.student_shape).shape == (2, 2)


def test_different_tokenizers_are_refused(tmp_path, pair):
    teacher, _, _, data = pair
    other = load_model(tiny_model("gpt2", tmp_path / "o", tokenizer=word_level_tokenizer(
        [f"w{i}" for i in range(60)][::-1]), seed=3))
    with pytest.raises(ConfigError, match="tokenise"):
        compare(teacher, other, data)


def test_bert_masked_task(tmp_path):
    teacher = load_model(tiny_model("bert", tmp_path / "bt", n_layers=2, n_heads=4, d_model=64, seed=1))
    student = load_model(tiny_model("bert", tmp_path / "bs", n_layers=1, n_heads=2, d_model=32, seed=2))
    rng = random.Random(0)
    examples, reference = [], []
    for _ in range(12):
        ws = [f"w{rng.randrange(40)}" for _ in range(5)]
        prompt = " ".join(ws[:2] + ["[MASK]"] + ws[3:])
        examples.append(Example(prompt, " " + ws[0], wrong_answer=" " + ws[1],
                                positions={"mask": prompt.index("[MASK]")}))
        reference.append(" ".join(f"w{rng.randrange(40)}" for _ in range(5)))
    data = build_task_data("masked", teacher.tokenizer, examples, reference)
    assert (data.positions["mask"] == 2).all()
    cmp = compare(teacher, student, data, position="mask", n_boot=300)
    assert cmp.position == "mask" and len(cmp.pairs) == 1 * 2 + 1
    assert 0.0 <= cmp.alignment <= 1.0
    assert compare(teacher, teacher, data, position="mask", n_boot=300).alignment == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ConfigError, match="no position"):
        compare(teacher, student, data, position="answer")
    # BERT's masked-LM head post-processes the final hidden state: the fast sweep says so with its own
    # error type (compare falls back to full forwards on that type, not on the message)
    from circuit_distill.discovery.sweep import ablation_sweep
    from circuit_distill.errors import FastSweepUnsupported

    with pytest.raises(FastSweepUnsupported):
        ablation_sweep(teacher, data, position="mask", fast=True, progress=False)


# ---- report and CLI ----------------------------------------------------------------------------

def _check_html(path):
    text = path.read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(pngs) >= 4
    import base64

    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", text)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text
    return text


def test_report_renders(tmp_path, pair):
    teacher, perturbed, _, data = pair
    cmp = compare(teacher, perturbed, data, n_boot=300)
    assert isinstance(cmp, Comparison)
    path = write_report(cmp, tmp_path / "rep")
    text = _check_html(path)
    assert "Matched pairs" in text and f"{cmp.alignment:.3f}" in text
    js = json.loads((tmp_path / "rep" / "comparison.json").read_text())
    assert js["alignment"] == pytest.approx(cmp.alignment)
    assert len(js["pairs"]) == len(cmp.pairs) == js["n_pairs"]
    assert js["teacher_shape"] == [2, 4] and js["student_sweep"]["method"] == "mean"
    # comparison.json round-trips and re-renders
    back = Comparison.from_json(tmp_path / "rep" / "comparison.json")
    assert back.alignment == pytest.approx(cmp.alignment) and back.pairs == cmp.pairs
    assert json.loads(back.to_json()) == json.loads(cmp.to_json())
    _check_html(write_report(back, tmp_path / "again"))


def test_cli_compare(tmp_path):
    from circuit_distill.cli import main
    from circuit_distill.tasks import task_vocabulary

    words = task_vocabulary("numerals")
    t = tiny_model("gpt2", tmp_path / "t", n_layers=2, n_heads=4, d_model=64, words=words, seed=1)
    s = tiny_model("llama", tmp_path / "s", n_layers=1, n_heads=2, d_model=32, words=words, seed=2)
    out = tmp_path / "out"
    rc = main(["compare", "--teacher", str(t), "--student", str(s), "--task", "numerals", "--n", "12",
               "--out", str(out), "--ablation", "zero"])
    assert rc == 0
    _check_html(out / "report.html")
    js = json.loads((out / "comparison.json").read_text())
    assert js["task"] == "numerals" and js["ablation"] == "zero" and js["student_shape"] == [1, 2]
    assert main(["compare", "--teacher", str(t), "--student", str(s), "--task", "numerals", "--n", "4",
                 "--out", str(out), "--position", "nowhere"]) == 2
