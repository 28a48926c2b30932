"""Token positions and activation rows: which rows of a ``[batch, seq, d]`` activation a stage reads.

``TaskData.position(name)`` is the one place that checks a named position; ``task_positions`` turns a
position choice (``"all"``, ``"last"`` or a task position's name) into what ``select_rows`` takes.
"""

from __future__ import annotations

from typing import Union

import torch

from ..errors import ConfigError
from .base import TaskData

Positions = Union[str, int, torch.Tensor]


def task_positions(td: TaskData, positions: str, idx: torch.Tensor | None = None) -> Positions:
    """``"all"``, or the ``[b]`` LongTensor of the named task position (``"last"`` included) for rows ``idx``."""
    if positions == "all":
        return "all"
    pos = td.position(positions)
    return pos if idx is None else pos[idx]


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
