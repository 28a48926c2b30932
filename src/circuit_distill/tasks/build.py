"""From text examples to ``TaskData``: tokenise prompts, map named character positions to token
positions, check that answers are single tokens, and align clean with corrupted prompts.

Every generator produces ``Example`` objects and calls ``build_task_data``; nothing else in a
generator touches the tokenizer except to check vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import TaskError
from .base import Batch, TaskData


@dataclass
class Example:
    """One task example as text.

    ``answer`` / ``wrong_answer`` are written as they continue the prompt (usually with a leading
    space: ``" eggnog"``). ``positions`` maps a name to a *character* offset into ``prompt`` (the
    first character of the word meant); ``corrupted_positions`` likewise into ``corrupted_prompt``.
    ``last`` is always added by the builder.
    """

    prompt: str
    answer: str
    wrong_answer: str | None = None
    corrupted_prompt: str | None = None
    corrupted_answer: str | None = None
    positions: dict[str, int] = field(default_factory=dict)
    corrupted_positions: dict[str, int] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def continuation_ids(tokenizer, text: str, context: str | None) -> list[int]:
    """Token ids of ``text`` as it continues ``context``: the tokens ``context + text`` adds after
    ``context``'s own, when the two tokenise at a clean boundary; else ``text`` alone. (SentencePiece
    tokenizers such as Llama's give ``" Mary"`` alone as ``["▁", "▁Mary"]`` but after a prompt as
    ``["▁Mary"]``.)"""
    alone = tokenizer(text, add_special_tokens=False)["input_ids"]
    if context is None or len(alone) <= 1:
        return alone
    pre = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + text, add_special_tokens=False)["input_ids"]
    if full[:len(pre)] == pre and len(full) > len(pre):
        return full[len(pre):]
    return alone


def answer_token(tokenizer, text: str, *, first_token: bool = False, where: str = "",
                 context: str | None = None) -> int:
    """The single token id of ``text`` as a continuation (of ``context``, the prompt, if given);
    a clear ``TaskError`` if it splits."""
    ids = continuation_ids(tokenizer, text, context)
    if not ids:
        raise TaskError(f"{where}answer {text!r} tokenises to nothing")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise TaskError(
            f"{where}answer {text!r} contains words the tokenizer does not know "
            f"(it gives {tokenizer.convert_ids_to_tokens(ids)}); use a tokenizer whose vocabulary covers the task"
        )
    if len(ids) > 1 and not first_token:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise TaskError(
            f"{where}answer {text!r} is {len(ids)} tokens for this tokenizer: {pieces}. Answers must be "
            "single tokens; choose answers the tokenizer keeps whole, or pass first_token=True to score "
            "the first token only"
        )
    return ids[0]


def _encode(tokenizer, prompts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    try:
        enc = tokenizer(prompts, add_special_tokens=True, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
        raise TaskError(f"task data needs a fast tokenizer (character offsets map named positions to tokens): "
                        f"{e}; load it with AutoTokenizer.from_pretrained(..., use_fast=True)") from None
    return enc["input_ids"], enc["offset_mapping"]


def _token_at(offsets: list[tuple[int, int]], char: int, prompt: str, name: str, where: str) -> int:
    """Index of the token whose character span holds ``char`` (special tokens have empty spans)."""
    for i, (s, e) in enumerate(offsets):
        if s <= char < e:
            return i
    raise TaskError(f"{where}position {name!r} (character {char}) falls on no token of {prompt!r}")


def _pad(rows: list[list[int]], width: int, pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _positions(rows, offsets, prompts, pos_dicts, width, side, where_fmt) -> dict[str, torch.Tensor]:
    names = sorted({k for d in pos_dicts for k in d})
    out: dict[str, torch.Tensor] = {}
    for name in names:
        vals = []
        for i, d in enumerate(pos_dicts):
            if name not in d:
                raise TaskError(f"{where_fmt(i)}position {name!r} is missing (every example must name it)")
            t = _token_at(offsets[i], d[name], prompts[i], name, where_fmt(i))
            vals.append(t + (width - len(rows[i]) if side == "left" else 0))
        out[name] = torch.tensor(vals, dtype=torch.long)
    out["last"] = torch.tensor([(len(r) - 1) + (width - len(r) if side == "left" else 0) for r in rows],
                               dtype=torch.long)
    return out


def build_task_data(name: str, tokenizer, examples: list[Example], reference: list[str], *,
                    first_token: bool = False, padding_side: str = "right", options: dict | None = None
                    ) -> TaskData:
    """Tokenise ``examples`` (and the mean-ablation ``reference`` prompts) into ``TaskData``.

    Clean and corrupted batches are padded to one common width so that row ``i`` of each lines up
    and positions index both. ``wrong_answer`` defaults to the corrupted answer when there is one.
    A multi-token answer raises ``TaskError`` naming the example (see ``answer_token``).
    """
    if not examples:
        raise TaskError(f"task {name!r}: no examples (n must be >= 1)")
    if padding_side not in ("left", "right"):
        raise TaskError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if tokenizer.pad_token_id is None:
        raise TaskError("the tokenizer has no pad token; set tokenizer.pad_token first")

    def where(i: int) -> str:
        return f"task {name!r}, example {i} ({examples[i].prompt!r}): "

    answers = [answer_token(tokenizer, e.answer, first_token=first_token, where=where(i), context=e.prompt)
               for i, e in enumerate(examples)]
    wrongs = []
    for i, e in enumerate(examples):
        w = e.wrong_answer if e.wrong_answer is not None else e.corrupted_answer
        wrongs.append(answer_token(tokenizer, w, first_token=first_token, where=where(i), context=e.prompt)
                      if w is not None else -1)
    has_corrupt = any(e.corrupted_prompt is not None for e in examples)
    if has_corrupt and not all(e.corrupted_prompt is not None for e in examples):
        raise TaskError(f"task {name!r}: either every example has a corrupted prompt or none does")
    c_prompts = [e.corrupted_prompt if has_corrupt else e.prompt for e in examples]
    c_answers = None
    if has_corrupt and all(e.corrupted_answer is not None for e in examples):
        c_answers = torch.tensor([answer_token(tokenizer, e.corrupted_answer, first_token=first_token,
                                               where=where(i), context=e.corrupted_prompt)
                                  for i, e in enumerate(examples)])

    prompts = [e.prompt for e in examples]
    rows, offs = _encode(tokenizer, prompts)
    c_rows, c_offs = _encode(tokenizer, c_prompts)
    r_rows, _ = _encode(tokenizer, list(reference) or prompts)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        for kind, batch_rows, texts in (("prompt", rows, prompts), ("corrupted prompt", c_rows, c_prompts)):
            for i, r in enumerate(batch_rows):
                if unk in r:
                    raise TaskError(f"{where(i)}the {kind} {texts[i]!r} has words the tokenizer does not know "
                                    f"(it gives {tokenizer.convert_ids_to_tokens(r)}); use a tokenizer whose "
                                    "vocabulary covers the task (e.g. word_level_tokenizer(task_vocabulary(name, "
                                    "**options)))")
        if any(unk in r for r in r_rows):
            raise TaskError(f"task {name!r}: a reference prompt has words the tokenizer does not know; use a "
                            "tokenizer whose vocabulary covers the task")
    width = max(max(map(len, rows)), max(map(len, c_rows)))
    pad = tokenizer.pad_token_id
    clean = Batch(*_pad(rows, width, pad, padding_side), padding_side)
    corrupted = Batch(*_pad(c_rows, width, pad, padding_side), padding_side)
    ref = Batch(*_pad(r_rows, max(map(len, r_rows)), pad, padding_side), padding_side)
    positions = _positions(rows, offs, prompts, [e.positions for e in examples], width, padding_side, where)
    c_positions = _positions(c_rows, c_offs, c_prompts,
                             [e.corrupted_positions if has_corrupt else e.positions for e in examples],
                             width, padding_side, where)
    return TaskData(
        name=name, clean=clean, answer_ids=torch.tensor(answers), wrong_ids=torch.tensor(wrongs),
        corrupted=corrupted, reference=ref, positions=positions, prompts=prompts,
        answers=[e.answer for e in examples], metadata=[dict(e.metadata) for e in examples],
        corrupted_answer_ids=c_answers, corrupted_positions=c_positions, options=dict(options or {}),
    )
