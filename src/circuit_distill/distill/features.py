"""The features step: the student's and teacher's activation rows the alignment of each pair compares,
and ``pair_cka``, the CKA of each pair measured on a task.

Rows follow ``circuit_distill.tasks.positions.select_rows``: with ``positions == "all"`` every real
(non-padding) token in row-major order, else one row per prompt at the named position.

The shuffled-example control (``DistillConfig.align_targets == "shuffled"``) hands each prompt the teacher's
rows of another prompt of the batch with the same length (``shuffled_targets``): the same token kinds and
the same statistics, no per-example correspondence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ..model.components import Component
from ..model.hooks import capture
from ..model.logits import answer_logits
from ..tasks.base import TaskData
from ..tasks.positions import Positions, select_rows, task_positions, unstack_prompt_rows
from .cache import TeacherCache, teacher_outputs
from .losses import pair_ckas

Pair = tuple[Component, Component]


def as_rows(acts: torch.Tensor, attention_mask: torch.Tensor, positions: Positions) -> torch.Tensor:
    """``[batch, seq, d]`` -> selected rows ``[rows, d]``; already-selected prompt rows (``[batch, d]``, or
    ``[batch, k * d]`` at ``k`` named positions) -> ``[batch * k, d]`` as ``select_rows`` orders them."""
    return unstack_prompt_rows(acts, positions) if acts.dim() == 2 else select_rows(acts, attention_mask, positions)


def stacked_head_rows(student_acts, pairs: Sequence[Pair], flat: torch.Tensor | None) -> torch.Tensor:
    """The rows ``flat`` (indices into the flattened ``[batch * seq]``; None = all of them) of every student
    head of ``pairs`` (sorted by student head) as one ``[pairs, rows, d_head]`` tensor: one row selection
    per layer, not one per head, so the alignment costs the same few operations whatever the number of pairs.
    ``student_acts``: a ``capture`` of those heads (``layer_heads(layer)`` is ``[batch, seq, heads, d_head]``)."""
    blocks = []
    for layer in sorted({s.layer for s, _ in pairs}):
        heads = [s.head for s, _ in pairs if s.layer == layer]
        z = student_acts.layer_heads(layer)  # [batch, seq, heads, d_head]
        rows = z.reshape(-1, *z.shape[2:])  # [batch * seq, heads, d_head]
        if flat is not None:
            rows = rows.index_select(0, flat)  # [rows, heads, d_head]
        if heads != list(range(z.shape[2])):
            rows = rows.index_select(1, torch.tensor(heads, device=rows.device))
        blocks.append(rows)
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)).transpose(0, 1)


def alignment_features(student_acts, teacher_acts: dict[Component, torch.Tensor], attention_mask: torch.Tensor,
                       positions: Positions, pairs: Sequence[Pair], device=None):
    """The student's and teacher's rows of every pair, for the alignment loss.

    ``student_acts``: a ``capture`` of the pairs' student heads (``[batch, seq, d_head]`` each);
    ``teacher_acts``: ``{teacher head: [batch, seq, d_head], or selected rows [batch, d_head]}``;
    ``positions``: what ``task_positions`` gives. With ``"all"``: two ``[pairs, rows, d_head]`` tensors
    with the pairs sorted by (student, teacher) head (one batched selection; the loss is a mean over
    pairs, so the order does not matter). Otherwise two lists of ``[rows, d_head]`` in pair order.
    Teacher rows move to ``device``."""
    if isinstance(positions, str) and positions == "all":  # one index for every tensor (same rows as select_rows)
        stacked = sorted(pairs, key=lambda p: (p[0], p[1]))
        # no padding: every row, no selection
        flat = None if bool(attention_mask.all()) else attention_mask.reshape(-1).nonzero().squeeze(1)
        s_feats = stacked_head_rows(student_acts, stacked, flat)
        t_feats = torch.stack([teacher_acts[t] for _, t in stacked]).to(device)
        t_feats = t_feats.reshape(len(stacked), -1, t_feats.shape[-1])
        if flat is not None:
            t_feats = t_feats.index_select(1, flat)
        return s_feats, t_feats
    s_feats = [select_rows(student_acts[s], attention_mask, positions) for s, _ in pairs]
    t_feats = [as_rows(teacher_acts[t].to(device), attention_mask, positions) for _, t in pairs]
    return s_feats, t_feats


def shuffled_partners(attention_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """For each prompt of a batch (``attention_mask [batch, seq]``), the index ``[batch]`` of another prompt
    of the batch with as many real tokens: a seeded random cycle through each group of equal lengths, so no
    prompt is its own partner. A prompt whose length no other prompt of the batch has takes a seeded random
    other prompt (its rows past the partner's length then hold the partner's padding)."""
    n = attention_mask.shape[0]
    g = torch.Generator().manual_seed(seed)
    lengths = attention_mask.detach().long().sum(1).cpu()
    partners = torch.arange(n)
    for length in lengths.unique().tolist():
        members = (lengths == length).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        partners[members] = members.roll(-1)  # i -> the next of the cycle
    for i in (partners == torch.arange(n)).nonzero().flatten().tolist():
        if n > 1:  # alone in its length group
            j = int(torch.randint(n - 1, (1,), generator=g))
            partners[i] = j + (j >= i)
    return partners


def shuffled_targets(teacher_acts: dict[Component, torch.Tensor], attention_mask: torch.Tensor,
                     seed: int) -> dict[Component, torch.Tensor]:
    """The shuffled-example control: each teacher head's activations of the batch (``[batch, seq, d_head]``,
    or selected rows ``[batch, d_head]``) reordered so that prompt ``i`` gets those of its
    ``shuffled_partners`` prompt."""
    partners = shuffled_partners(attention_mask, seed)
    return {c: a.index_select(0, partners.to(a.device)) for c, a in teacher_acts.items()}


@torch.no_grad()
def pair_cka(student, pairs: Sequence[Pair], td: TaskData, positions: str, *, teacher=None,
             cache: TeacherCache | None = None, n: int = 128, debiased: bool = False,
             teacher_data: TaskData | None = None) -> list[float]:
    """Linear CKA of each (student head, teacher head) pair over the first ``n`` prompts of ``td`` (rows
    at ``positions``: ``"all"``, ``"last"`` or task position names, comma-separated), in pair order.

    The teacher's activations come from a forward of ``teacher`` if given (on ``teacher_data``, its own
    tokenization of ``td``'s prompts, if given: then ``positions`` must name positions), else from ``cache``,
    which must hold ``td``'s rows (a cache of the training set, with ``td`` that set)."""
    if not pairs:
        return []
    idx = torch.arange(min(len(td), n))
    t_comps = sorted({t for _, t in pairs})
    if teacher_data is not None and positions == "all":
        raise ConfigError("pair_cka across tokenizers compares rows at named positions, not positions='all'")
    if teacher is not None:
        t_acts, _ = teacher_outputs(teacher, td if teacher_data is None else teacher_data, t_comps, positions, idx)
    elif cache is not None:
        cache.check(t_comps, positions, len(td))
        t_acts, _ = cache.rows(idx, t_comps)
    else:
        raise ConfigError("pair_cka needs the teacher (teacher=) or a teacher cache of td (cache=)")
    b = td.clean.subset(idx).to(student.device)
    pos = task_positions(td, positions, idx)
    with capture(student, [s for s, _ in pairs], detach=True) as cap:  # the heads only: unembed one token per row
        answer_logits(student, b.input_ids, b.attention_mask, td.positions["last"][idx])
        s_feats = [select_rows(cap[s], b.attention_mask, pos) for s, _ in pairs]
    t_feats = [as_rows(t_acts[t].to(student.device), b.attention_mask, pos) for _, t in pairs]
    return [float(c) for c in pair_ckas(s_feats, t_feats, debiased=debiased)]
