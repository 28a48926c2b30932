"""``TaskData``: prompts with known answers, aligned counterfactuals and a mean-ablation reference set."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..errors import PositionError


@dataclass
class Batch:
    """Tokenised prompts. ``input_ids`` and ``attention_mask`` are ``[n, seq]`` (right-padded unless
    ``padding_side`` says otherwise)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    padding_side: str = "right"

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, idx) -> Batch:
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.padding_side)

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.padding_side)

    @property
    def last(self) -> torch.Tensor:
        """Index of the last real token of each row: ``[n]``."""
        if self.padding_side == "left":
            return torch.full((len(self),), self.input_ids.shape[1] - 1, dtype=torch.long)
        return self.attention_mask.sum(1).long() - 1


@dataclass
class TaskData:
    """Everything a stage needs about one task instance.

    - ``clean``: the prompts; ``answer_ids [n]`` the correct next token, ``wrong_ids [n]`` a wrong
      one (for logit difference).
    - ``corrupted``: counterfactual prompts aligned with ``clean`` row by row (same length where
      the tokenizer allows), for activation/path patching; ``corrupted_answer_ids [n]``.
    - ``reference``: prompts from the same distribution, for mean ablation.
    - ``positions``: named token positions into ``clean`` (``[n]`` LongTensors); always ``last``.
    - ``prompts``, ``answers``, ``metadata``: per-example text and facts (for display and tests).
    """

    name: str
    clean: Batch
    answer_ids: torch.Tensor
    wrong_ids: torch.Tensor
    corrupted: Batch
    reference: Batch
    positions: dict[str, torch.Tensor]
    prompts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    corrupted_answer_ids: torch.Tensor | None = None
    corrupted_positions: dict[str, torch.Tensor] | None = None
    options: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clean)

    def position(self, name: str) -> torch.Tensor:
        """The named position ``[n]`` (into ``clean``); the one place that checks a position's name."""
        if name not in self.positions:
            raise PositionError(f"position {name!r} is not a position of task {self.name!r} "
                                f"(it has: {', '.join(sorted(self.positions))}; 'all' is accepted where "
                                "every real token is meant)")
        return self.positions[name]

    def subset(self, idx) -> TaskData:
        """Rows ``idx`` (a slice, list or LongTensor) of every per-example field; the reference set is kept."""
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = idx.tolist()
        return TaskData(
            name=self.name,
            clean=self.clean.subset(idx),
            answer_ids=self.answer_ids[idx],
            wrong_ids=self.wrong_ids[idx],
            corrupted=self.corrupted.subset(idx),
            reference=self.reference,
            positions={k: v[idx] for k, v in self.positions.items()},
            prompts=[self.prompts[i] for i in pick] if self.prompts else [],
            answers=[self.answers[i] for i in pick] if self.answers else [],
            metadata=[self.metadata[i] for i in pick] if self.metadata else [],
            corrupted_answer_ids=None if self.corrupted_answer_ids is None else self.corrupted_answer_ids[idx],
            corrupted_positions=None if self.corrupted_positions is None
            else {k: v[idx] for k, v in self.corrupted_positions.items()},
            options=dict(self.options),
        )

    def to(self, device) -> TaskData:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (Batch, torch.Tensor)):
                v = v.to(device)
            elif isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                v = {k: t.to(device) for k, t in v.items()}
            out[f.name] = v
        return TaskData(**out)
