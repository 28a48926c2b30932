"""Answer words that fit the tokenizer: every generator narrows its built-in answer pool to the words
the tokenizer keeps whole, keeps the built-in pool (same data) when it keeps them all, is deterministic,
says how many are left, and fails clearly when too few are."""

from __future__ import annotations

import pytest

from circuit_distill.errors import TaskError
from circuit_distill.model.tokenizer import numbered_vocabulary, word_level_tokenizer
from circuit_distill.tasks import make_task, task_vocabulary
from circuit_distill.tasks.entity_tracking import OBJECTS
from circuit_distill.tasks.ioi import NAMES
from circuit_distill.tasks.theory_of_mind import DRINKS
from circuit_distill.tasks.words import fitted_pool, keeps_whole, whole_words


def subword_tok(split: set[str], tasks=("entity_tracking", "ioi", "theory_of_mind")):
    """A word-level tokenizer that knows every word of ``tasks`` whole except ``split``, which it only
    knows as two pieces (all but the last character, then the last): like a BPE that splits " eggnog"
    into " egg" + "nog", or " 77" into " 7" + "7"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in tasks for w in task_vocabulary(t)})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>"] + [w for w in words if w not in split])}
    for w in split:
        for piece in (w[:-1], "##" + w[-1]):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_whole_words_keeps_order_and_drops_split_and_unknown_words():
    tok = subword_tok({"eggnog", "bell"})
    assert len(tok(" eggnog", add_special_tokens=False)["input_ids"]) == 2
    assert keeps_whole(tok, " magnet", "Box B contains the") and not keeps_whole(tok, " eggnog", "Box B contains the")
    assert whole_words(tok, ["bell", "apple", "eggnog", "zebra", "magnet"], context="the") == ["apple", "magnet"]
    assert fitted_pool(tok, ["bell", "apple"], task="t", kind="objects", need=5, context="the",
                       first_token=True) == ["bell", "apple"]
    with pytest.raises(TaskError, match=r"t: only 1 of the 2 built-in objects are single tokens for this tokenizer "
                                        r"\(it splits e\.g\. ' bell'\); 2 are needed\. Hint\. Or pass first_token=True"):
        fitted_pool(tok, ["bell", "apple"], task="t", kind="objects", need=2, context="the", hint="Hint.")


def test_a_tokenizer_that_keeps_every_word_gets_the_built_in_pool():
    tok = word_level_tokenizer(task_vocabulary("entity_tracking"))
    data = make_task("entity_tracking", tok, 50, seed=4, n_boxes=(2, 7))
    assert data.options["word_pools"] == {"objects": len(OBJECTS)}
    # the same draw as with the pool passed explicitly (which is used as given)
    same = make_task("entity_tracking", tok, 50, seed=4, n_boxes=(2, 7), objects=list(OBJECTS))
    assert same.prompts == data.prompts and same.answers == data.answers


@pytest.mark.parametrize("task,pool,drop,option,key", [
    ("entity_tracking", OBJECTS, {"eggnog", "magnet", "bell"}, {"n_boxes": (2, 7)}, "objects"),
    ("ioi", NAMES, {"Mary", "John", "Sid"}, {}, "names"),
    ("theory_of_mind", DRINKS, {"beer", "tea"}, {}, "drinks"),
])
def test_split_answer_words_are_left_out(task, pool, drop, option, key):
    tok = subword_tok(drop)
    data = make_task(task, tok, 60, seed=1, **option)
    assert data.options["word_pools"] == {key: len(pool) - len(drop)}
    words = {a.strip() for a in data.answers} | {tok.decode([int(w)]).strip() for w in data.wrong_ids}
    assert not words & drop and len(words) > 3
    again = make_task(task, tok, 60, seed=1, **option)
    assert again.prompts == data.prompts and again.answers == data.answers  # deterministic for a seed
    if task != "theory_of_mind":  # the same pool passed explicitly is used as given, and splits
        with pytest.raises(TaskError, match="tokens for this tokenizer"):
            make_task(task, tok, 60, seed=1, **option, **{key: list(pool)})


def test_too_few_objects_left_is_a_clear_error():
    tok = subword_tok(set(OBJECTS[5:]))  # only 5 objects stay whole
    assert len(make_task("entity_tracking", tok, 10, seed=0, n_boxes=5)) == 10
    with pytest.raises(TaskError, match=r"only 5 of the 24 built-in objects .* 6 are needed\. Pass objects="):
        make_task("entity_tracking", tok, 10, seed=0, n_boxes=6)
    data = make_task("entity_tracking", tok, 10, seed=0, n_boxes=6, first_token=True)  # scores the first piece
    assert data.options["word_pools"] == {"objects": 24}


def test_numerals_draw_answers_and_wrong_answers_the_tokenizer_keeps():
    vocab = task_vocabulary("numerals")
    missing = {"17", "40", "41", "42", "77"}
    tok = subword_tok(missing, tasks=("numerals",))
    data = make_task("numerals", tok, 80, seed=2, padding_side="right", **{"n_reference": 5})
    ends = {a.strip() for a in data.answers} | {tok.decode([int(w)]) for w in data.wrong_ids}
    assert not ends & missing and data.options["word_pools"] == {"numbers": len(vocab) - len(missing)}
    full = make_task("numerals", word_level_tokenizer(vocab), 80, seed=2, n_reference=5)
    assert full.options["word_pools"] == {"numbers": 100}


def test_numerals_and_greater_than_on_a_digit_splitting_tokenizer():
    # a tokenizer that spells numbers from 10 up digit by digit (SmolLM2's and Gemma 3's split all of them)
    digits = subword_tok({w for w in task_vocabulary("numerals") if len(w) == 2}, tasks=("numerals",))
    data = make_task("numerals", digits, 30, seed=0, length=(3, 6))
    assert data.options["word_pools"] == {"numbers": 10} and all(m["answer"] <= 9 for m in data.metadata)
    with pytest.raises(TaskError, match=r"numerals: only 10 of the numbers 0\.\.99 \(digits\) are single tokens "
                                        r"for this tokenizer \(it splits e\.g\. ' 10'.*too few for 9 terms.*style='words'"):
        make_task("numerals", digits, 5, seed=0, length=(3, 9))
    vocab = [w for w in task_vocabulary("greater_than") if not (len(w) == 2 and w.isdigit())]
    with pytest.raises(TaskError, match=r"greater_than: only 0 of the 100 two-digit endings .*first_token=True"):
        make_task("greater_than", word_level_tokenizer(vocab + list("0123456789")), 5, seed=0)


def test_greater_than_keeps_answers_the_tokenizer_keeps():
    drop = {f"{y:02d}" for y in range(50, 60)}
    tok = subword_tok(drop, tasks=("greater_than",))
    data = make_task("greater_than", tok, 60, seed=3)
    assert data.options["word_pools"] == {"endings": 90}
    for m in data.metadata:
        assert f"{m['answer_yy']:02d}" not in drop and f"{m['wrong_yy']:02d}" not in drop
        assert m["wrong_yy"] < m["start_yy"] < m["answer_yy"]


def test_induction_narrows_the_numbered_words_and_points_to_from_tokenizer():
    words = numbered_vocabulary(64)
    tok = word_level_tokenizer(words)
    assert make_task("induction", tok, 4, seed=0).options["word_pools"] == {"words": len(words)}
    split = subword_tok({w for w in words if len(w) == 3}, tasks=("induction",))  # " w17" -> " w1" + "7"
    data = make_task("induction", split, 4, seed=0, segment_len=(2, 6))  # needs 10 words
    assert data.options["word_pools"] == {"words": 10}
    assert all(len(w) == 2 for m in data.metadata for w in m["words"])
    with pytest.raises(TaskError, match=r"induction: only 10 of the 60 built-in numbered words .* 12 are needed\. "
                                        r"Pass words='from_tokenizer'.*first_token=True"):
        make_task("induction", split, 4, seed=0)  # segments of up to 8 words need 12
