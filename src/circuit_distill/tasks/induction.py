"""Induction / copying on repeated random token sequences.

A prompt is ``seq_len`` random words: filler, a random *segment*, more filler, then the first
``k`` words of the segment again. The answer is the segment's word ``k`` -- the word that followed
the current (last) word at its earlier occurrence::

    "w7 w30 | w12 w5 w44 w9 | w21 w3 w18 | w12 w5" -> " w44"

The filler lengths and ``k`` are random per example, so the distance between the two copies and
the position of the answer vary and no positional shortcut predicts it. Segment words are distinct
and never occur in the filler, so the current word's earlier occurrence is unique.

Named positions (clean and corrupted prompts share them; both have ``seq_len`` words):

- ``earlier``: the earlier occurrence of the current (last) word.
- ``earlier_next``: the word after it (the answer's earlier occurrence).
- ``segment_start`` / ``repeat_start``: first word of the segment and of its repeat.
- ``last``: the current word (added by the builder).

Corruptions (``corruption``): ``"answer"`` replaces the answer's earlier occurrence by another word
(the corrupted answer is that word, and it is also the clean wrong answer); ``"segment"`` replaces
the whole first copy of the segment by fresh words (no word to copy: there is no corrupted answer,
and the wrong answer is a random word absent from the prompt).
"""

from __future__ import annotations

import random

from ..errors import TaskError
from ..model.tokenizer import numbered_vocabulary
from .base import TaskData
from .build import Example, build_task_data
from .registry import register_task
from .words import fitted_pool

CORRUPTIONS = ("answer", "segment")
SPLITS = ("train", "test")


def _words(words: list[str] | None, vocab_size: int, split: str | None) -> list[str]:
    items = list(words) if words is not None else numbered_vocabulary(vocab_size)
    if len(set(items)) != len(items):
        raise TaskError("induction: words must be distinct")
    bad = [w for w in items if not w or any(c.isspace() for c in w)]
    if bad:
        raise TaskError(f"induction: words must be non-empty and contain no whitespace, got {bad[:3]}")
    if split is None:
        return items
    if split not in SPLITS:
        raise TaskError(f"split must be 'train', 'test' or None, got {split!r}")
    return items[0::2] if split == "train" else items[1::2]


def tokenizer_words(tokenizer, count: int) -> list[str]:
    """The first ``count`` alphabetic words (by token id) that ``tokenizer`` keeps as one token
    after a space -- a word pool for subword tokenizers, where ``w17`` would split."""
    out: list[str] = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        word = text[1:]
        if text.startswith(" ") and word.isalpha() and word.isascii() and len(word) > 1 \
                and tokenizer(text, add_special_tokens=False)["input_ids"] == [i]:
            out.append(word)
            if len(out) == count:
                break
    return out


def vocabulary(*, words: list[str] | None = None, vocab_size: int = 64, split: str | None = None,
               **_) -> list[str]:
    """Every word an ``induction`` prompt or answer can contain (for a word-level tokenizer)."""
    return _words(words, vocab_size, split)


def _example(rng: random.Random, pool: list[str], seq_len: int, seg_min: int, seg_max: int,
             corruption: str) -> Example:
    seg_len = rng.randint(seg_min, seg_max)
    k = rng.randint(1, seg_len - 1)  # words of the segment repeated before the answer
    free = seq_len - seg_len - k  # filler words, at least 2: one before the segment, one in the gap
    pre = rng.randint(1, free - 1)
    gap = free - pre
    chosen = rng.sample(pool, seg_len + 2)
    segment, spare = chosen[:seg_len], chosen[seg_len:]
    others = [w for w in pool if w not in set(segment)]
    filler = [rng.choice(others) for _ in range(free)]
    words = filler[:pre] + segment + filler[pre:] + segment[:k]
    seg_at, rep_at = pre, pre + seg_len + gap
    c_words = list(words)
    if corruption == "answer":
        c_words[seg_at + k] = spare[0]
        c_answer, wrong = " " + spare[0], " " + spare[0]
    else:
        fresh = rng.sample([w for w in others if w not in set(filler)] or others, seg_len)
        c_words[seg_at:seg_at + seg_len] = fresh
        c_answer = None
        absent = [w for w in pool if w not in set(words)]
        wrong = " " + (rng.choice(absent) if absent else spare[0])

    def text_and_starts(ws: list[str]) -> tuple[str, list[int]]:
        starts, pos = [], 0
        for w in ws:
            pos += 1  # every word is preceded by a space (BPE tokenizers keep " w" whole)
            starts.append(pos)
            pos += len(w)
        return "".join(" " + w for w in ws), starts

    prompt, starts = text_and_starts(words)
    c_prompt, c_starts = text_and_starts(c_words)

    def named(st: list[int]) -> dict[str, int]:
        return {"earlier": st[seg_at + k - 1], "earlier_next": st[seg_at + k],
                "segment_start": st[seg_at], "repeat_start": st[rep_at]}

    return Example(
        prompt=prompt, answer=" " + segment[k], wrong_answer=wrong, corrupted_prompt=c_prompt,
        corrupted_answer=c_answer, positions=named(starts), corrupted_positions=named(c_starts),
        metadata={"words": words, "segment": segment, "k": k, "segment_start": seg_at,
                  "repeat_start": rep_at, "distance": rep_at - seg_at, "corrupted_words": c_words, "corrupted_prompt": c_prompt},
    )


@register_task("induction", vocabulary=vocabulary)
def induction(tokenizer, n: int, *, seed: int = 0, words: list[str] | str | None = None, vocab_size: int = 64,
              seq_len: int = 24, segment_len: int | tuple[int, int] = (3, 8), corruption: str = "answer",
              split: str | None = None, first_token: bool = False,
              n_reference: int | None = None, padding_side: str = "right") -> TaskData:
    """``n`` induction prompts of ``seq_len`` words each (see the module docstring).

    ``words`` is the word pool (default ``numbered_vocabulary(vocab_size)``: ``w0 .. wK``, which a
    ``word_level_tokenizer`` over the same list keeps whole), or ``"from_tokenizer"``: the first
    ``vocab_size`` alphabetic words the tokenizer keeps whole after a space (for BPE tokenizers,
    which split ``w17``; the numbered default is narrowed to the words the tokenizer keeps whole,
    ``options["word_pools"]``); ``segment_len`` an int or an
    inclusive ``(min, max)`` range; ``split`` ``"train"``/``"test"`` uses disjoint halves of the
    pool; ``first_token`` scores only the first token of multi-token answers.

    ``n_reference`` mean-ablation prompts (default ``n``) come from a stream independent of the
    examples; ``padding_side`` is ``"right"`` or ``"left"``.
    """
    if words == "from_tokenizer":
        words = tokenizer_words(tokenizer, vocab_size)
    pool = _words(words, vocab_size, split)
    seg_min, seg_max = (segment_len, segment_len) if isinstance(segment_len, int) else tuple(segment_len)
    if not 2 <= seg_min <= seg_max:
        raise TaskError(f"induction: segment_len must be >= 2 (min <= max), got {segment_len!r}")
    if seq_len < 2 * seg_max + 1:
        raise TaskError(f"induction: seq_len {seq_len} is too short for segments of up to {seg_max} words; "
                        f"use seq_len >= {2 * seg_max + 1}")
    if corruption not in CORRUPTIONS:
        raise TaskError(f"induction: corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    if len(pool) < seg_max + 4:
        raise TaskError(f"induction: the word pool has {len(pool)} words; need at least {seg_max + 4} "
                        "(raise vocab_size or pass more words)")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        unknown = [w for w in pool if unk in tokenizer(" " + w, add_special_tokens=False)["input_ids"]]
        if unknown:
            raise TaskError(f"induction: {len(unknown)} of {len(pool)} words are unknown to the tokenizer "
                            f"(e.g. {unknown[:3]}); pass vocab_size= matching the tokenizer's numbered "
                            "vocabulary, or words= it covers, or words='from_tokenizer'")
    if words is None:  # the numbered words, narrowed to those this tokenizer keeps whole
        pool = fitted_pool(tokenizer, pool, task="induction", kind="numbered words", need=seg_max + 4,
                           context=" the", first_token=first_token,
                           hint="Pass words='from_tokenizer' (words it keeps whole) or words= of your own.")
    rng = random.Random(seed)
    examples = [_example(rng, pool, seq_len, seg_min, seg_max, corruption) for _ in range(n)]
    if n_reference is not None and n_reference < 1:
        raise TaskError(f"induction: n_reference must be >= 1, got {n_reference}")
    rng = random.Random(f"reference:{seed}")  # an independent stream: clean data does not depend on it
    reference = [_example(rng, pool, seq_len, seg_min, seg_max, corruption).prompt for _ in range(n_reference or n)]
    return build_task_data("induction", tokenizer, examples, reference, first_token=first_token, padding_side=padding_side,
                           options={"words": words, "vocab_size": vocab_size, "seq_len": seq_len,
                                    "segment_len": segment_len, "corruption": corruption, "split": split,
                                    "first_token": first_token, "n_reference": n_reference,
                                    "padding_side": padding_side, "seed": seed,
                                    "word_pools": {"words": len(pool)}})
