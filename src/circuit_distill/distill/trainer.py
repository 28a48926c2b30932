"""Circuit-distillation trainer on ``accelerate`` (METHOD.md §1, §4).

``distill(student, train, teacher=..., component_map=..., config=...)`` trains the student's
trainable subset on an objective (CE / KD / CKA alignment of matched heads), with seeded batches,
evaluation, ``metrics.jsonl``, atomic checkpoints, bit-identical resume on CPU, a run manifest and
the final student saved to ``out_dir/student``.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CircuitDistillError, ConfigError
from ..files import atomic_write, atomic_write_json
from ..matching import ComponentMap, match
from ..model.components import Component
from ..model.hooks import capture
from ..model.loading import position_ids_from_mask, quiet_transformers
from ..tasks.base import TaskData
from ..tasks.metrics import evaluate
from ..tasks.positions import select_rows, task_positions
from .cache import TeacherCache, build_cache, teacher_outputs
from .config import DistillConfig
from .losses import pair_ckas
from .objectives import get_objective, objective_loss
from .trainable import set_trainable

CHECKPOINT = "checkpoint.pt"


class NonFiniteLossError(CircuitDistillError):
    """The training loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class DistillResult:
    """What a run produced. ``history``: one dict per logged step/eval; ``final_eval``: per eval set
    ``{accuracy, answer_prob, logit_diff}``; ``pair_cka``: CKA of each (student, teacher) pair after training."""

    history: list[dict]
    final_eval: dict[str, dict[str, float]]
    trained_params: int
    trained_fraction: float
    pair_cka: list[float]
    mean_pair_cka: float
    component_map: ComponentMap
    steps: int
    out_dir: Path | None = None
    manifest: dict = field(default_factory=dict)


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
    """Example indices of micro-batch ``micro_step`` (epochs of seeded permutations; stateless, so resume is exact)."""
    start = micro_step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, off = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[off:off + batch_size - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


def random_map(cmap: ComponentMap, teacher_heads: list[Component], seed: int) -> ComponentMap:
    """A seeded random pairing of ``cmap``'s student heads with ``teacher_heads`` (the random-pairs control)."""
    return match(None, None, teacher_heads, cmap.student_components, method="random", seed=seed)


def _versions() -> dict:
    import transformers

    from .. import __version__ as cd_version

    try:
        import accelerate
        acc = accelerate.__version__
    except ImportError:  # pragma: no cover
        acc = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": acc, "circuit_distill": cd_version}


def _atomic_json(obj, path: Path) -> None:
    atomic_write_json(path, obj, default=str)


def _rows(acts: torch.Tensor, mask: torch.Tensor, pos) -> torch.Tensor:
    """``[b, seq, d]`` -> selected rows ``[m, d]``; already-selected ``[b, d]`` passes through."""
    return acts if acts.dim() == 2 else select_rows(acts, mask, pos)


def _stacked_head_rows(cap, pairs, flat: torch.Tensor | None) -> torch.Tensor:
    """The rows ``flat`` (indices into the flattened ``[b * seq]``; None = all of them) of every student
    head of ``pairs`` (sorted by student head) as one ``[n_pairs, m, d_head]`` tensor: one row selection
    per layer, not one per head, so the alignment costs the same few operations whatever the number of pairs."""
    blocks = []
    for layer in sorted({s.layer for s, _ in pairs}):
        heads = [s.head for s, _ in pairs if s.layer == layer]
        z = cap.layer_heads(layer)  # [b, seq, H, d_head]
        rows = z.reshape(-1, *z.shape[2:])  # [b * seq, H, d_head]
        if flat is not None:
            rows = rows.index_select(0, flat)  # [m, H, d_head]
        if heads != list(range(z.shape[2])):
            rows = rows.index_select(1, torch.tensor(heads, device=rows.device))
        blocks.append(rows)
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)).transpose(0, 1)


def distill(student, train: TaskData, *, teacher=None, eval_sets: dict[str, TaskData] | None = None,
            component_map: ComponentMap | None = None, config: DistillConfig, out_dir=None,
            progress: bool | None = None, resume: bool = False,
            cache: TeacherCache | None = None) -> DistillResult:
    """Train ``student`` (a ``Model``) on ``train`` with ``config.objective`` and return a ``DistillResult``.

    - ``teacher``: a ``Model`` sharing the student's tokenizer; needed unless a teacher cache
      covers everything (``config.use_cache`` builds one in ``out_dir/teacher_cache`` on first use,
      or pass ``cache``). Online teacher forwards run under ``no_grad``.
    - ``component_map``: student head -> teacher head pairs (required for alignment objectives and
      for ``trainable="matched_heads"``); ``random_cka`` objectives use a seeded random map instead.
    - ``eval_sets``: ``{name: TaskData}`` evaluated every ``config.eval_every`` steps and at the end.
    - ``out_dir`` (default ``config.out_dir``; None = no files): ``metrics.jsonl``, ``manifest.json``,
      ``checkpoint.pt`` (every ``config.checkpoint_every`` steps, atomic), ``student/``.
    - ``resume``: continue from ``out_dir/checkpoint.pt`` to the same final weights as an
      uninterrupted run. A NaN/inf loss raises ``NonFiniteLossError``; the last checkpoint stays.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg = config
    obj = get_objective(cfg.objective)
    out = Path(out_dir if out_dir is not None else cfg.out_dir) if (out_dir or cfg.out_dir) else None
    eval_sets = dict(eval_sets or {})
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    distributed = acc.num_processes > 1

    # --- pairs --------------------------------------------------------------------------------
    if component_map is None and (obj.uses_align or cfg.trainable == "matched_heads"):
        raise ConfigError(f"objective {obj.name!r} with trainable={cfg.trainable!r} needs a component map "
                          "(student head -> teacher head); run discovery + matching or pass component_map")
    cmap = component_map
    if obj.uses_align and obj.pairs == "random":
        if teacher is not None:
            pool = teacher.components("head")
        elif cache is not None:
            pool = [c for c in cache.components if c.is_head]
        else:
            raise ConfigError("random pairs need the teacher (or a teacher cache holding all its heads)")
        cmap = random_map(component_map, pool, cfg.seed)
    pairs = list(cmap.pairs) if cmap is not None else []
    # the same pairs grouped by student layer, for the batched alignment over all positions (the
    # loss is a mean over pairs, so their order does not matter)
    stacked = sorted(pairs, key=lambda p: (p[0], p[1]))
    s_comps = [s for s, _ in pairs]
    t_comps = sorted({t for _, t in pairs})
    need_teacher_logits = obj.needs_teacher_logits or (obj.uses_ce and cfg.labels == "teacher")
    need_teacher = need_teacher_logits or obj.needs_teacher_acts
    task_positions(train, cfg.positions)  # validates the name early

    # --- teacher cache --------------------------------------------------------------------------
    if need_teacher and cache is None and cfg.use_cache:
        if teacher is None:
            raise ConfigError(f"objective {obj.name!r} needs the teacher or a teacher cache")
        comps = t_comps or teacher.components("head")[:1]
        if out is None:  # in memory only: every rank builds its own, nothing is left on disk
            with tempfile.TemporaryDirectory(prefix="cd-cache-") as d:
                cache = build_cache(teacher, train, comps, cfg.positions, d, batch_size=cfg.eval_batch_size)
                cache.path = None
        else:
            if main:
                build_cache(teacher, train, comps, cfg.positions, out / "teacher_cache", batch_size=cfg.eval_batch_size)
            acc.wait_for_everyone()
            cache = TeacherCache.load(out / "teacher_cache")
    if need_teacher and cache is not None:
        cache.check(t_comps, cfg.positions, len(train))
    elif need_teacher and teacher is None:
        raise ConfigError(f"objective {obj.name!r} needs the teacher (labels={cfg.labels!r}); pass teacher= or a cache")

    # --- trainable subset, optimizer, schedule ------------------------------------------------
    torch.manual_seed(cfg.seed)
    info = set_trainable(student, cfg.trainable, heads=s_comps or None, train_kv=cfg.train_kv)
    params = info.parameters()
    if not params:
        raise ConfigError(f"trainable={cfg.trainable!r} selected no parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = cfg.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    hf, opt, sched = acc.prepare(student.hf, opt, sched)
    if info.masks and any(m is not None for m in info.masks.values()):
        info.attach(opt.optimizer if hasattr(opt, "optimizer") else opt)

    def forward(ids, mask):
        return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits

    device = acc.device
    history: list[dict] = []
    step = 0
    ckpt = out / CHECKPOINT if out is not None else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise ConfigError(f"resume=True but there is no checkpoint at {ckpt}; run without --resume")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        named = dict(acc.unwrap_model(hf).named_parameters())
        with torch.no_grad():
            for k, v in state["params"].items():
                named[k].copy_(v)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, history = state["step"], state["history"]
        if state["config"] != cfg.to_dict():
            raise ConfigError("the checkpoint was written with a different config; resume with the same one")

    manifest = {"versions": _versions(), "seed": cfg.seed, "config": cfg.to_dict(),
                "objective": obj.to_dict(), "component_map": cmap.to_dict() if cmap is not None else None,
                "trainable": {"subset": cfg.trainable, "count": info.count, "total": info.total,
                              "fraction": info.fraction}, "num_processes": acc.num_processes,
                "teacher": getattr(teacher, "name", None), "student": getattr(student, "name", None),
                "teacher_cache": str(cache.path) if cache is not None and cache.path else None}
    metrics_f = None
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_json(manifest, out / "manifest.json")
        with open(out / "metrics.jsonl", "w") as f:  # rewritten from the checkpoint's history on resume
            for h in history:
                f.write(json.dumps(h) + "\n")
        metrics_f = open(out / "metrics.jsonl", "a")

    def log(rec: dict) -> None:
        history.append(rec)
        if metrics_f is not None:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()

    def save_checkpoint() -> None:
        if ckpt is None:
            return
        acc.wait_for_everyone()
        if not main:
            return
        state = {"params": {k: p.detach().clone() for k, p in info.named_parameters()},
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                 "step": step, "history": list(history), "config": cfg.to_dict()}
        atomic_write(ckpt, lambda tmp: torch.save(state, tmp))

    rank, world = acc.process_index, acc.num_processes
    n = len(train)
    pbar = tqdm(total=cfg.steps, initial=step, disable=(not main) if progress is None or not progress else False,
                desc=f"distill {obj.name}", leave=False) if progress is not False else None
    hf.train()
    try:
        while step < cfg.steps:
            t_step = time.perf_counter()
            parts_sum: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                idx_all = batch_indices(n, cfg.batch_size, step * cfg.grad_accum + micro, cfg.seed)
                idx = idx_all[rank::world]
                b = train.clean.subset(idx).to(device)
                last = train.positions["last"][idx].to(device)
                pos = task_positions(train, cfg.positions, idx)
                with acc.accumulate(hf):
                    with capture(student, s_comps) as cap:
                        logits = forward(b.input_ids, b.attention_mask)
                    s_logits = logits[torch.arange(len(idx), device=device), last]
                    t_logits, t_acts = None, {}
                    if need_teacher:
                        if cache is not None:
                            t_acts, t_logits = cache.rows(idx, t_comps)
                        else:
                            t_acts, t_logits = teacher_outputs(teacher, train, t_comps, cfg.positions, idx)
                        t_logits = t_logits.to(device)
                    s_feats = t_feats = None
                    if obj.uses_align:
                        if isinstance(pos, str) and pos == "all":  # one index for every tensor (same rows as select_rows(..., "all"))
                            # no padding: every row, no selection
                            flat = (None if bool(b.attention_mask.all())
                                    else b.attention_mask.reshape(-1).nonzero().squeeze(1))
                            s_feats = _stacked_head_rows(cap, stacked, flat)
                            t_feats = torch.stack([t_acts[t] for _, t in stacked]).to(device)
                            t_feats = t_feats.reshape(len(stacked), -1, t_feats.shape[-1])
                            if flat is not None:
                                t_feats = t_feats.index_select(1, flat)
                        else:
                            s_feats = [select_rows(cap[s], b.attention_mask, pos) for s in s_comps]
                            t_feats = [_rows(t_acts[t].to(device), b.attention_mask, pos) for _, t in pairs]
                    labels = (t_logits.argmax(-1) if cfg.labels == "teacher" and t_logits is not None
                              else train.answer_ids[idx].to(device))
                    loss, parts = objective_loss(obj, student_logits=s_logits, labels=labels, teacher_logits=t_logits,
                                                 student_feats=s_feats, teacher_feats=t_feats, lam=cfg.lam,
                                                 temperature=cfg.temperature, debiased=cfg.debiased,
                                                 distributed=distributed)
                    if not bool(torch.isfinite(loss)):
                        raise NonFiniteLossError(
                            f"non-finite loss {float(loss.detach())} at step {step + 1} ({', '.join(f'{k}={float(v):.4g}' for k, v in parts.items())}); "
                            f"the last good checkpoint is kept{f' in {ckpt}' if ckpt else ''}. Lower lr "
                            f"(now {cfg.lr}), add warmup, or use mixed_precision='no'")
                    acc.backward(loss / 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / cfg.grad_accum
            if distributed and parts_sum:  # log the global-batch mean, not rank 0's share
                keys = list(parts_sum)
                vals = acc.reduce(torch.tensor([parts_sum[k] for k in keys], device=device), "mean")
                parts_sum = dict(zip(keys, vals.tolist()))
            step += 1
            # wall time of the optimisation step (batches, forward, losses, backward, update; not the evaluation)
            rec = {"step": step, "lr": sched.get_last_lr()[0], **parts_sum,
                   "step_seconds": time.perf_counter() - t_step}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                rec.update(_eval_record(student, teacher, eval_sets, pairs, cfg, cache, train))
                hf.train()
            log(rec)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k in ("total", "cka", "acc")})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_checkpoint()
    finally:
        if pbar is not None:
            pbar.close()
        if metrics_f is not None:
            metrics_f.close()
    info.remove()
    hf.eval()

    final = {name: evaluate(student, td, batch_size=cfg.eval_batch_size, progress=False)
             for name, td in eval_sets.items()}
    ckas = _pair_cka(student, teacher, eval_sets, pairs, cfg, cache, train)
    rec = {"step": step, "final": True, **{f"eval/{k}/{m}": v for k, d in final.items() for m, v in d.items()}}
    if ckas:
        rec["eval/pair_cka"] = sum(ckas) / len(ckas)
    history.append(rec)
    if out is not None and main:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        manifest["final_eval"] = final
        manifest["pair_cka"] = ckas
        manifest["steps"] = step
        _atomic_json(manifest, out / "manifest.json")
        sdir = out / "student"
        with quiet_transformers() if progress is False else contextlib.nullcontext():
            acc.unwrap_model(hf).save_pretrained(sdir)
        if getattr(student, "tokenizer", None) is not None:
            student.tokenizer.save_pretrained(sdir)
    acc.wait_for_everyone()
    return DistillResult(history=history, final_eval=final, trained_params=info.count,
                         trained_fraction=info.fraction, pair_cka=ckas,
                         mean_pair_cka=sum(ckas) / len(ckas) if ckas else math.nan, component_map=cmap,
                         steps=step, out_dir=out, manifest=manifest)


@torch.no_grad()
def _pair_cka(student, teacher, eval_sets, pairs, cfg, cache, train) -> list[float]:
    """CKA of each pair on held-out data (first eval set, teacher online) or else on cached training rows."""
    if not pairs:
        return []
    s_comps = [s for s, _ in pairs]
    t_comps = sorted({t for _, t in pairs})
    if teacher is not None and eval_sets:
        td = next(iter(eval_sets.values()))
        idx = torch.arange(min(len(td), cfg.eval_batch_size))
        t_acts, _ = teacher_outputs(teacher, td, t_comps, cfg.positions, idx)
    elif cache is not None:
        td = train
        idx = torch.arange(min(len(td), cfg.eval_batch_size))
        t_acts, _ = cache.rows(idx, t_comps)
    else:
        return []
    b = td.clean.subset(idx).to(student.device)
    pos = task_positions(td, cfg.positions, idx)
    with capture(student, s_comps, detach=True) as cap:
        student(b.input_ids, b.attention_mask)
        s_feats = [select_rows(cap[s], b.attention_mask, pos) for s in s_comps]
    t_feats = [_rows(t_acts[t].to(student.device), b.attention_mask, pos) for _, t in pairs]
    return [float(c) for c in pair_ckas(s_feats, t_feats, debiased=cfg.debiased)]


def _eval_record(student, teacher, eval_sets, pairs, cfg, cache, train) -> dict:
    student.hf.eval()
    rec = {}
    for name, td in eval_sets.items():
        for m, v in evaluate(student, td, batch_size=cfg.eval_batch_size, progress=False).items():
            rec[f"eval/{name}/{m}"] = v
    ckas = _pair_cka(student, teacher, eval_sets, pairs, cfg, cache, train)
    if ckas:
        rec["eval/pair_cka"] = sum(ckas) / len(ckas)
    return rec
