"""Fine-tune a real teacher on entity tracking until it is competent, and keep only the changed weights.

Issue 15's teacher-fine-tuning stage: a pretrained model (``gemma3-270m``) picks the first-mentioned
object whatever box is asked, so its circuits are not those of a task it does. ``finetune`` trains
LoRA adapters (``trainable="lora"``: the query and output projections of every layer) with CE on
the gold answers, through the distillation trainer run without a teacher (``objective="ce"``,
``labels="gold"``): seeded batches, atomic checkpoints, exact resume, ``metrics.jsonl``. Every
``eval_every`` steps it measures the **accuracy among the prompt's own objects** (argmax over the
``k`` objects in the prompt's boxes; chance ``1/k``) on ``n_heldout`` held-out prompts of another
seed at ``target_boxes`` boxes, and stops at the first evaluation at or above ``target`` (or at the
step cap ``steps``).

It then writes ``out/delta.safetensors`` (the LoRA factors, ``model.delta``), merges them into the
weights and measures the merged model, exactly what ``load_model(base) + delta`` gives, at every
``report_boxes`` count on prompts of a third seed, before and after: ``out/finetune.json`` and the
model card ``out/README.md``. ``out/run/`` holds the trainer's files (the full fine-tuned model the
trainer saves there is deleted: only the delta is kept).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, option
from ..distill.config import DistillConfig
from ..distill.trainer import distill
from ..errors import ConfigError
from ..files import atomic_write_json, atomic_write_text
from ..model.delta import lora_delta, merge_delta, read_delta, save_delta, unload_lora
from ..model.loading import load_model
from ..tasks.build import answer_token
from ..tasks.metrics import batched_final_logits
from ..tasks.registry import make_task
from .finetune_card import model_card

RECORD = "finetune.json"


@dataclass
class FinetuneConfig(Config):
    """One fine-tuning run of a real teacher on entity tracking (LoRA, CE on gold answers)."""

    override_example = "target=0.9 or task_options.n_shots=1"

    model: str = option("gemma3-270m", "the base model (any name load_model takes)")
    task_options: dict = option(help="entity_tracking options of every prompt set (objects, n_shots, ...)",
                                factory=dict)
    train_boxes: str = option("2-5", "box counts of the training prompts, an int or an inclusive range '2-5'")
    n_train: int = option(2048, "training prompts (seed `seed`)")
    seed: int = option(0, "seed of the training prompts, the batch order and the LoRA initialisation")
    steps: int = option(400, "step cap: training stops here if the target is not reached before")
    batch_size: int = option(16, "prompts per step")
    lr: float = option(1e-3, "AdamW learning rate of the LoRA factors")
    warmup: int = option(20, "linear warmup steps")
    eval_every: int = option(25, "measure the held-out accuracy every N steps (the stopping rule)")
    checkpoint_every: int = option(25, "write run/checkpoint.pt every N steps")
    target: float = option(0.9, "stop at the first evaluation whose held-out accuracy among objects is >= this")
    target_boxes: int = option(3, "box count of the held-out prompts of the stopping rule")
    n_heldout: int = option(200, "held-out prompts of the stopping rule")
    heldout_seed: int = option(1, "seed of the held-out prompts (not the training seed)")
    report_boxes: list[int] = option(help="box counts measured before and after training",
                                     factory=lambda: [2, 3, 4, 5])
    n_report: int = option(200, "prompts per report box count")
    report_seed: int = option(2, "seed of the report prompts (neither the training nor the held-out seed)")
    eval_batch_size: int = option(50, "batch size of the evaluations")

    def validate(self) -> None:
        if not 0 < self.target <= 1:
            raise ConfigError(f"target must be an accuracy in (0, 1], got {self.target}")
        if len({self.seed, self.heldout_seed, self.report_seed}) != 3:
            raise ConfigError("seed, heldout_seed and report_seed must differ (held-out prompts are other prompts)")
        for k in ("target_boxes", "n_heldout", "n_report", "eval_every", "eval_batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if any(b < 2 for b in self.report_boxes):
            raise ConfigError(f"report_boxes must be box counts >= 2, got {self.report_boxes}")

    def distill_config(self) -> DistillConfig:
        """The trainer's config: CE on gold labels, no teacher, LoRA, no eval sets of its own."""
        return DistillConfig(
            student=self.model, task="entity_tracking", task_options={**self.task_options, "n_boxes": self.train_boxes},
            n_train=self.n_train, n_eval=self.n_heldout, seed=self.seed, objective="ce", labels="gold",
            trainable="lora", steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup=self.warmup,
            eval_every=self.eval_every, eval_batch_size=self.eval_batch_size,
            checkpoint_every=self.checkpoint_every, use_cache=False)


def prompts(model, cfg: FinetuneConfig, n: int, seed: int, boxes) -> object:
    """``n`` entity-tracking prompts of ``seed`` at ``boxes`` boxes with the run's task options."""
    return make_task("entity_tracking", model.tokenizer, n, seed=seed, n_boxes=boxes, **cfg.task_options)


@torch.no_grad()
def in_context_accuracy(model, td, *, batch_size: int = 50) -> dict[str, float]:
    """Accuracy among the prompt's own objects (argmax of the last-token logits over the ``k`` objects in
    the prompt's boxes; chance ``1/k``) and over the whole vocabulary, on entity-tracking prompts ``td``."""
    was = model.hf.training
    model.hf.eval()
    logits = batched_final_logits(model, td.clean, td.position("last"), batch_size=batch_size, progress=False)
    model.hf.train(was)
    hits = []
    for i, meta in enumerate(td.metadata):
        ids = [answer_token(model.tokenizer, " " + o, context=td.prompts[i]) for o in meta["boxes"].values()]
        hits.append(ids[int(logits[i, ids].argmax())] == int(td.answer_ids[i]))
    vocab = (logits.argmax(-1) == td.answer_ids.cpu()).float().mean()
    return {"in_context_accuracy": sum(hits) / len(hits), "accuracy": float(vocab), "n": len(hits)}


def report(model, cfg: FinetuneConfig, log) -> dict[str, dict]:
    """``{boxes: in_context_accuracy(...)}`` at every ``report_boxes`` count (``report_seed`` prompts)."""
    out = {}
    for b in cfg.report_boxes:
        out[str(b)] = in_context_accuracy(model, prompts(model, cfg, cfg.n_report, cfg.report_seed, b),
                                          batch_size=cfg.eval_batch_size)
        log(f"  {b} boxes: among objects {out[str(b)]['in_context_accuracy']:.3f} (chance {1 / b:.3f}), "
            f"vocabulary {out[str(b)]['accuracy']:.3f}")
    return out


def lora_shape(delta) -> dict:
    """``{rank, scale, modules}`` of a LoRA ``Delta`` (for the card)."""
    (a, _), scale = next(iter(delta.factors.values())), next(iter(delta.scales.values()))
    return {"rank": int(a.shape[0]), "scale": scale, "modules": sorted(delta.factors)}


def finetune(cfg: FinetuneConfig, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
             progress: bool | None = None, log=print, config_path: str | None = None) -> dict:
    """Fine-tune ``cfg.model`` (module docstring) into ``out``; return the record written to
    ``out/finetune.json``. A finished run is returned as it is (``overwrite`` starts again); ``resume``
    continues an interrupted one from ``out/run/checkpoint.pt``."""
    out = Path(out)
    if (out / RECORD).is_file() and not overwrite:
        done = json.loads((out / RECORD).read_text())
        if done.get("config") != cfg.to_dict():
            raise ConfigError(f"{out} holds a finished run of another config; pass --overwrite or another OUT")
        log(f"{out / RECORD} exists: the run is finished (pass overwrite=True / --overwrite to start again)")
        return done
    t0 = time.perf_counter()
    model = load_model(cfg.model)
    torch.manual_seed(cfg.seed)
    dcfg = cfg.distill_config()
    train = prompts(model, cfg, cfg.n_train, cfg.seed, cfg.train_boxes)
    heldout = prompts(model, cfg, cfg.n_heldout, cfg.heldout_seed, cfg.target_boxes)
    before_path = out / "before.json"
    if before_path.is_file() and not overwrite:
        before = json.loads(before_path.read_text())
    else:
        log(f"{cfg.model} before fine-tuning (accuracy among the prompt's objects, {cfg.n_report} prompts each):")
        before = report(model, cfg, log)
        atomic_write_json(before_path, before)

    def stop(student, rec: dict) -> bool:
        acc = in_context_accuracy(student, heldout, batch_size=cfg.eval_batch_size)["in_context_accuracy"]
        rec["eval/heldout/in_context_accuracy"] = acc
        log(f"step {rec['step']}: held-out accuracy among objects at {cfg.target_boxes} boxes {acc:.3f} "
            f"(target {cfg.target})")
        return acc >= cfg.target

    result = distill(model, train, eval_sets={}, config=dcfg, out_dir=out / "run", resume=resume,
                     overwrite=overwrite, progress=progress, stop=stop)
    shutil.rmtree(out / "run" / "student", ignore_errors=True)  # the full model: only the delta is kept
    history = [h for h in result.history if "eval/heldout/in_context_accuracy" in h]
    delta = lora_delta(model.hf, meta={"base": cfg.model, "seed": str(cfg.seed), "steps": str(result.steps)})
    path = save_delta(delta, out)
    unload_lora(model.hf)
    merge_delta(model.hf, read_delta(path))  # the model that ships: base + the delta as stored
    log(f"{cfg.model} + delta after {result.steps} steps:")
    after = report(model, cfg, log)
    held = in_context_accuracy(model, heldout, batch_size=cfg.eval_batch_size)
    record = {"config": cfg.to_dict(), "config_path": config_path, "base": cfg.model, "steps": result.steps,
              "reached_target": held["in_context_accuracy"] >= cfg.target, "heldout": held,
              "heldout_curve": [[h["step"], h["eval/heldout/in_context_accuracy"]] for h in history],
              "before": before, "after": after, "delta_params": delta.n_params, "lora": lora_shape(delta), "delta_bytes": path.stat().st_size,
              "trained_fraction": result.trained_fraction,
              "seconds_this_session": round(time.perf_counter() - t0, 1),
              "train_seconds": round(sum(h.get("step_seconds", 0.0) for h in result.history), 1)}
    atomic_write_json(out / RECORD, record)
    atomic_write_text(out / "README.md", model_card(record))
    return record
