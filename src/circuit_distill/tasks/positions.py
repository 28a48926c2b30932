"""Token positions and activation rows: which rows of a ``[batch, seq, d]`` activation a stage reads.

``TaskData.position(name)`` is the one place that checks a named position; ``task_positions`` turns a
position choice (``"all"``, ``"last"``, a task position's name, or several names comma-separated) into what
``select_rows`` takes. Two task data of the same prompts tokenised by two tokenizers (``check_same_prompts``)
name the same words at their own token indices (``position_matrix``), so rows read at named positions line up
between two models whatever their tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from ..errors import ConfigError
from .base import TaskData

Positions = Union[str, int, torch.Tensor]


def position_names(positions: str) -> list[str]:
    """The named positions of a position choice: ``"object,last"`` -> ``["object", "last"]`` (``[]`` for ``"all"``)."""
    if positions == "all":
        return []
    names = [p.strip() for p in str(positions).split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"positions {positions!r}: give 'all', one position name, or distinct names comma-separated "
                          "(e.g. 'object,query_label,last')")
    return names


def task_positions(td: TaskData, positions: str, idx: torch.Tensor | None = None) -> Positions:
    """``"all"``; the ``[b]`` LongTensor of one named task position (``"last"`` included) for rows ``idx``; or
    for several comma-separated names the ``[b, k]`` matrix of them (``position_matrix``: one row per prompt
    and named position, prompt-major, in ``select_rows``)."""
    if positions == "all":
        return "all"
    names = position_names(positions)
    pos = td.position(names[0]) if len(names) == 1 else position_matrix(td, names)
    return pos if idx is None else pos[idx]


def position_matrix(td: TaskData, names: Sequence[str]) -> torch.Tensor:
    """``[n, k]`` token index of each named position (columns in ``names`` order) in ``td.clean``."""
    return torch.stack([td.position(nm).long() for nm in names], 1)


def check_same_prompts(teacher_data: TaskData, student_data: TaskData) -> None:
    """Raise ``ConfigError`` unless both task data hold the same prompt texts in the same order."""
    a, b = list(teacher_data.prompts), list(student_data.prompts)
    if not a or len(a) != len(b):
        raise ConfigError(f"the teacher's and the student's task data must hold the same prompts (got {len(a)} and "
                          f"{len(b)} prompt texts): build both from one task, seed and options")
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            raise ConfigError(f"prompt {i} differs between the teacher's and the student's task data ({x!r} vs {y!r}): "
                              "the generator drew other words for one tokenizer; pass word lists both keep whole "
                              "(circuit_distill.analysis.named_task_pair does this for entity tracking)")


def same_tokens(a: TaskData, b: TaskData) -> bool:
    """True if ``a`` and ``b`` hold the same token ids and attention masks (one tokenization of their prompts)."""
    return (a.clean.input_ids.shape == b.clean.input_ids.shape and torch.equal(a.clean.input_ids, b.clean.input_ids)
            and torch.equal(a.clean.attention_mask, b.clean.attention_mask))


def prompt_rows(acts: torch.Tensor, attention_mask: torch.Tensor | None, positions: Positions) -> torch.Tensor:
    """One row per prompt from ``acts [b, s, d]``: ``[b, d]`` at a ``[b]`` position, ``[b, k * d]`` (the ``k``
    named positions concatenated) at a ``[b, k]`` one; what the teacher cache stores. ``"all"``: ``select_rows``."""
    rows = select_rows(acts, attention_mask, positions)
    return rows if isinstance(positions, str) else rows.reshape(acts.shape[0], -1)


def unstack_prompt_rows(rows: torch.Tensor, positions: Positions) -> torch.Tensor:
    """``prompt_rows`` back to ``select_rows``'s rows: ``[b, k * d]`` -> ``[b * k, d]`` at a ``[b, k]`` position
    (prompt-major, as ``select_rows``), unchanged otherwise."""
    if isinstance(positions, torch.Tensor) and positions.dim() == 2:
        return rows.reshape(rows.shape[0] * positions.shape[1], -1)
    return rows


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of ``attention_mask [b, s]`` -> ``[b]`` (left or right padding)."""
    m = attention_mask.bool()
    if not bool(m.any(1).all()):
        raise ConfigError("a row of the attention mask has no real token")
    s = m.shape[1]
    return (s - 1 - m.flip(1).long().argmax(1)).long()


def select_rows(acts: torch.Tensor, attention_mask: torch.Tensor | None, positions: Positions = "last") -> torch.Tensor:
    """Rows for CKA from ``acts [b, s, d]`` -> ``[m, d]``.

    ``positions``: ``"last"`` (last real token of each row: m = b), ``"all"`` (every non-padding
    token, in row-major order: m = number of real tokens), an ``int`` (that index in every row), a
    ``[b]`` LongTensor (one named position per row: m = b) or a ``[b, k]`` LongTensor (k positions
    per row, flattened row-major: m = b * k; entries < 0 are skipped). ``attention_mask [b, s]``
    (1 = real token) may be None when there is no padding.
    """
    if acts.dim() != 3:
        raise ConfigError(f"select_rows expects activations [batch, seq, d], got shape {tuple(acts.shape)}")
    b, s, _ = acts.shape
    if attention_mask is None:
        attention_mask = torch.ones(b, s, dtype=torch.long, device=acts.device)
    if tuple(attention_mask.shape) != (b, s):
        raise ConfigError(f"attention_mask shape {tuple(attention_mask.shape)} does not match activations [{b}, {s}, d]")
    attention_mask = attention_mask.to(acts.device)
    rows = torch.arange(b, device=acts.device)
    if isinstance(positions, str):
        if positions == "last":
            return acts[rows, last_positions(attention_mask)]
        if positions == "all":
            return acts[attention_mask.bool()]
        raise ConfigError(f"unknown positions {positions!r}: use 'last', 'all', or a LongTensor of positions [b] or [b, k]")
    if isinstance(positions, int):
        return acts[:, positions]
    pos = torch.as_tensor(positions, device=acts.device).long()
    if pos.shape[0] != b or pos.dim() not in (1, 2):
        raise ConfigError(f"positions must be [b] or [b, k] with b = {b}, got shape {tuple(pos.shape)}")
    if bool((pos >= s).any()) or (pos.dim() == 1 and bool((pos < 0).any())):
        raise ConfigError(f"positions out of range for sequences of length {s} (got min {int(pos.min())}, "
                          f"max {int(pos.max())})")
    if pos.dim() == 1:
        return acts[rows, pos]
    keep = pos >= 0
    return acts[rows[:, None].expand_as(pos)[keep], pos[keep]]
