"""The task core: Example -> TaskData builder, the registry and the metrics / evaluate."""

from __future__ import annotations

import pytest
import torch

from circuit_distill.errors import TaskError
from circuit_distill.model.tokenizer import word_level_tokenizer
from circuit_distill.tasks import (
    Example,
    build_task_data,
    evaluate,
    make_task,
    per_example,
    register_task,
    task_names,
    task_vocabulary,
)
from circuit_distill.tasks.registry import TASKS, VOCABULARIES

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "a", ",", "."]


@pytest.fixture(scope="module")
def tok():
    return word_level_tokenizer(WORDS)


def ex(prompt, answer, **kw):
    return Example(prompt=prompt, answer=answer, **kw)


# ---------------------------------------------------------------- build_task_data

@pytest.mark.parametrize("side", ["right", "left"])
def test_positions_map_characters_to_tokens(tok, side):
    examples = [
        ex("the cat sat on the", " mat", wrong_answer=" dog", positions={"subj": 4, "verb": 8},
           corrupted_prompt="the dog ran to a cat , the", corrupted_answer=" cat",
           corrupted_positions={"subj": 4, "verb": 8}),
        ex("a dog ran", " to", wrong_answer=" on", positions={"subj": 2, "verb": 6},
           corrupted_prompt="a cat sat", corrupted_answer=" on", corrupted_positions={"subj": 2, "verb": 6}),
    ]
    d = build_task_data("toy", tok, examples, ["the mat"], padding_side=side)
    assert d.clean.input_ids.shape == d.corrupted.input_ids.shape == (2, 8)  # common width (corrupted longest)
    ids = lambda b, i, p: tok.convert_ids_to_tokens(int(b.input_ids[i, p]))  # noqa: E731
    assert [ids(d.clean, i, d.positions["subj"][i]) for i in range(2)] == ["cat", "dog"]
    assert [ids(d.clean, i, d.positions["verb"][i]) for i in range(2)] == ["sat", "ran"]
    assert [ids(d.corrupted, i, d.corrupted_positions["verb"][i]) for i in range(2)] == ["ran", "sat"]
    assert [ids(d.clean, i, d.positions["last"][i]) for i in range(2)] == ["the", "ran"]
    assert (d.positions["last"] == d.clean.last).all() and (d.corrupted_positions["last"] == d.corrupted.last).all()
    if side == "left":
        assert d.positions["subj"].tolist() == [1 + 3, 1 + 5]  # shifted by each row's padding
    else:
        assert d.positions["subj"].tolist() == [1, 1]
    assert tok.convert_ids_to_tokens(d.answer_ids.tolist()) == ["mat", "to"]
    assert tok.convert_ids_to_tokens(d.wrong_ids.tolist()) == ["dog", "on"]
    assert tok.convert_ids_to_tokens(d.corrupted_answer_ids.tolist()) == ["cat", "on"]
    assert d.reference.input_ids.shape == (1, 2)


def test_wrong_answer_defaults_to_corrupted_answer_and_missing_is_negative(tok):
    d = build_task_data("toy", tok, [ex("the cat", " sat", corrupted_prompt="the dog", corrupted_answer=" ran")], [])
    assert tok.convert_ids_to_tokens(int(d.wrong_ids[0])) == "ran"
    d = build_task_data("toy", tok, [ex("the cat", " sat")], [])
    assert d.wrong_ids.tolist() == [-1] and d.corrupted_answer_ids is None
    assert torch.equal(d.corrupted.input_ids, d.clean.input_ids)  # no corruption: the clean prompts
    assert torch.equal(d.reference.input_ids, d.clean.input_ids)  # no reference: the clean prompts


def test_builder_errors(tok):
    with pytest.raises(TaskError, match="no examples"):
        build_task_data("toy", tok, [], [])
    with pytest.raises(TaskError, match="does not know"):
        build_task_data("toy", tok, [ex("the cat", " zebra")], [])
    with pytest.raises(TaskError, match="the prompt 'the zebra' has words the tokenizer does not know"):
        build_task_data("toy", tok, [ex("the zebra", " sat")], [])
    with pytest.raises(TaskError, match="the corrupted prompt 'a zebra' has words"):
        build_task_data("toy", tok, [ex("the cat", " sat", corrupted_prompt="a zebra")], [])
    with pytest.raises(TaskError, match="a reference prompt has words"):
        build_task_data("toy", tok, [ex("the cat", " sat")], ["the zebra"])
    with pytest.raises(TaskError, match="position 'x' is missing"):
        build_task_data("toy", tok, [ex("the cat", " sat", positions={"x": 0}), ex("a dog", " ran")], [])
    with pytest.raises(TaskError, match="falls on no token"):
        build_task_data("toy", tok, [ex("the cat", " sat", positions={"x": 3})], [])
    with pytest.raises(TaskError, match="every example has a corrupted prompt or none"):
        build_task_data("toy", tok, [ex("the cat", " sat", corrupted_prompt="a dog"), ex("a dog", " ran")], [])
    with pytest.raises(TaskError, match="padding_side"):
        build_task_data("toy", tok, [ex("the cat", " sat")], [], padding_side="middle")
    no_pad = word_level_tokenizer(WORDS)
    no_pad.pad_token = None
    with pytest.raises(TaskError, match="no pad token"):
        build_task_data("toy", no_pad, [ex("the cat", " sat")], [])


def test_multi_token_answer_names_the_pieces():
    from test_tasks import bpe_tok

    t = bpe_tok()
    with pytest.raises(TaskError, match=r"example 0 .*answer ' Qzxvbnmq' is \d tokens for this tokenizer: \["):
        build_task_data("toy", t, [ex(" the cat", " Qzxvbnmq")], [])
    d = build_task_data("toy", t, [ex(" the cat", " Qzxvbnmq")], [], first_token=True)
    assert int(d.answer_ids[0]) == t(" Qzxvbnmq", add_special_tokens=False)["input_ids"][0]


def test_subset_keeps_rows_together(tok):
    data = make_task("ioi", word_level_tokenizer(task_vocabulary("ioi")), 6, seed=0)
    sub = data.subset([4, 1])
    assert sub.prompts == [data.prompts[4], data.prompts[1]]
    assert torch.equal(sub.positions["IO"], data.positions["IO"][[4, 1]])
    assert torch.equal(sub.corrupted.input_ids, data.corrupted.input_ids[[4, 1]])


# ---------------------------------------------------------------- greater-than year formats

def digit_pair_tokenizer():
    """A tokenizer that, like GPT-2, splits " 1732" into " 17" + "32" (built offline)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    for w in task_vocabulary("greater_than"):
        for piece in (w, " " + w):
            vocab.setdefault(piece, len(vocab))
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?\d\d"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>")


def test_greater_than_joined_years_with_a_splitting_tokenizer():
    t = digit_pair_tokenizer()
    assert t.convert_ids_to_tokens(t(" 1732", add_special_tokens=False)["input_ids"]) == [" 17", "32"]
    data = make_task("greater_than", t, 12, seed=0)
    assert data.options["year_format"] == "joined"
    for i, m in enumerate(data.metadata):
        assert f"the year {m['century']}{m['start_yy']:02d} to the year {m['century']}" in data.prompts[i]
        assert t.convert_ids_to_tokens(int(data.answer_ids[i])) == data.answers[i] == f"{m['answer_yy']:02d}"
        p = data.positions
        assert t.decode([int(data.clean.input_ids[i, p["start_yy"][i]])]) == f"{m['start_yy']:02d}"
        assert t.decode([int(data.clean.input_ids[i, p["start_century"][i]])]) == f" {m['century']}"
    assert make_task("greater_than", t, 2, year_format="split").options["year_format"] == "split"
    with pytest.raises(TaskError, match="year_format"):
        make_task("greater_than", t, 2, year_format="roman")


# ---------------------------------------------------------------- registry

def test_registry_errors_and_listing(tok):
    assert {"ioi", "induction", "theory_of_mind", "numerals", "greater_than", "jsonl"} <= set(task_names())
    with pytest.raises(TaskError, match=r"unknown task 'nope'; available: .*ioi"):
        make_task("nope", tok, 2)
    with pytest.raises(TaskError, match=r"task 'ioi' has no option\(s\) colour; its options: order, corruption"):
        make_task("ioi", tok, 2, colour="red")
    with pytest.raises(TaskError, match="n must be >= 1"):
        make_task("ioi", tok, 0)


def test_register_custom_task_and_vocabulary(tok):
    @register_task("_toy_copy", vocabulary=lambda **_: ["the", "cat", "dog"])
    def toy(tokenizer, n, *, seed=0, animal="cat"):
        return build_task_data("_toy_copy", tokenizer, [ex(f"the {animal} the", f" {animal}")] * n, [])

    @register_task("_toy_novocab")
    def toy2(tokenizer, n, *, seed=0):
        return build_task_data("_toy_novocab", tokenizer, [ex("the cat", " sat")] * n, [])

    try:
        assert task_vocabulary("_toy_copy") == ["the", "cat", "dog"]
        d = make_task("_toy_copy", tok, 3, animal="dog")
        assert tok.convert_ids_to_tokens(d.answer_ids.tolist()) == ["dog"] * 3
        with pytest.raises(TaskError, match="does not declare a vocabulary"):
            task_vocabulary("_toy_novocab")

        class FakeModel:  # make_task accepts anything with a .tokenizer (a Model)
            tokenizer = tok

        assert len(make_task("_toy_novocab", FakeModel(), 2)) == 2
    finally:
        for name in ("_toy_copy", "_toy_novocab"):
            TASKS.pop(name, None)
            VOCABULARIES.pop(name, None)


# ---------------------------------------------------------------- metrics

def test_per_example_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    m = per_example(logits, torch.tensor([0, 2]), torch.tensor([1, -1]))
    assert m["accuracy"].tolist() == [1.0, 0.0]
    assert torch.allclose(m["answer_prob"], torch.tensor([logits[0].softmax(0)[0], logits[1].softmax(0)[2]]))
    assert m["logit_diff"][0] == 1.0 and torch.isnan(m["logit_diff"][1])


def test_evaluate_equals_hand_computation(tmp_path):
    from circuit_distill.model import load_model, tiny_model

    vocab = task_vocabulary("ioi")
    path = tiny_model("llama", tmp_path / "llama", n_kv_heads=2, tokenizer=word_level_tokenizer(vocab), seed=3)
    model = load_model(path, check=False)
    data = make_task("ioi", model, 7, seed=1)
    assert (data.clean.attention_mask == 0).any()  # rows of different length: padding is exercised
    got = evaluate(model, data, batch_size=3)
    acc, prob, diff = [], [], []
    with torch.no_grad():
        for i in range(len(data)):
            n_real = int(data.clean.attention_mask[i].sum())
            row = data.clean.input_ids[i, :n_real][None]
            last = model.hf(input_ids=row).logits[0, -1].float()
            a, w = int(data.answer_ids[i]), int(data.wrong_ids[i])
            acc.append(float(last.argmax() == a))
            prob.append(float(last.softmax(-1)[a]))
            diff.append(float(last[a] - last[w]))
    assert got["accuracy"] == pytest.approx(sum(acc) / len(acc))
    assert got["answer_prob"] == pytest.approx(sum(prob) / len(prob), rel=1e-4)
    assert got["logit_diff"] == pytest.approx(sum(diff) / len(diff), rel=1e-4, abs=1e-5)
    # at another named position the metrics change (the model is scored there instead)
    assert evaluate(model, data, position="S2")["answer_prob"] != pytest.approx(got["answer_prob"])


def sentencepiece_like_tokenizer():
    """A Llama-style tokenizer (Metaspace, ``▁`` word prefix) built offline: " Mary" on its own is
    ``["▁", "▁Mary"]`` but after a prompt it is ``["▁Mary"]``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "▁": 2}
    for w in WORDS + ["Mary", "John"]:
        vocab.setdefault("▁" + w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])  # as Llama's
    t.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>")


def test_answers_are_tokenised_as_they_continue_the_prompt():
    t = sentencepiece_like_tokenizer()
    assert t.convert_ids_to_tokens(t(" Mary", add_special_tokens=False)["input_ids"]) == ["▁", "▁Mary"]
    d = build_task_data("toy", t, [ex("the cat ran to", " Mary", wrong_answer=" John", positions={"cat": 4})], [])
    assert t.convert_ids_to_tokens(d.answer_ids.tolist()) == ["▁Mary"]
    assert t.convert_ids_to_tokens(d.wrong_ids.tolist()) == ["▁John"]
    assert t.convert_ids_to_tokens(int(d.clean.input_ids[0, d.positions["cat"][0]])) == "▁cat"


def test_slow_tokenizer_is_a_clear_error(tok):
    class Slow:
        pad_token_id = 0
        unk_token_id = None

        def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
            return tok(text, add_special_tokens=add_special_tokens)

    with pytest.raises(TaskError, match="needs a fast tokenizer"):
        build_task_data("toy", Slow(), [ex("the cat", " sat")], [])
