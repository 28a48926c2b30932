"""The entity-tracking task: answers by construction, named positions, corruptions, determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuit_distill.errors import TaskError
from circuit_distill.model import word_level_tokenizer
from circuit_distill.tasks import make_task, task_vocabulary
from circuit_distill.tasks.entity_tracking import LABELS, OBJECTS, parse_boxes


@pytest.fixture(scope="module")
def tok():
    return word_level_tokenizer(task_vocabulary("entity_tracking"))


def _tokens(tok, batch, i):
    return tok.convert_ids_to_tokens(batch.input_ids[i][batch.attention_mask[i].bool()].tolist())


def _check(tok, data):
    """Every invariant of one TaskData: answer by construction, positions on the right tokens."""
    for i, meta in enumerate(data.metadata):
        toks = _tokens(tok, data.clean, i)
        q, ans = meta["query"], meta["answer"]
        assert meta["boxes"][q] == ans
        assert data.answers[i] == f" {ans}"
        assert tok.convert_ids_to_tokens(int(data.answer_ids[i])) == ans
        assert data.prompts[i].endswith(f"Box {q} contains the")
        pos = {k: int(v[i]) for k, v in data.positions.items()}
        assert toks[pos["query_label"]] == q and toks[pos["query_label"] - 1] == "Box"
        assert toks[pos["earlier_label"]] == q and pos["earlier_label"] < pos["query_label"]
        assert toks[pos["object"]] == ans and pos["object"] < pos["earlier_label"]
        assert pos["last"] == len(toks) - 1 and toks[-1] == "the"
        # the wrong answer is another object of the same context
        wrong = tok.convert_ids_to_tokens(int(data.wrong_ids[i]))
        assert wrong != ans and wrong in meta["boxes"].values()
        # no box is named twice before the question and every object is distinct
        labels = [p[1] for p in meta["placements"]] + [m[2] for m in meta["moves"]]
        assert len(set(labels)) == len(labels)
        assert len({p[0] for p in meta["placements"]}) == len(meta["placements"])


def _parse(context: str) -> dict[str, str]:
    """label -> object from "The <obj> is in Box <label>, the <obj> is in Box <label>" (no operations)."""
    put = {}
    for clause in context.split(", the "):
        words = clause.replace("The ", "").split()
        put[words[-1]] = words[0]
    return put


def test_prompt_format_and_answer(tok):
    data = make_task("entity_tracking", tok, 20, seed=3)
    _check(tok, data)
    p = data.prompts[0]
    assert p.startswith("The ") and ", the " in p and ". Box " in p
    assert all(m["n_boxes"] == 7 and len(m["boxes"]) == 7 for m in data.metadata)
    # punctuation is split off by the word-level tokenizer: the label is its own token
    assert "," in _tokens(tok, data.clean, 0)


def test_answer_is_object_put_in_queried_box_by_parsing(tok):
    data = make_task("entity_tracking", tok, 30, seed=1, n_boxes=(2, 9))
    for prompt, answer in zip(data.prompts, data.answers):
        context, question = prompt.rsplit(". Box ", 1)
        assert answer == f" {_parse(context)[question.split()[0]]}"


@pytest.mark.parametrize("corruption", ["query", "objects"])
def test_shots_are_solved_examples_before_the_same_prompts(tok, corruption):
    base = make_task("entity_tracking", tok, 12, seed=4, n_boxes="2-4", corruption=corruption)
    data = make_task("entity_tracking", tok, 12, seed=4, n_boxes="2-4", corruption=corruption, n_shots=2)
    _check(tok, data)
    assert data.options["n_shots"] == 2 and base.options["n_shots"] == 0
    for i, meta in enumerate(data.metadata):
        prefix, prompt = data.prompts[i][:-len(base.prompts[i])], base.prompts[i]
        assert data.prompts[i].endswith(prompt) and prefix.endswith("\n\n")
        shots = prefix.split("\n\n")[:-1]
        assert len(shots) == 2
        c_prompt = tok.decode(data.corrupted.input_ids[i][data.corrupted.attention_mask[i].bool()])
        assert c_prompt.startswith(tok.decode(tok(prefix)["input_ids"]))  # the corrupted prompt keeps the shots
        shift = len(_tokens(tok, data.clean, i)) - len(_tokens(tok, base.clean, i))  # the shots' tokens
        own = {w for p in meta["placements"] for w in p}
        if corruption == "objects":
            own |= set(_tokens(tok, data.corrupted, i)[shift:]) & set(OBJECTS)
        for shot in shots:  # "<context>. Box T contains the <answer>."
            context, question = shot.rsplit(". Box ", 1)
            label, _, _, answer = question.rstrip(".").split()
            put = _parse(context)
            assert put[label] == answer and len(put) == meta["n_boxes"]
            assert not own & (set(put) | set(put.values()))  # no word of the prompt (or its corruption)
        for name in ("query_label", "earlier_label", "object", "last"):  # the shots shift every position
            assert int(data.positions[name][i]) == int(base.positions[name][i]) + shift
            assert int(data.corrupted_positions[name][i]) == int(base.corrupted_positions[name][i]) + shift
    same = make_task("entity_tracking", tok, 12, seed=4, n_boxes="2-4", corruption=corruption, n_shots=2)
    assert same.prompts == data.prompts and torch.equal(same.reference.input_ids, data.reference.input_ids)
    contains = tok.convert_tokens_to_ids("contains")
    assert ((data.reference.input_ids == contains).sum(1) == 3).all()  # two solved shots and the question


def test_query_corruption_with_shots_changes_only_the_query(tok):
    data = make_task("entity_tracking", tok, 10, seed=6, n_boxes=3, n_shots=3)
    for i in range(len(data)):
        a, b = _tokens(tok, data.clean, i), _tokens(tok, data.corrupted, i)
        assert [j for j in range(len(a)) if a[j] != b[j]] == [int(data.positions["query_label"][i])]


def test_query_corruption_aligns(tok):
    data = make_task("entity_tracking", tok, 25, seed=2, corruption="query")
    assert data.clean.input_ids.shape == data.corrupted.input_ids.shape
    for i, meta in enumerate(data.metadata):
        a, b = _tokens(tok, data.clean, i), _tokens(tok, data.corrupted, i)
        assert len(a) == len(b)
        diff = [j for j in range(len(a)) if a[j] != b[j]]
        assert diff == [int(data.positions["query_label"][i])]  # only the question's label changes
        c_ans = tok.convert_ids_to_tokens(int(data.corrupted_answer_ids[i]))
        assert c_ans == meta["boxes"][b[diff[0]]] != meta["answer"]
        assert int(data.corrupted_positions["last"][i]) == int(data.positions["last"][i])


def test_objects_corruption_aligns(tok):
    data = make_task("entity_tracking", tok, 25, seed=2, corruption="objects")
    for i, meta in enumerate(data.metadata):
        a, b = _tokens(tok, data.clean, i), _tokens(tok, data.corrupted, i)
        assert len(a) == len(b)
        diff = [j for j in range(len(a)) if a[j] != b[j]]
        objects = {p[0] for p in meta["placements"]}
        assert {a[j] for j in diff} == objects
        assert not objects & {b[j] for j in diff}  # every object replaced by a new one
        c_ans = tok.convert_ids_to_tokens(int(data.corrupted_answer_ids[i]))
        assert c_ans == b[int(data.corrupted_positions["object"][i])] != meta["answer"]
        for name in ("query_label", "earlier_label", "object", "last"):
            assert int(data.corrupted_positions[name][i]) == int(data.positions[name][i])


def test_same_seed_same_data(tok):
    a = make_task("entity_tracking", tok, 15, seed=7, n_boxes="3-6")
    b = make_task("entity_tracking", tok, 15, seed=7, n_boxes="3-6")
    c = make_task("entity_tracking", tok, 15, seed=8, n_boxes="3-6")
    assert a.prompts == b.prompts and torch.equal(a.clean.input_ids, b.clean.input_ids)
    assert torch.equal(a.reference.input_ids, b.reference.input_ids)
    assert a.prompts != c.prompts


def test_moves_and_removes(tok):
    data = make_task("entity_tracking", tok, 40, seed=5, n_boxes=5, n_moves=2, n_removes=1)
    _check(tok, data)
    moved_queries = 0
    for i, meta in enumerate(data.metadata):
        assert len(meta["boxes"]) == 4  # 5 filled, moves keep the count, one removal
        assert "moved to Box" in data.prompts[i] and "removed from Box" in data.prompts[i]
        for obj, lab in meta["removes"]:
            assert lab not in meta["boxes"] and obj not in meta["boxes"].values()
        if meta["query"] in {m[2] for m in meta["moves"]}:
            moved_queries += 1
            toks = _tokens(tok, data.clean, i)
            assert toks[int(data.positions["earlier_label"][i]) - 2] == "to"  # "... moved to Box T"
    assert moved_queries > 0


def test_splits_are_disjoint(tok):
    tr = make_task("entity_tracking", tok, 30, seed=0, split="train", n_boxes=5)
    te = make_task("entity_tracking", tok, 30, seed=0, split="test", n_boxes=5)
    words = lambda d: {w for m in d.metadata for p in m["placements"] for w in p}
    assert not words(tr) & words(te)
    assert words(tr) <= set(OBJECTS[0::2]) | set(LABELS[0::2])


def test_bad_options(tok):
    with pytest.raises(TaskError, match="corruption"):
        make_task("entity_tracking", tok, 2, corruption="labels")
    with pytest.raises(TaskError, match="distinct objects"):
        make_task("entity_tracking", tok, 2, n_boxes=len(OBJECTS) + 1)
    with pytest.raises(TaskError, match="n_boxes"):
        parse_boxes("7-3")
    with pytest.raises(TaskError, match="n_shots=1"):  # shots need objects and labels of their own
        make_task("entity_tracking", tok, 2, n_boxes=13, n_shots=1)
    with pytest.raises(TaskError, match=">= 0"):
        make_task("entity_tracking", tok, 2, n_shots=-1)
    with pytest.raises(TaskError, match="no option"):
        make_task("entity_tracking", tok, 2, boxes=3)
    assert parse_boxes("2-7") == parse_boxes((2, 7)) == (2, 7) and parse_boxes(4) == (4, 4)


@settings(max_examples=25, deadline=None)
@given(lo=st.integers(2, 12), extra=st.integers(0, 4), seed=st.integers(0, 10_000),
       corruption=st.sampled_from(["query", "objects"]), moves=st.integers(0, 2), shots=st.integers(0, 2))
def test_property_positions_and_answers(tok, lo, extra, seed, corruption, moves, shots):
    hi = min(lo + extra, 12 if corruption == "objects" else 20)
    if shots:
        hi = min(hi, 8 if corruption == "objects" else 10)
        lo = min(lo, hi)
    data = make_task("entity_tracking", tok, 6, seed=seed, n_boxes=(lo, hi), corruption=corruption,
                     n_moves=moves, n_shots=shots)
    _check(tok, data)
    assert all(lo <= m["n_boxes"] <= hi for m in data.metadata)


def _bpe_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["The box is in Box B, the map is in Box C. Box C contains the map."] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>")


def test_multi_token_answers_raise_with_bpe():
    bpe = _bpe_tokenizer()
    assert len(bpe(" eggnog", add_special_tokens=False)["input_ids"]) > 1
    with pytest.raises(TaskError, match="tokens for this tokenizer"):
        make_task("entity_tracking", bpe, 5, seed=0)
    data = make_task("entity_tracking", bpe, 5, seed=0, first_token=True)
    for i, meta in enumerate(data.metadata):
        assert int(data.answer_ids[i]) == bpe(f" {meta['answer']}", add_special_tokens=False)["input_ids"][0]
        toks = bpe.convert_ids_to_tokens(data.clean.input_ids[i].tolist())
        assert meta["query"] in toks[int(data.positions["query_label"][i])]
