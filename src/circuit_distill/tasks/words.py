"""Answer words that fit a tokenizer.

A task's answer must be one token. Real tokenizers split some of the built-in words (SmolLM2 and
Gemma 3 both give " eggnog" as " egg" + "nog"; both split numbers into digits), so every generator
narrows its built-in answer pool to the words the given tokenizer keeps whole as a continuation
(with the leading space the prompt puts before them). The narrowing keeps the pool's order, so the
same seed draws the same examples, and a tokenizer that keeps every word (a word-level tokenizer
over the task's vocabulary) gets exactly the built-in pool. Word lists passed by the caller are used
as given, and ``first_token=True`` (score the first token of a multi-token answer) keeps every word.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import TaskError
from .build import continuation_ids


def keeps_whole(tokenizer, text: str, context: str) -> bool:
    """Whether ``text`` continues ``context`` as exactly one known token."""
    ids = continuation_ids(tokenizer, text, context)
    return len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None)


def whole_words(tokenizer, words: Sequence[str], *, context: str, prefix: str = " ") -> list[str]:
    """The words of ``words`` (in order) whose ``prefix + word`` continues ``context`` as one token."""
    return [w for w in words if keeps_whole(tokenizer, prefix + w, context)]


def fitted_pool(tokenizer, words: Sequence[str], *, task: str, kind: str, need: int, context: str,
                prefix: str = " ", first_token: bool = False, hint: str = "") -> list[str]:
    """``words`` narrowed to those ``tokenizer`` keeps whole (all of them with ``first_token``).

    Fewer than ``need`` left because of the narrowing is a ``TaskError`` that says how many remain and
    what to do instead (a pool too small to begin with is left to the generator's own check).
    """
    words = list(words)
    if first_token:
        return words
    kept = whole_words(tokenizer, words, context=context, prefix=prefix)
    if len(kept) < min(need, len(words)):
        split = [w for w in words if w not in set(kept)][:4]
        raise TaskError(
            f"{task}: only {len(kept)} of the {len(words)} built-in {kind} are single tokens for this tokenizer "
            f"(it splits e.g. {', '.join(repr(prefix + w) for w in split)}); {need} are needed. "
            f"{hint + ' ' if hint else ''}Or pass first_token=True to score the first token only"
        )
    return kept
