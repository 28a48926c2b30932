"""Numeral sequence continuation (the Distilled Circuits case study).

    " 1 2 3 4" -> " 5"        " three four five six" -> " seven"

Every term, the first included, follows a space, so a subword tokenizer encodes each the same way.

``style="digits"`` writes numbers as digits, ``"words"`` as English number words (up to twenty);
``step`` is the increment and ``length`` the number of terms shown (an int or an inclusive
``(min, max)`` range). The wrong answer is the last term repeated (the copying distractor).

Named positions: ``first`` (the first term), ``prev`` (the second-to-last term), ``last``.
The corrupted prompt is the same-length sequence started elsewhere, so the corrupted answer differs.
"""

from __future__ import annotations

import random

from ..errors import TaskError
from .base import TaskData
from .build import Example, build_task_data
from .registry import register_task
from .words import whole_words

WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
STYLES = ("digits", "words")


def _max(style: str, max_value: int | None) -> int:
    if style not in STYLES:
        raise TaskError(f"numerals: style must be one of {STYLES}, got {style!r}")
    top = len(WORDS) - 1 if style == "words" else 99
    if max_value is None:
        return top
    if not 3 <= max_value <= top:
        raise TaskError(f"numerals: max_value must be between 3 and {top} for style {style!r}, got {max_value}")
    return max_value


def _say(v: int, style: str) -> str:
    return WORDS[v] if style == "words" else str(v)


def vocabulary(*, style: str = "digits", max_value: int | None = None, **_) -> list[str]:
    """Every word a ``numerals`` prompt or answer can contain (for a word-level tokenizer)."""
    return [_say(v, style) for v in range(_max(style, max_value) + 1)]


def _seq(start: int, k: int, step: int, style: str) -> tuple[str, dict[str, int], str]:
    terms = [_say(start + i * step, style) for i in range(k)]
    starts, pos = [], 0
    for t in terms:  # every term after a space, so subword tokenizers split the first like the rest
        starts.append(pos + 1)
        pos += len(t) + 1
    return "".join(" " + t for t in terms), {"first": starts[0], "prev": starts[-2]}, " " + terms[-1]


def _starts(top: int, span: int, step: int, whole: set[int] | None) -> list[int]:
    """Starts whose answer (``start + span``) and wrong answer (the last term) are single tokens."""
    return [s for s in range(0, top - span + 1)
            if whole is None or (s + span in whole and s + span - step in whole)]


def _example(rng: random.Random, style: str, top: int, lo: int, hi: int, step: int,
             whole: set[int] | None = None) -> Example:
    k = rng.randint(lo, hi)
    span = k * step  # the answer is start + k * step
    starts = _starts(top, span, step, whole)
    start = starts[rng.randint(0, len(starts) - 1)]
    c_start = rng.choice([s for s in starts if s != start])
    prompt, pos, last = _seq(start, k, step, style)
    c_prompt, c_pos, _ = _seq(c_start, k, step, style)
    return Example(prompt=prompt, answer=" " + _say(start + span, style), wrong_answer=last,
                   corrupted_prompt=c_prompt, corrupted_answer=" " + _say(c_start + span, style),
                   positions=pos, corrupted_positions=c_pos,
                   metadata={"start": start, "length": k, "step": step, "answer": start + span,
                             "corrupted_start": c_start, "corrupted_prompt": c_prompt})


def whole_numbers(tokenizer, style: str, top: int, lo: int, hi: int, step: int) -> set[int]:
    """The numbers ``0 .. top`` the tokenizer keeps whole after a space; a ``TaskError`` when some
    sequence length leaves fewer than two starts whose answer and wrong answer both are."""
    said = [_say(v, style) for v in range(top + 1)]
    context = "".join(" " + _say(v, style) for v in (1, 2, 3))
    whole = {said.index(w) for w in whole_words(tokenizer, said, context=context)}
    short = [k for k in range(lo, hi + 1) if len(_starts(top, k * step, step, whole)) < 2]
    if short:
        split = [repr(" " + w) for v, w in enumerate(said) if v not in whole][:3]
        raise TaskError(f"numerals: only {len(whole)} of the numbers 0..{top} ({style}) are single tokens for this "
                        f"tokenizer (it splits e.g. {', '.join(split)}), too few for {short[0]} terms with step "
                        f"{step}. Try style='words', or pass first_token=True to score the first token only")
    return whole


@register_task("numerals", vocabulary=vocabulary)
def numerals(tokenizer, n: int, *, seed: int = 0, style: str = "digits", length: int | tuple[int, int] = (3, 6),
             step: int = 1, max_value: int | None = None, first_token: bool = False,
             n_reference: int | None = None, padding_side: str = "right") -> TaskData:
    """``n`` sequence-continuation prompts (see the module docstring). Numbers stay within
    ``0 .. max_value`` (default 99 for digits, 20 for words). Answers (and wrong answers) are drawn
    from the numbers the tokenizer keeps whole after a space (``options["word_pools"]``; real
    tokenizers that split digits leave none above 9 and want ``style="words"``).

    ``n_reference`` mean-ablation prompts (default ``n``) come from a stream independent of the
    examples; ``padding_side`` is ``"right"`` or ``"left"``.
    """
    top = _max(style, max_value)
    lo, hi = (length, length) if isinstance(length, int) else tuple(length)
    if not 2 <= lo <= hi:
        raise TaskError(f"numerals: length must be >= 2 (min <= max), got {length!r}")
    if step < 1:
        raise TaskError(f"numerals: step must be >= 1, got {step}")
    if hi * step > top - 1:
        raise TaskError(f"numerals: {hi} terms with step {step} do not fit in 0..{top} with two distinct starts; "
                        "use fewer terms, a smaller step or a larger max_value")
    whole = None if first_token else whole_numbers(tokenizer, style, top, lo, hi, step)
    rng = random.Random(seed)
    examples = [_example(rng, style, top, lo, hi, step, whole) for _ in range(n)]
    if n_reference is not None and n_reference < 1:
        raise TaskError(f"numerals: n_reference must be >= 1, got {n_reference}")
    rng = random.Random(f"reference:{seed}")  # an independent stream: clean data does not depend on it
    reference = [_example(rng, style, top, lo, hi, step, whole).prompt for _ in range(n_reference or n)]
    return build_task_data("numerals", tokenizer, examples, reference, first_token=first_token, padding_side=padding_side,
                           options={"style": style, "length": length, "step": step, "max_value": max_value,
                                    "first_token": first_token, "n_reference": n_reference,
                                    "padding_side": padding_side, "seed": seed,
                                    "word_pools": {"numbers": top + 1 if whole is None else len(whole)}})
