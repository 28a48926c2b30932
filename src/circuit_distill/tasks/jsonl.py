"""User tasks from a JSONL file: ``make_task("jsonl", tokenizer, n, path="task.jsonl")``.

Each non-blank line is a JSON object with string fields ``prompt`` and ``answer`` (written as it
continues the prompt, usually with a leading space), and optionally ``wrong_answer``,
``corrupted_prompt`` and ``corrupted_answer``. Either every line has ``corrupted_prompt`` or none
does. Unknown fields are an error (they are usually typos); blank lines are allowed and ignored.

Nothing is skipped silently: a malformed line is a ``TaskError`` naming the file and line number.
The first ``n`` examples are used; ``n`` larger than the file is an error unless ``take_all=True``,
which then uses every example. ``shuffle=True`` shuffles (with ``seed``) before taking ``n``. The
reference set for mean ablation is the file's examples not used (or, if none are left, the used
prompts themselves). Only the ``last`` position is named.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import TaskError
from .base import TaskData
from .build import Example, build_task_data
from .registry import register_task

REQUIRED = ("prompt", "answer")
OPTIONAL = ("wrong_answer", "corrupted_prompt", "corrupted_answer")


def read_jsonl(path: str | Path) -> list[Example]:
    """Parse a task JSONL file into ``Example`` objects (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"jsonl task: no file at {str(path)!r}; pass path=... pointing at a JSONL file")
    out: list[Example] = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{no}: "
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{where}each line must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in REQUIRED if k not in obj]
        if missing:
            raise TaskError(f"{where}missing field(s) {', '.join(missing)} (every line needs prompt and answer)")
        unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise TaskError(f"{where}unknown field(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(REQUIRED + OPTIONAL)}")
        for k, v in obj.items():
            if not isinstance(v, str) or (k in ("prompt", "answer") and not v):
                raise TaskError(f"{where}field {k!r} must be a non-empty string, got {v!r}")
        out.append(Example(prompt=obj["prompt"], answer=obj["answer"], wrong_answer=obj.get("wrong_answer"),
                           corrupted_prompt=obj.get("corrupted_prompt"),
                           corrupted_answer=obj.get("corrupted_answer"),
                           metadata={"line": no, **({"corrupted_prompt": obj["corrupted_prompt"]}
                                                    if "corrupted_prompt" in obj else {})}))
    if not out:
        raise TaskError(f"{path}: no examples (the file is empty)")
    with_c = sum(e.corrupted_prompt is not None for e in out)
    if 0 < with_c < len(out):
        first = next(e for e in out if e.corrupted_prompt is None).metadata["line"]
        raise TaskError(f"{path}:{first}: no corrupted_prompt, but {with_c} other line(s) have one; "
                        "give every line a corrupted_prompt or none")
    return out


def vocabulary(*, path: str | Path | None = None, **_) -> list[str]:
    """Every word of every prompt and answer in the file, split the way ``word_level_tokenizer``
    splits text (on whitespace, then punctuation apart), in order of first appearance."""
    from tokenizers import pre_tokenizers

    if path is None:
        raise TaskError("the jsonl task's vocabulary needs path=... (the JSONL file)")

    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words: dict[str, None] = {}
    for e in read_jsonl(path):
        for text in (e.prompt, e.answer, e.wrong_answer, e.corrupted_prompt, e.corrupted_answer):
            for piece, _ in split.pre_tokenize_str(text or ""):
                words.setdefault(piece, None)
    return list(words)


@register_task("jsonl", vocabulary=vocabulary)
def jsonl(tokenizer, n: int, *, seed: int = 0, path: str | Path | None = None, shuffle: bool = False,
          take_all: bool = False, first_token: bool = False, n_reference: int | None = None,
          padding_side: str = "right") -> TaskData:
    """The first ``n`` examples of the JSONL file at ``path`` (see the module docstring).

    ``n_reference`` caps the reference set (the unused examples, in file order after any shuffle);
    ``padding_side`` is ``"right"`` or ``"left"``.
    """
    if path is None:
        raise TaskError("jsonl task needs path=... (a JSONL file with prompt and answer on every line)")
    examples = read_jsonl(path)
    if shuffle:
        random.Random(seed).shuffle(examples)
    if n > len(examples) and not take_all:
        raise TaskError(f"{path} has {len(examples)} examples but n={n} were asked for; lower n or pass "
                        "take_all=True to use all of them")
    if n_reference is not None and n_reference < 1:
        raise TaskError(f"jsonl: n_reference must be >= 1, got {n_reference}")
    used, rest = examples[:n], examples[n:][:n_reference]
    return build_task_data("jsonl", tokenizer, used, [e.prompt for e in rest], first_token=first_token,
                           padding_side=padding_side,
                           options={"path": str(path), "shuffle": shuffle, "take_all": take_all,
                                    "first_token": first_token, "n_reference": n_reference,
                                    "padding_side": padding_side, "seed": seed})
