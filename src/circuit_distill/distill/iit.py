"""Interchange interventions of matched heads: the IIT objective's forwards, its teacher outputs and IIA.

Interchange intervention training (Geiger et al. 2022; as distillation, Wu et al. 2022) beside the
CKA objective of METHOD.md §1. The choices below are ours (keep them configurable):

- **Interchange intervention.** For a model, a set of its heads, a *base* and a *source* prompt: run
  the model on the base with each head's activation (its output before the output projection,
  ``[batch, seq, d_head]``) replaced by the same head's activation on the source, and read the answer
  logits at the base's ``last`` position. The source side is an unintervened run and gradients flow
  through both sides (the student's heads learn from the source side too).
- **Prompt pairs.** Each training prompt is interchanged with its *counterpart* (``iit_counterpart``):
  ``"corrupted"`` (default) the task's corrupted prompt of the same row; ``"other"`` another training
  prompt (a fixed seeded derangement of the set); ``"same_answer"`` another prompt with the same gold
  answer, the sanity control whose interventions should not change the teacher's answer (a row whose
  answer no other row has takes itself); ``"self"`` the prompt itself (the identity intervention: IIT
  becomes KD on the clean prompt). Counterparts are a fixed function of the data and
  ``Interchange.seed``, never of the run seed, so one teacher cache serves every seed.
- **Which is the base** (``iit_base``). ``"counterpart"`` (default): the counterpart is the base and the
  training prompt the source, so the student's source run *is* its CE forward (the heads' activations
  it captured, graph included) and IIT costs **one** extra student forward (the intervened base, of
  ``batch`` rows). ``"train"``: the training prompt is the base and the counterpart the source; the
  student then runs ``[source; base]`` rows (``2 * batch``) in one extra forward, whose ``intervene``
  hook copies the source rows' activation into the base rows. Counterparts are drawn from the same
  distribution as the training prompts (the derangements are symmetric), so the two directions train
  on the same family of interventions; the default is the cheaper one (``benchmarks/distill_step.py``).
- **Positions** (``iit_positions``): ``"all"`` swaps every position where both prompts have a real
  token, index by index (clean and corrupted prompts are token-aligned where the tokenizer allows; two
  clean prompts only as far as their lengths match); or comma-separated task position names: the
  base's named position takes the source's activation at the source's same named position (the
  corrupted prompt's own ``corrupted_positions`` for the corrupted counterpart).
- **Pairs per step** (``iit_pairs``): ``"one"``, one matched pair per step, a seeded function of the run
  seed and the step (resume stays exact): the student intervenes on its head, the teacher on its own;
  ``"all"``, every pair jointly in one intervened run (the map's student heads, the map's teacher heads).
- **Loss** (``objectives.iit_term``): ``T^2 KL`` at temperature T between the student's and the
  teacher's intervened answer distributions, or CE on the teacher's intervened argmax.
- **Teacher cache**: ``cache_interchanges`` precomputes the teacher's intervened answer logits
  ``[n, V]`` of every training row for each teacher head of the map (and the joint set for ``"all"``),
  so training runs no teacher forward; ``distill.cache`` says how big that gets.
- **IIA** (interchange intervention accuracy) of a pair: the fraction of prompts on which the student's
  intervened argmax equals the teacher's, each pair intervened alone (``pair_iia``); the trainer logs
  it at eval as ``eval/iia`` (mean) and ``eval/iia/<student head>:<teacher head>``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..model.components import Component
from ..model.hooks import intervene
from ..model.logits import answer_logits
from ..tasks.base import Batch, TaskData
from .cache import TeacherCache
from .config import IIT_BASES, IIT_COUNTERPARTS, DistillConfig
from .features import Pair
from .objectives import Objective
from .teacher import TeacherSource


@dataclass(frozen=True)
class Interchange:
    """Which interchange interventions: each training prompt's ``counterpart`` (one of ``IIT_COUNTERPARTS``),
    which of the two is the ``base`` (``"counterpart"`` or ``"train"``), the ``positions`` swapped (``"all"``
    or comma-separated task position names) and the ``seed`` of the ``other`` / ``same_answer`` choice."""

    counterpart: str = "corrupted"
    base: str = "counterpart"
    positions: str = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.counterpart not in IIT_COUNTERPARTS:
            raise ConfigError(f"iit_counterpart must be one of {', '.join(IIT_COUNTERPARTS)}, got {self.counterpart!r}")
        if self.base not in IIT_BASES:
            raise ConfigError(f"iit_base must be one of {', '.join(IIT_BASES)}, got {self.base!r}")
        if not self.positions.strip():
            raise ConfigError("iit_positions must be 'all' or task position names, comma-separated")

    @classmethod
    def of(cls, cfg: DistillConfig) -> Interchange:
        """The interventions ``cfg`` trains on (``iit_counterpart``, ``iit_base``, ``iit_positions``)."""
        return cls(cfg.iit_counterpart, cfg.iit_base, cfg.iit_positions)

    @property
    def names(self) -> list[str] | None:
        """The task position names swapped, or None for every position."""
        return None if self.positions == "all" else [p.strip() for p in self.positions.split(",") if p.strip()]

    def key(self, heads: Sequence[Component]) -> str:
        """The teacher cache's name of these interventions on ``heads`` (``TeacherCache.intervened``)."""
        return (f"iit/{self.counterpart}/{self.base}/{self.positions}/{self.seed}/"
                + "+".join(sorted(map(str, heads))))

    def check(self, td: TaskData) -> None:
        """``PositionError`` (a ``ConfigError``) if a named position is not one of ``td``'s."""
        for name in self.names or []:
            td.position(name)


@dataclass
class InterchangeBatch:
    """Base and source prompts of some rows, each ``[batch, seq]``, the base's answer position ``last
    [batch]``, and the swapped positions: ``base_pos`` / ``source_pos [batch, k]`` (None = all positions)."""

    base: Batch
    source: Batch
    last: torch.Tensor
    base_pos: torch.Tensor | None = None
    source_pos: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.base)

    def to(self, device) -> InterchangeBatch:
        move = (lambda t: None if t is None else t.to(device))
        return InterchangeBatch(self.base.to(device), self.source.to(device), self.last.to(device),
                                move(self.base_pos), move(self.source_pos))


def counterpart_rows(td: TaskData, counterpart: str, seed: int = 0) -> torch.Tensor:
    """The row of ``td`` each row is interchanged with ``[n]``, for the counterparts that are prompts of ``td``
    itself: ``"self"`` (each row), ``"other"`` (a seeded derangement: never the row itself when n > 1),
    ``"same_answer"`` (a seeded derangement within each group of equal gold answers)."""
    n = len(td)
    out = torch.arange(n)
    if counterpart == "self":
        return out
    g = torch.Generator().manual_seed(seed)
    if counterpart == "other":
        groups = [out]
    elif counterpart == "same_answer":
        groups = [(td.answer_ids == a).nonzero().squeeze(1) for a in td.answer_ids.unique()]
    else:
        raise ConfigError(f"counterpart_rows takes 'self', 'other' or 'same_answer', got {counterpart!r}")
    for members in groups:
        order = members[torch.randperm(len(members), generator=g)]
        out[order] = order.roll(-1)  # a cycle through the group: each row's counterpart is the next one
    return out


def interchange_batch(td: TaskData, idx: torch.Tensor, setting: Interchange) -> InterchangeBatch:
    """Base and source prompts (the training prompts ``td.clean`` and their counterparts, in the roles
    ``setting.base`` gives) and the swapped positions of rows ``idx [batch]``."""
    train = (td.clean.subset(idx), td.positions, idx)
    if setting.counterpart == "corrupted":
        other = (td.corrupted.subset(idx), td.corrupted_positions or td.positions, idx)
    else:
        rows = counterpart_rows(td, setting.counterpart, setting.seed)[idx]
        other = (td.clean.subset(rows), td.positions, rows)
    (base, base_named, base_rows), (source, src_named, src_rows) = \
        (other, train) if setting.base == "counterpart" else (train, other)
    out = InterchangeBatch(base, source, base_named["last"][base_rows])
    if setting.names is not None:
        missing = [p for p in setting.names if p not in base_named or p not in src_named]
        if missing:
            raise ConfigError(f"the prompts of task {td.name!r} have no position {missing[0]!r} "
                              f"(they have: {', '.join(sorted(td.positions))})")
        out.base_pos = torch.stack([base_named[p][base_rows] for p in setting.names], 1)
        out.source_pos = torch.stack([src_named[p][src_rows] for p in setting.names], 1)
    return out


def swap_positions(base_act: torch.Tensor, source_act: torch.Tensor, batch: InterchangeBatch) -> torch.Tensor:
    """``base_act [batch, seq, d]`` with ``batch``'s swapped positions taken from ``source_act [batch, seq, d]``
    (out of place, so gradients reach both)."""
    source_act = source_act.to(base_act.dtype)
    if batch.base_pos is None:
        both = (batch.base.attention_mask.bool() & batch.source.attention_mask.bool()).to(base_act.device)
        return torch.where(both[..., None], source_act, base_act)
    rows = torch.arange(len(batch), device=base_act.device)[:, None].expand_as(batch.base_pos)
    return base_act.index_put((rows, batch.base_pos.to(base_act.device)),
                              source_act[rows, batch.source_pos.to(base_act.device)])


def swap_into_base(batch: InterchangeBatch):
    """The ``intervene`` replacement of one head in a forward of ``[source; base]`` rows: activations
    ``[2 * batch, seq, d_head]`` -> the same with the base rows' swapped positions from the source rows."""
    b = len(batch)
    return lambda act: torch.cat([act[:b], swap_positions(act[b:], act[:b], batch)])


def interchange_logits(model, batch: InterchangeBatch, heads: Sequence[Component], *, module=None,
                       source_acts: Mapping[Component, torch.Tensor] | None = None) -> torch.Tensor:
    """The answer logits ``[batch, V]`` of ``model`` on the base prompts with ``heads`` taking their source
    activations; the autograd graph is kept when gradients are on. ``source_acts``: each head's activation
    on the source prompts ``[batch, seq, d_head]`` (e.g. captured in a forward already run): then one
    forward of the base rows; else one forward of ``[source; base]`` rows. ``module``: what to call instead
    of ``model.hf`` (e.g. the accelerate-prepared training module)."""
    if source_acts is None:
        swap = swap_into_base(batch)
        repl = {h: swap for h in heads}
        ids = torch.cat([batch.source.input_ids, batch.base.input_ids])
        mask = torch.cat([batch.source.attention_mask, batch.base.attention_mask])
    else:
        repl = {h: (lambda act, src=source_acts[h]: swap_positions(act, src, batch)) for h in heads}
        ids, mask = batch.base.input_ids, batch.base.attention_mask
    device = model.device if module is None else ids.device
    last = batch.last.to(device)  # the base rows come last; unembed the source rows at token 0 (unused)
    pos = torch.cat([torch.zeros(ids.shape[0] - len(batch), dtype=last.dtype, device=device), last])
    with intervene(model, repl):
        logits = answer_logits(model, ids.to(device), mask.to(device), pos, module=module)
    return logits[logits.shape[0] - len(batch):]


@torch.no_grad()
def teacher_iit_logits(td: TaskData, idx: torch.Tensor, heads: Sequence[Component], setting: Interchange, *,
                       teacher=None, cache: TeacherCache | None = None) -> torch.Tensor:
    """The teacher's intervened answer logits ``[batch, V]`` (float32) of rows ``idx`` of ``td``: from
    ``cache`` if it holds them (a cache of ``td``), else one forward of ``teacher``."""
    key = setting.key(heads)
    if cache is not None and cache.has_intervened(key):
        return cache.intervened(idx, key)
    if teacher is None:
        raise ConfigError(f"no teacher and no cached intervened logits {key!r}: pass the teacher, or add them "
                          "to the cache with cache_interchanges(cache, teacher, train, ...)")
    return interchange_logits(teacher, interchange_batch(td, idx, setting), heads).float()


def cache_interchanges(cache: TeacherCache, teacher, td: TaskData, head_sets: Sequence[Sequence[Component]],
                       setting: Interchange, *, batch_size: int = 128, dtype: torch.dtype = torch.float32,
                       save: bool = True) -> list[str]:
    """Add to ``cache`` (a cache of ``td``) the teacher's intervened answer logits ``[n, V]`` of every row,
    for each set of teacher heads in ``head_sets`` not held yet (stored as ``dtype``; ``save``: also on
    disk). Returns the keys added. Size: ``n * V`` values per set (see ``distill.cache``)."""
    if len(cache) != len(td):
        raise ConfigError(f"the teacher cache holds {len(cache)} rows but the task data has {len(td)}")
    setting.check(td)
    added = []
    for heads in head_sets:
        key = setting.key(heads)
        if cache.has_intervened(key) or key in added:
            continue
        parts = [teacher_iit_logits(td, chunk, heads, setting, teacher=teacher).cpu()
                 for chunk in torch.arange(len(td)).split(batch_size)]
        cache.add_intervened(key, torch.cat(parts).to(dtype), save=save)
        added.append(key)
    return added


def step_heads(pairs: Sequence[Pair], mode: str, seed: int, step: int) -> tuple[list[Component], list[Component]]:
    """The (student heads, teacher heads) intervened at optimisation step ``step``: ``"one"`` a seeded choice
    of one pair (a function of ``seed`` and ``step`` only), ``"all"`` every head of the pairs."""
    if not pairs:
        raise ConfigError("IIT needs at least one (student head, teacher head) pair; check the component map")
    if mode == "all":
        return sorted({s for s, _ in pairs}), sorted({t for _, t in pairs})
    if mode != "one":
        raise ConfigError(f"iit_pairs must be 'one' or 'all', got {mode!r}")
    s, t = pairs[random.Random(f"iit-pairs-{seed}-{step}").randrange(len(pairs))]
    return [s], [t]


def teacher_head_sets(pairs: Sequence[Pair], mode: str) -> list[list[Component]]:
    """The teacher head sets a run intervenes on: each teacher head of ``pairs`` alone (``"one"``, and IIA
    per pair), and for ``"all"`` also all of them jointly."""
    single = [[t] for t in sorted({t for _, t in pairs})]
    joint = sorted({t for _, t in pairs})
    return single + ([joint] if mode == "all" and len(joint) > 1 else [])


def prepare_interchanges(objective: Objective, cfg: DistillConfig, source: TeacherSource, pairs: Sequence[Pair],
                         accelerator=None) -> None:
    """Before an IIT run: check the positions, and complete the teacher cache of ``source`` with the
    intervened logits the run needs (if ``cfg.use_cache`` and the teacher is there; written by the main
    process). ``ConfigError`` if they can come neither from the cache nor from the teacher."""
    if not objective.uses_iit:
        return
    setting = Interchange.of(cfg)
    setting.check(source.data)
    cache = source.cache
    missing = [h for h in teacher_head_sets(pairs, cfg.iit_pairs)
               if cache is None or not cache.has_intervened(setting.key(h))]
    if missing and source.teacher is None:
        raise ConfigError(f"objective {objective.name!r} needs the teacher's intervened logits "
                          f"{setting.key(missing[0])!r}: pass the teacher, or add them to the cache with "
                          "distill.iit.cache_interchanges(cache, teacher, train, ...)")
    if missing and cache is not None and cfg.use_cache:
        save = accelerator is None or accelerator.is_main_process
        cache_interchanges(cache, source.teacher, source.data, missing, setting, batch_size=cfg.eval_batch_size,
                           save=save)


def iit_outputs(student, module, td: TaskData, idx: torch.Tensor, source: TeacherSource, pairs: Sequence[Pair],
                cfg: DistillConfig, step: int, captured) -> tuple[torch.Tensor, torch.Tensor]:
    """One training micro-batch's IIT logits at step ``step``: the student's intervened answer logits
    ``[batch, V]`` (through ``module``, with gradients) and the teacher's ``[batch, V]`` (cache or online).
    ``captured``: the pairs' student heads captured in the CE forward of the training prompts ``idx``
    (the source activations when the counterpart is the base)."""
    setting = Interchange.of(cfg)
    s_heads, t_heads = step_heads(pairs, cfg.iit_pairs, cfg.seed, step)
    device = next(module.parameters()).device
    acts = {h: captured[h] for h in s_heads} if setting.base == "counterpart" else None
    s_logits = interchange_logits(student, interchange_batch(td, idx, setting).to(device), s_heads, module=module,
                                  source_acts=acts)
    t_logits = teacher_iit_logits(td, idx, t_heads, setting, teacher=source.teacher, cache=source.cache)
    return s_logits, t_logits.to(device)


@torch.no_grad()
def pair_iia(student, pairs: Sequence[Pair], td: TaskData, *, teacher=None, cache: TeacherCache | None = None,
             setting: Interchange = Interchange(), n: int = 128, batch_size: int = 128) -> list[float]:
    """Interchange intervention accuracy of each (student head, teacher head) pair over the first ``n``
    prompts of ``td``, in pair order: the fraction whose intervened answer argmax (each pair intervened
    alone, ``setting``'s sources and positions) is the same for student and teacher. The teacher's side
    comes from ``teacher`` if given, else from ``cache`` (a cache of ``td`` holding those interventions)."""
    if not pairs:
        return []
    setting.check(td)
    if teacher is None and cache is not None and len(cache) != len(td):
        raise ConfigError(f"the teacher cache holds {len(cache)} rows but td has {len(td)}: pass the teacher, "
                          "or td = the cache's training set")
    idx = torch.arange(min(len(td), n))
    out = []
    for s, t in pairs:
        hits = 0
        for chunk in idx.split(batch_size):
            batch = interchange_batch(td, chunk, setting).to(student.device)
            s_arg = interchange_logits(student, batch, [s]).argmax(-1).cpu()
            t_arg = teacher_iit_logits(td, chunk, [t], setting, teacher=teacher,
                                       cache=None if teacher is not None else cache).argmax(-1).cpu()
            hits += int((s_arg == t_arg).sum())
        out.append(hits / len(idx))
    return out


def iia_record(student, eval_sets: dict[str, TaskData], pairs: Sequence[Pair], source: TeacherSource,
               cfg: DistillConfig) -> dict[str, float]:
    """``{eval/iia: mean, eval/iia/<student>:<teacher>: per pair}`` of the run's pairs: on the first eval set
    with the teacher online if both are there, else on the cached training rows, else ``{}``."""
    setting, n = Interchange.of(cfg), cfg.eval_batch_size
    if source.teacher is not None and eval_sets:
        iias = pair_iia(student, pairs, next(iter(eval_sets.values())), teacher=source.teacher, setting=setting, n=n)
    elif source.cache is not None and all(source.cache.has_intervened(setting.key([t])) for _, t in pairs):
        iias = pair_iia(student, pairs, source.data, cache=source.cache, setting=setting, n=n)
    else:
        return {}
    if not iias:
        return {}
    return {"eval/iia": sum(iias) / len(iias), **{f"eval/iia/{s}:{t}": v for (s, t), v in zip(pairs, iias)}}
