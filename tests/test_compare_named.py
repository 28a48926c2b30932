"""Comparing models whose tokenizers differ, at the task's named positions (analysis.named, analysis.controls,
the compare command): positions land on the same words, the attention mass and debiased CKA by hand, the
same network behind two tokenizers scores A = 1, and a trained pair scores above its control pairs."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from circuit_distill import tiny_model
from circuit_distill.analysis import (
    check_same_prompts,
    compare,
    control_comparisons,
    control_copy,
    debiased_cka_table,
    named_attention,
    named_outputs,
    named_task_pair,
    shared_positions,
)
from circuit_distill.errors import ConfigError
from circuit_distill.model import load_model
from circuit_distill.model.attention import eager_attention, forward_attentions
from circuit_distill.model.tokenizer import SPECIAL_TOKENS, word_level_tokenizer
from circuit_distill.similarity import linear_cka
from circuit_distill.tasks import make_task, task_vocabulary

NAMES = ("object", "earlier_label", "query_label", "last")


pytestmark = pytest.mark.usefixtures("one_thread")


def wordpiece_tokenizer(words, split: dict[str, tuple[str, str]]) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer that prepends ``<bos>`` and cuts each word of ``split`` in two pieces
    (``"Box" -> "Bo" + "##x"``): the same text as a word-level tokenizer, other token counts and ids."""
    vocab: dict[str, int] = {}
    pieces = [p for a, b in split.values() for p in (a, "##" + b)]
    for w in list(SPECIAL_TOKENS) + pieces + [w for w in reversed(list(words)) if w not in split]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", clean_up_tokenization_spaces=False)


WORDS = task_vocabulary("entity_tracking")
SPLIT = {"Box": ("Bo", "x"), "contains": ("con", "tains")}


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """A tiny Llama on the word-level tokenizer and a tiny GPT-2 on the WordPiece one (random weights)."""
    root = tmp_path_factory.mktemp("named")
    t = load_model(tiny_model("llama", root / "t", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, words=WORDS,
                              seed=1), attn_implementation="eager")
    s = load_model(tiny_model("gpt2", root / "s", n_layers=2, n_heads=2, d_model=32,
                              tokenizer=wordpiece_tokenizer(WORDS, SPLIT), seed=2), attn_implementation="eager")
    return t, s


def test_named_positions_land_on_the_same_words(two_tokenizers):
    t, s = two_tokenizers
    td, sd = named_task_pair("entity_tracking", t.tokenizer, s.tokenizer, 6, seed=0, n_boxes=3)
    check_same_prompts(td, sd)
    # the student's tokens are more (<bos>, and "Box"/"contains" in two pieces), so positions differ ...
    assert (sd.position("last") > td.position("last")).all()
    assert shared_positions(td, sd) == NAMES
    for i, m in enumerate(td.metadata):
        for data, model in ((td, t), (sd, s)):
            tokens = model.tokenizer.convert_ids_to_tokens(data.clean.input_ids[i].tolist())
            # ... but name the same words
            assert tokens[int(data.position("object")[i])] == m["boxes"][m["query"]]
            assert tokens[int(data.position("earlier_label")[i])] == m["query"]
            assert tokens[int(data.position("query_label")[i])] == m["query"]
            assert tokens[int(data.position("last")[i])] == "the"
    other = make_task("entity_tracking", s.tokenizer, 6, seed=1, n_boxes=3)
    with pytest.raises(ConfigError, match="prompt 0 differs"):
        check_same_prompts(td, other)


def test_named_attention_and_outputs_by_hand(two_tokenizers):
    _, s = two_tokenizers
    td = make_task("entity_tracking", s.tokenizer, 5, seed=0, n_boxes=3)
    m = named_attention(s, td, NAMES, batch_size=2)
    assert m.shape == (2, 2, 5, 4, 4)
    with eager_attention(s), torch.no_grad():
        atts = forward_attentions(s, td.clean.input_ids, td.clean.attention_mask)
    i = 3
    p = [int(td.position(nm)[i]) for nm in NAMES]
    for a, qa in enumerate(p):
        for b, kb in enumerate(p):
            assert float(m[1, 1, i, a, b]) == pytest.approx(float(atts[1][i, 1, qa, kb]), abs=1e-6)
    # causal: no mass from a named position to a later one
    assert float(m[..., 0, 1:].abs().max()) == 0.0
    out = named_outputs(s, td, s.components("head")[:1], NAMES)
    (head,) = out
    assert out[head].shape == (5, 4, s.arch.d_head)


def test_debiased_cka_table_equals_linear_cka():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(9, 3, 5, generator=g), torch.randn(9, 7, generator=g)]
    ys = [xs[0].reshape(9, -1) @ torch.randn(15, 4, generator=g), torch.randn(9, 2, 2, generator=g)]
    table = debiased_cka_table(xs, ys)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            want = float(linear_cka(x.reshape(9, -1).double(), y.reshape(9, -1).double(), debiased=True))
            assert float(table[i, j]) == pytest.approx(want, abs=1e-6)
    assert float(debiased_cka_table(xs[:1], xs[:1])[0, 0]) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="at least 4"):
        debiased_cka_table([torch.randn(3, 2)], [torch.randn(3, 2)])


def test_compare_across_tokenizers_runs_and_refuses_without_student_data(two_tokenizers):
    t, s = two_tokenizers
    td, sd = named_task_pair("entity_tracking", t.tokenizer, s.tokenizer, 8, seed=0, n_boxes=3)
    with pytest.raises(ConfigError, match="student_data"):
        compare(t, s, td, kinds=("head",), n_boot=100)
    with pytest.raises(ConfigError, match="named positions only"):
        compare(t, t, td, similarity="attention_centred", kinds=("head",), n_boot=100)
    for sim in ("attention", "attention_centred", "cka"):
        cmp = compare(t, s, td, student_data=sd, similarity=sim, n_boot=100, progress=False)
        assert cmp.positions == list(NAMES)
        assert len(cmp.pairs) == 2 * 2 + 2 and 0.0 <= cmp.alignment <= 1.0
        assert all(0.0 <= p.similarity <= 1.0 for p in cmp.pairs)
        assert cmp.student_sweep.n_examples == 8 and len(cmp.layer_cka) == 2 and len(cmp.layer_cka[0]) == 2
    back = type(cmp).from_dict(json.loads(cmp.to_json()))
    assert back.positions == list(NAMES) and back.alignment == pytest.approx(cmp.alignment)


def _retokenised(src, dst, order):
    """The model at ``src`` behind a word-level tokenizer whose ids follow ``order``: every embedding and
    unembedding row moved with its word, so the network computes exactly what it did."""
    m = load_model(src)
    old = m.tokenizer.get_vocab()
    tok = word_level_tokenizer(order)
    new = tok.get_vocab()
    idx = torch.tensor([old[w] for w, _ in sorted(new.items(), key=lambda kv: kv[1])])
    with torch.no_grad():
        for emb in (m.hf.get_input_embeddings(), m.hf.get_output_embeddings()):
            emb.weight.copy_(emb.weight[idx].clone())
    m.hf.save_pretrained(dst)
    tok.save_pretrained(dst)
    return load_model(dst, attn_implementation="eager")


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """The shipped entity-tracking teacher and competent student, the student behind a tokenizer with other ids."""
    from circuit_distill.model.loading import resolve_name

    root = tmp_path_factory.mktemp("trained")
    teacher = load_model("builtin:entity-tracking-teacher", attn_implementation="eager")
    words = [w for w in teacher.tokenizer.get_vocab() if w not in SPECIAL_TOKENS]
    student = _retokenised(resolve_name("builtin:entity-tracking-student-competent")[0], root / "s", words[::-1])
    same = _retokenised(resolve_name("builtin:entity-tracking-teacher")[0], root / "t", words[::-1])
    return teacher, student, same


def test_same_network_behind_another_tokenizer_scores_one(trained_pair):
    teacher, _, same = trained_pair
    td, sd = named_task_pair("entity_tracking", teacher.tokenizer, same.tokenizer, 24, seed=3, n_boxes=3)
    assert not torch.equal(td.clean.input_ids, sd.clean.input_ids)
    for sim in ("attention", "attention_centred", "cka"):
        cmp = compare(teacher, same, td, student_data=sd, similarity=sim, kinds=("head",), n_boot=100)
        assert cmp.alignment == pytest.approx(1.0, abs=1e-5)
        assert all(p.student == p.teacher for p in cmp.pairs)


def test_centred_pattern_table_by_hand():
    from circuit_distill.analysis.named import centred_pattern_table
    from circuit_distill.model import Component

    g = torch.Generator().manual_seed(0)
    sm, tm = torch.rand(2, 3, 3, 3, generator=g).tril(), torch.rand(3, 2, 3, 3, generator=g).tril()
    sc = [Component(1, "head", 2), Component(0, "head", 0)]
    tc = [Component(2, "head", 1), Component(0, "head", 1), Component(1, "head", 0)]
    got = centred_pattern_table(sm, tm, sc, tc)
    low = [(a, b) for a in range(3) for b in range(a + 1)]

    def vec(m, c):  # the head's six lower-triangular entries minus the model's mean head's
        mean = [sum(float(m[i, j, a, b]) for i in range(m.shape[0]) for j in range(m.shape[1])) / (m.shape[0] * m.shape[1])
                for a, b in low]
        return [float(m[c.layer, c.head, a, b]) - mu for (a, b), mu in zip(low, mean)]

    for i, s_ in enumerate(sc):
        for j, t_ in enumerate(tc):
            x, y = vec(sm, s_), vec(tm, t_)
            cos = sum(p * q for p, q in zip(x, y)) / (sum(p * p for p in x) ** 0.5 * sum(q * q for q in y) ** 0.5)
            assert float(got[i, j]) == pytest.approx(max(0.0, cos), abs=1e-9)
    # a model whose heads all attend alike has no centred pattern: similarity 0, not 1
    flat = torch.ones(2, 3, 3, 3).tril()
    assert float(centred_pattern_table(flat, tm, sc, tc).abs().max()) == 0.0


def test_controls_score_below_the_true_pair(trained_pair):
    """Attention similarity: the trained pair (two tokenizers) scores above all four control pairs of both
    kinds. (Debiased CKA of head outputs does not: a copy with re-initialised layers still carries which
    object and label sit at each named position, and scores up to 0.63 against 0.37 for the true pair;
    docs/real-models/README.md.)"""
    teacher, student, _ = trained_pair
    td, sd = named_task_pair("entity_tracking", teacher.tokenizer, student.tokenizer, 32, seed=3, n_boxes=3)
    cmp = compare(teacher, student, td, student_data=sd, kinds=("head",), n_boot=100)
    assert cmp.teacher_sweep.clean["accuracy"] > 0.9 and cmp.student_sweep.clean["accuracy"] > 0.9
    sweeps: dict = {}
    ctl = control_comparisons(teacher, student, td, sd, cmp, controls=("shuffle_heads", "reinit"), sweeps=sweeps,
                              kinds=("head",), n_boot=100)
    assert len(ctl) == 8 and set(sweeps) == {"teacher+shuffle_heads", "student+shuffle_heads", "teacher+reinit",
                                             "student+reinit"}
    for name, c in ctl.items():
        assert c["alignment"] < cmp.alignment, (name, c["alignment"], cmp.alignment)
        assert c["mean_similarity"] < cmp.mean_similarity, (name, c["mean_similarity"], cmp.mean_similarity)
    # the sweeps passed back are reused: the same numbers again
    again = control_comparisons(teacher, student, td, sd, cmp, controls=("reinit",), sweeps=sweeps, kinds=("head",),
                                n_boot=100)
    assert again["reinit: teacher ~ student*"] == ctl["reinit: teacher ~ student*"]
    # the centred patterns separate the true pair from every control by a wider margin (0.108 measured)
    cen = compare(teacher, student, td, student_data=sd, similarity="attention_centred", kinds=("head",), n_boot=100,
                  teacher_sweep=cmp.teacher_sweep, student_sweep=cmp.student_sweep)
    ctl_c = control_comparisons(teacher, student, td, sd, cen, controls=("shuffle_heads", "reinit"), sweeps=sweeps,
                                similarity="attention_centred", kinds=("head",), n_boot=100)
    gap_c = cen.alignment - max(c["alignment"] for c in ctl_c.values())
    assert gap_c > 0.05 and gap_c > cmp.alignment - max(c["alignment"] for c in ctl.values()), gap_c


def test_control_copies(trained_pair):
    teacher = trained_pair[0]
    td = make_task("entity_tracking", teacher.tokenizer, 16, seed=3, n_boxes=3)
    for kind in ("shuffle_heads", "reinit"):
        ctl = control_copy(teacher, kind, seed=0)
        assert ctl.hf is not teacher.hf and ctl.name.endswith(kind)
        base = teacher(td.clean.input_ids, td.clean.attention_mask)
        assert not torch.allclose(ctl(td.clean.input_ids, td.clean.attention_mask), base)
    # shuffling moves whole heads: the multiset of query blocks is unchanged
    ctl = control_copy(teacher, "shuffle_heads", seed=0)

    def q_blocks(m):
        return sorted(float(s.of(m.hf).abs().sum()) for layer in range(m.arch.n_layers)
                      for h in range(m.arch.n_heads) for s in m.arch.head_slices(layer, h).q)

    assert q_blocks(ctl) == pytest.approx(q_blocks(teacher))
    with pytest.raises(ConfigError, match="unknown control"):
        control_copy(teacher, "nothing")


def test_cli_compare_across_tokenizers(two_tokenizers, tmp_path):
    from circuit_distill.cli import main

    root = tmp_path
    t = tiny_model("llama", root / "t", n_layers=1, n_heads=2, n_kv_heads=1, d_model=16, words=WORDS, seed=1)
    s = tiny_model("gpt2", root / "s", n_layers=1, n_heads=2, d_model=16, tokenizer=wordpiece_tokenizer(WORDS, SPLIT),
                   seed=2)
    out = root / "out"
    args = ["compare", "--teacher", str(t), "--student", str(s), "--task", "entity_tracking", "--n", "8",
            "--option", "n_boxes=3", "--kinds", "head", "--controls", "shuffle_heads", "--out", str(out)]
    assert main(args) == 0
    js = json.loads((out / "comparison.json").read_text())
    assert js["named_positions"] == list(NAMES) and len(js["controls"]) == 4
    assert js["similarity"] == "attention_centred"  # the default when the tokenizers differ
    text = (out / "report.html").read_text()
    assert "Across tokenizers" in text and "Control pairs" in text and "student ~ student*" in text
    assert (out / "sweeps" / "student+shuffle_heads.json").is_file()
    # a rerun resumes from the cached sweeps and gives the same numbers
    sweep_files = sorted((out / "sweeps").glob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in sweep_files}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in sweep_files} == before
    assert json.loads((out / "comparison.json").read_text())["alignment"] == js["alignment"]
    # a sweep cached before the keys (no cache_key) is reused on its prompt count and stamped
    legacy = json.loads(sweep_files[0].read_text())
    sweep_files[0].write_text(json.dumps({k: v for k, v in legacy.items() if k != "cache_key"}))
    assert main(args) == 0
    assert json.loads(sweep_files[0].read_text()) == legacy
    # other prompts of the same count (another seed) never reuse the cached sweeps
    old_keys = {p.name: json.loads(p.read_text())["cache_key"] for p in sweep_files}
    assert main(args[:-2] + ["--seed", "1", "--out", str(out)]) == 0
    new_keys = {p.name: json.loads(p.read_text())["cache_key"] for p in sweep_files}
    assert all(new_keys[k] != old_keys[k] for k in old_keys)
    assert main(args[:-4] + ["--controls", "nothing", "--out", str(out)]) == 2
    one = root / "one"
    assert main(args[:-2] + ["--control-sides", "teacher", "--out", str(one)]) == 0
    names = set(json.loads((one / "comparison.json").read_text())["controls"])
    assert names == {"shuffle_heads: teacher* ~ student", "shuffle_heads: teacher ~ teacher*"}


def test_discover_and_match_refuses_two_tokenizers(two_tokenizers):
    from circuit_distill.matching import discover_and_match

    t, s = two_tokenizers
    td = make_task("entity_tracking", t.tokenizer, 4, seed=0, n_boxes=3)
    with pytest.raises(ConfigError, match="one shared tokenizer"):
        discover_and_match(t, s, td, matchers=("ablation",))
