"""Greater-than (Hanna et al. 2023).

    "The war lasted from the year 1732 to the year 17" -> "45" (any two digits above 32)

The start year is century ``XX`` and two digits ``YY`` (02 .. 98); the prompt ends with the
century again and the model should continue with two digits above ``YY``. The answer is one such
valid continuation (drawn at random above ``YY``), the wrong answer one below it; ``metadata``
holds the start year so ``P(> YY)`` can be computed from the full distribution.

``year_format``: ``"joined"`` writes years as one word ("1732", "to the year 17" -> "45", no
space: the GPT-2 tokenizer splits "1732" into "17" + "32"); ``"split"`` writes "17 32" (for
word-level tokenizers, which keep "1732" whole); ``"auto"`` (default) uses ``joined`` when the
tokenizer splits every year used into century + two digits and ``split`` otherwise.

Named positions: ``start_century`` and ``start_yy`` (the start year's two parts), ``end_century``
(the final century, also ``last``). The corrupted prompt starts at ``XX01`` (Hanna et al.), where
every continuation but 00 and 01 is greater, so it has no corrupted answer.
"""

from __future__ import annotations

import random

from ..errors import TaskError
from .base import TaskData
from .build import Example, build_task_data
from .registry import register_task
from .words import whole_words

NOUNS: tuple[str, ...] = ("war", "expedition", "drought", "famine", "reign", "project", "contract", "journey",
                          "strike", "siege", "voyage", "dynasty")
CENTURIES: tuple[int, ...] = (11, 12, 13, 14, 15, 16, 17)
TEMPLATE = "The {noun} lasted from the year {start} to the year {cc}"
FORMATS = ("auto", "joined", "split")


def vocabulary(**_) -> list[str]:
    """Every word a ``greater_than`` prompt or answer can contain (for a word-level tokenizer)."""
    return (["The", "lasted", "from", "the", "year", "to"] + list(NOUNS) + [str(c) for c in CENTURIES]
            + [f"{y:02d}" for y in range(100)])


def _splits_years(tokenizer) -> bool:
    for c in CENTURIES:
        want = tokenizer(f" {c}", add_special_tokens=False)["input_ids"]
        for y in range(100):
            ids = tokenizer(f" {c}{y:02d}", add_special_tokens=False)["input_ids"]
            if len(want) != 1 or ids[:1] != want or len(ids) != 2 or ids[1:] != tokenizer(
                    f"{y:02d}", add_special_tokens=False)["input_ids"]:
                return False
    return True


def _prompt(noun: str, cc: int, yy: int, joined: bool) -> tuple[str, dict[str, int]]:
    start = f"{cc}{yy:02d}" if joined else f"{cc} {yy:02d}"
    text = TEMPLATE.format(noun=noun, start=start, cc=cc)
    s = text.index(" from the year ") + len(" from the year ")
    return text, {"start_century": s, "start_yy": s + (2 if joined else 3), "end_century": len(text) - 2}


def _example(rng: random.Random, joined: bool, whole: set[int] | None = None) -> Example:
    ok = (lambda y: True) if whole is None else whole.__contains__
    noun, cc = rng.choice(NOUNS), rng.choice(CENTURIES)
    starts = [y for y in range(2, 99) if whole is None or (min(whole) < y < max(whole))]
    yy = starts[rng.randint(0, len(starts) - 1)]
    prompt, pos = _prompt(noun, cc, yy, joined)
    c_prompt, c_pos = _prompt(noun, cc, 1, joined)
    sep = "" if joined else " "
    above, below = [y for y in range(yy + 1, 100) if ok(y)], [y for y in range(yy) if ok(y)]
    good, bad = above[rng.randint(0, len(above) - 1)], below[rng.randint(0, len(below) - 1)]
    return Example(prompt=prompt, answer=f"{sep}{good:02d}", wrong_answer=f"{sep}{bad:02d}",
                   corrupted_prompt=c_prompt, positions=pos, corrupted_positions=c_pos,
                   metadata={"noun": noun, "century": cc, "start_yy": yy, "answer_yy": good, "wrong_yy": bad,
                             "year_format": "joined" if joined else "split", "corrupted_prompt": c_prompt})


def whole_endings(tokenizer, joined: bool) -> set[int]:
    """The two-digit endings ``00 .. 99`` the tokenizer keeps whole after "to the year 17"; a
    ``TaskError`` when no start year has one above and one below it."""
    endings = [f"{y:02d}" for y in range(100)]
    context = _prompt(NOUNS[0], 17, 32, joined)[0]
    whole = {int(w) for w in whole_words(tokenizer, endings, context=context, prefix="" if joined else " ")}
    if len(whole) < 2 or max(whole) - min(whole) < 2:
        raise TaskError(f"greater_than: only {len(whole)} of the 100 two-digit endings are single tokens for this "
                        f"tokenizer after {context[-16:]!r} (it splits numbers into digits); the task needs a "
                        "tokenizer that keeps two-digit numbers whole (GPT-2's does), or pass first_token=True "
                        "to score the first token only")
    return whole


@register_task("greater_than", vocabulary=vocabulary)
def greater_than(tokenizer, n: int, *, seed: int = 0, year_format: str = "auto",
                 first_token: bool = False,
                 n_reference: int | None = None, padding_side: str = "right") -> TaskData:
    """``n`` greater-than prompts (see the module docstring). Answers and wrong answers are drawn from
    the two-digit endings the tokenizer keeps whole (``options["word_pools"]``).

    ``n_reference`` mean-ablation prompts (default ``n``) come from a stream independent of the
    examples; ``padding_side`` is ``"right"`` or ``"left"``.
    """
    if year_format not in FORMATS:
        raise TaskError(f"greater_than: year_format must be one of {FORMATS}, got {year_format!r}")
    joined = _splits_years(tokenizer) if year_format == "auto" else year_format == "joined"
    whole = None if first_token else whole_endings(tokenizer, joined)
    rng = random.Random(seed)
    examples = [_example(rng, joined, whole) for _ in range(n)]
    if n_reference is not None and n_reference < 1:
        raise TaskError(f"greater_than: n_reference must be >= 1, got {n_reference}")
    rng = random.Random(f"reference:{seed}")  # an independent stream: clean data does not depend on it
    reference = [_example(rng, joined, whole).prompt for _ in range(n_reference or n)]
    return build_task_data("greater_than", tokenizer, examples, reference, first_token=first_token, padding_side=padding_side,
                           options={"year_format": "joined" if joined else "split", "first_token": first_token,
                                    "n_reference": n_reference,
                                    "padding_side": padding_side, "seed": seed,
                                    "word_pools": {"endings": 100 if whole is None else len(whole)}})
