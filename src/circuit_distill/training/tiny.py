"""Train the project's own tiny entity-tracking models (the built-in teacher and warm student).

Recipe (METHOD.md §4): a Llama-style model trained from scratch on sequences made of one
entity-tracking context followed by ``n_queries`` queries, with the loss on every answer token only.
Half of the queries use an easier form, ``"Box T eggnog"`` (the answer right after the label), half
the task's form, ``"Box T contains the eggnog"``; the easy form lets the binding mechanism form
instead of sitting on the ~1/n plateau. The first query of every sequence is token-for-token a
``make_task("entity_tracking")`` prompt, and competence is measured with ``tasks.evaluate`` on fresh
``make_task`` prompts.

Training stops at a *competence level*, not a step count: every ``eval_every`` steps the held-out
accuracy at each of ``target_boxes`` is measured and training stops at the first evaluation where all
of them reach ``target_accuracy`` (or at ``max_steps``). Everything is deterministic from ``seed``:
the batch of step ``s`` is drawn from its own RNG seeded by (seed, s), so a resumed run sees the same
data as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import Config, option
from ..distill.state import (
    CheckpointError,
    DivergenceError,
    check_run_dir,
    divergence_advice,
    nonfinite_names,
    read_checkpoint,
    write_checkpoint,
)
from ..errors import ConfigError
from ..model.arch import build_arch
from ..model.loading import Model, quiet_transformers, tiny_config
from ..model.tokenizer import word_level_tokenizer
from ..tasks import evaluate, make_task, task_vocabulary
from ..tasks.entity_tracking import LABELS, OBJECTS

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "elapsed", "history", "reached", "config")
MODEL_FILES = ("model.safetensors", "training.json")  # what a finished run leaves in its output directory


@dataclass
class TinyTrainConfig(Config):
    """Everything that defines a ``train_tiny`` run (saved with the model as ``training.json``)."""

    n_layers: int = option(2, "transformer layers")
    d_model: int = option(128, "residual width")
    n_heads: int = option(4, "query heads per layer")
    n_kv_heads: int = option(2, "key/value heads per layer (GQA)")
    d_mlp: int | None = option(None, "MLP width (None: 4 * d_model)")
    min_boxes: int = option(2, "fewest boxes in a training context")
    max_boxes: int = option(7, "most boxes in a training context")
    n_queries: int = option(4, "queries per training sequence")
    easy_fraction: float = option(0.5, "fraction of queries in the easy 'Box T object' form")
    same_boxes_per_batch: bool = option(False, "one box count per batch (drawn per step) instead of per "
                                               "sequence: no padding waste")
    lr: float = option(1e-3, "AdamW learning rate after warmup")
    warmup: int = option(200, "linear warmup steps")
    anneal_from: int | None = option(None, "from this step the lr falls linearly to 0 at max_steps (None: never)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    batch_size: int = option(64, "sequences per step")
    max_steps: int = option(20_000, "stop here if the target is not reached")
    eval_every: int = option(250, "steps between held-out evaluations")
    eval_n: int = option(300, "held-out prompts per box count at each evaluation")
    target_accuracy: float = option(0.99, "stop when every target_boxes accuracy reaches this")
    target_boxes: list[int] = option(help="box counts of the stopping rule", factory=lambda: [7])
    report_boxes: list[int] = option(help="box counts measured at the end",
                                     factory=lambda: [2, 3, 4, 5, 6, 7, 8, 9])
    report_n: int = option(500, "prompts per box count of the final measurement")
    checkpoint_every: int = option(500, "steps between checkpoints")
    seed: int = option(0, "seed of the initialisation and of every batch")
    threads: int = option(2, "torch CPU threads")

    def validate(self) -> None:
        for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "max_steps", "report_n"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.d_mlp is not None and self.d_mlp < 1:
            raise ConfigError(f"d_mlp must be >= 1 (or None: 4 * d_model), got {self.d_mlp}")
        if not 0 < self.lr <= 1:  # (NaN fails every comparison)
            raise ConfigError(f"lr must be in (0, 1] (AdamW moves each weight by about lr per step; "
                              f"typical: 1e-4 to 1e-2), got {self.lr}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0 (0 = off), got {self.warmup}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        pool = min(len(OBJECTS), len(LABELS))
        if not 2 <= self.min_boxes <= self.max_boxes:
            raise ConfigError(f"training boxes must satisfy 2 <= min_boxes <= max_boxes, got "
                              f"{self.min_boxes}..{self.max_boxes}")
        if self.max_boxes > pool:
            raise ConfigError(f"max_boxes={self.max_boxes} exceeds the task's pools "
                              f"({len(OBJECTS)} objects, {len(LABELS)} labels)")
        if not self.target_boxes or not all(2 <= b <= pool for b in self.target_boxes + self.report_boxes):
            raise ConfigError(f"target_boxes (at least one) and report_boxes must be box counts in 2..{pool}, got "
                              f"{self.target_boxes} and {self.report_boxes}")
        if self.n_heads % self.n_kv_heads or self.d_model % self.n_heads:
            raise ConfigError("n_heads must divide d_model and be a multiple of n_kv_heads")
        if not 0.0 <= self.easy_fraction <= 1.0:
            raise ConfigError(f"easy_fraction must be in [0, 1], got {self.easy_fraction}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        if self.anneal_from is not None and not 0 <= self.anneal_from < self.max_steps:
            raise ConfigError(f"anneal_from must be in [0, max_steps), got {self.anneal_from}")
        for k in ("n_queries", "batch_size", "eval_every", "eval_n", "checkpoint_every", "threads"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")


def entity_tokenizer():
    """The word-level tokenizer over the ``entity_tracking`` vocabulary (shipped with the models)."""
    return word_level_tokenizer(task_vocabulary("entity_tracking"))


def sample_batch(cfg: TinyTrainConfig, tokenizer, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training batch of ``step``: ``input_ids [B, T]``, ``attention_mask [B, T]`` and
    ``labels [B, T]`` (the answer token at the position that predicts it, -100 elsewhere)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    vocab = tokenizer.get_vocab()
    ids = lambda words: [vocab[w] for w in words]
    rows, targets = [], []
    batch_k = rng.randint(cfg.min_boxes, cfg.max_boxes)
    for _ in range(cfg.batch_size):
        k = batch_k if cfg.same_boxes_per_batch else rng.randint(cfg.min_boxes, cfg.max_boxes)
        objs = rng.sample(OBJECTS, k)
        labs = rng.sample(LABELS, k)
        words: list[str] = []
        for i, (o, lab) in enumerate(zip(objs, labs)):
            words += (["The"] if i == 0 else [",", "the"]) + [o, "is", "in", "Box", lab]
        words.append(".")
        tgt = [-100] * len(words)
        for _q in range(cfg.n_queries):
            j = rng.randrange(k)
            if rng.random() < cfg.easy_fraction:
                q = ["Box", labs[j]]
            else:
                q = ["Box", labs[j], "contains", "the"]
            words += q
            tgt += [-100] * len(q)
            tgt[-1] = vocab[objs[j]]
            words += [objs[j], "."]
            tgt += [-100, -100]
        rows.append(ids(words))
        targets.append(tgt)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (r, t) in enumerate(zip(rows, targets)):
        input_ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, :len(t)] = torch.tensor(t)
    return input_ids, mask, labels


def build_model(cfg: TinyTrainConfig, tokenizer) -> torch.nn.Module:
    """A fresh Llama-style model, initialised from ``cfg.seed``."""
    from transformers import AutoModelForCausalLM

    hf_cfg = tiny_config("llama", n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                         d_model=cfg.d_model, d_mlp=cfg.d_mlp, vocab_size=len(tokenizer), max_positions=256)
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(hf_cfg)


def accuracy_at(model: Model, boxes: int, n: int, seed: int) -> float:
    """Held-out accuracy of ``model`` on ``n`` fresh ``entity_tracking`` prompts with ``boxes`` boxes."""
    data = make_task("entity_tracking", model.tokenizer, n, seed=seed, n_boxes=boxes, n_reference=1)
    return evaluate(model, data)["accuracy"]


def lr_factor(cfg: TinyTrainConfig, step: int) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, constant, then (``anneal_from``) linear to 0."""
    f = min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.anneal_from is not None and step >= cfg.anneal_from:
        f *= max(0.0, (cfg.max_steps - step) / (cfg.max_steps - cfg.anneal_from))
    return f


@dataclass
class TinyRun:
    """Where a ``train_tiny`` run stands (saved in its checkpoint): steps done, training seconds, the
    evaluations so far, whether the target is reached, and the first step's loss."""

    step: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)
    reached: bool = False
    first_loss: float | None = None


def save_tiny_checkpoint(path: Path, hf, opt, sched, run: TinyRun, cfg: TinyTrainConfig) -> None:
    """Write the checkpoint ``path`` (atomically): model, optimizer, scheduler, ``run`` and ``cfg``.
    ``DivergenceError`` (nothing written) if a weight is NaN/inf."""
    write_checkpoint(path, {"model": hf.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "step": run.step, "elapsed": run.elapsed, "history": run.history, "reached": run.reached,
                            "first_loss": run.first_loss, "config": asdict(cfg)}, hf.named_parameters())


def restore_tiny_checkpoint(path: Path, hf, opt, sched, cfg: TinyTrainConfig) -> TinyRun:
    """Load the checkpoint ``path`` into ``hf``, ``opt`` and ``sched`` and return its ``TinyRun``.
    ``ConfigError`` if it was written by a configuration other than ``cfg`` (beyond the options free to change),
    or if it cannot be read safely (``read_checkpoint``: ``weights_only``) or holds non-finite weights."""
    state = read_checkpoint(path, CHECKPOINT_KEYS)
    # options added after the checkpoint was written take their defaults
    saved = asdict(TinyTrainConfig()) | state["config"]
    # free to change: max_steps, threads, and an annealing phase that starts at or after the
    # checkpoint (the schedule so far is unchanged, so a fresh run with the new options is identical)
    free = {"threads": saved["threads"]}
    if saved["anneal_from"] is None or saved["anneal_from"] >= state["step"]:
        free["max_steps"] = saved["max_steps"]  # (an annealing slope under way depends on it)
    if all(a is None or a >= state["step"] for a in (saved["anneal_from"], cfg.anneal_from)):
        free["anneal_from"] = saved["anneal_from"]
    if saved != asdict(cfg) | free:
        raise ConfigError(f"{path} was written by a different configuration; use a new output "
                          "directory or the same options")
    bad = nonfinite_names(state["model"].items())
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({bad[0]}); start again with --overwrite")
    hf.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return TinyRun(state["step"], state["elapsed"], state["history"], state["reached"], state.get("first_loss"))


def tiny_step(hf, opt, sched, cfg: TinyTrainConfig, tokenizer, step: int) -> torch.Tensor:
    """One optimisation step on the batch of ``step`` (loss on the answer tokens, gradients clipped at 1);
    returns the loss."""
    hf.train()
    input_ids, mask, labels = sample_batch(cfg, tokenizer, step)
    logits = hf(input_ids=input_ids, attention_mask=mask).logits
    # labels already sit at the position that predicts them: no shift
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss


def check_tiny_finite(hf, loss: torch.Tensor, cfg: TinyTrainConfig, step: int, checkpoint: Path) -> None:
    """``DivergenceError`` naming ``step`` if the ``loss`` or a weight of ``hf`` is NaN/inf (reads only)."""
    bad = nonfinite_names(hf.named_parameters())
    if bad or not torch.isfinite(loss):
        what = f"{len(bad)} tensor(s) hold NaN/inf (first: {bad[0]})" if bad else "the weights are still finite"
        raise DivergenceError(f"training diverged at step {step} (loss {loss.item():.4g}): {what}; "
                              + divergence_advice(cfg.lr, cfg.warmup, checkpoint))


def export_tiny_model(hf, tokenizer, out: Path, record: dict) -> None:
    """Save the model (safetensors), its tokenizer, ``training.json`` and the model card into ``out``."""
    with quiet_transformers():
        hf.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(model_card(record))


def train_tiny(cfg: TinyTrainConfig, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
               checkpoint_dir: str | os.PathLike | None = None, progress: bool = True, log=print,
               command: str | None = None) -> dict:
    """Train a model per ``cfg``, save it (safetensors + tokenizer + ``training.json``) into ``out``
    and return the training record (steps, seconds, eval history, final accuracies per box count).

    ``command`` (the command line that started the run) is recorded in ``training.json`` and the
    model card (``README.md``). A checkpoint (``checkpoint_dir/checkpoint.pt``, default ``out``; written atomically) lets ``resume=True`` continue a run;
    resuming with ``max_steps`` at or below the checkpoint's step exports the checkpoint as it is. An ``out``
    (or checkpoint) holding a run is refused unless ``resume`` or ``overwrite`` (start again). A NaN/inf loss
    or weight stops the run with a ``DivergenceError``: nothing non-finite is saved.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    out = Path(out)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out
    ckpt = ckpt_dir / CHECKPOINT
    check_run_dir([out / f for f in MODEL_FILES] + [ckpt], ckpt, resume=resume, overwrite=overwrite)
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = entity_tokenizer()
    hf = build_model(cfg, tokenizer)
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    run = TinyRun()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        run = restore_tiny_checkpoint(ckpt, hf, opt, sched, cfg)
        log(f"resumed from {ckpt} at step {run.step}")
    model = Model(hf, tokenizer, build_arch(hf), name="train_tiny")
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not progress, desc="train-tiny", mininterval=2.0)
    t0 = time.perf_counter()
    while run.step < cfg.max_steps and not run.reached:
        loss = tiny_step(hf, opt, sched, cfg, tokenizer, run.step)
        run.step += 1
        check_tiny_finite(hf, loss, cfg, run.step, ckpt)
        if run.first_loss is None:
            run.first_loss = round(loss.item(), 5)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
            hf.eval()
            accs = {b: accuracy_at(model, b, cfg.eval_n, seed=10_000 + b) for b in cfg.target_boxes}
            run.elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            run.history.append({"step": run.step, "loss": round(loss.item(), 5), "seconds": round(run.elapsed, 1),
                                "accuracy": {str(b): a for b, a in accs.items()}})
            log(f"step {run.step} loss {loss.item():.4f} " + " ".join(f"acc@{b}={a:.3f}" for b, a in accs.items())
                + f" ({run.elapsed:.0f}s)")
            run.reached = all(a >= cfg.target_accuracy for a in accs.values())
        if run.step % cfg.checkpoint_every == 0 or run.reached:
            run.elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            save_tiny_checkpoint(ckpt, hf, opt, sched, run, cfg)
    bar.close()
    run.elapsed += time.perf_counter() - t0
    save_tiny_checkpoint(ckpt, hf, opt, sched, run, cfg)
    hf.eval()
    final = {str(b): accuracy_at(model, b, cfg.report_n, seed=20_000 + b) for b in cfg.report_boxes}
    record = {"config": asdict(cfg), "steps": run.step, "seconds": round(run.elapsed, 1),
              "reached_target": run.reached, "first_loss": run.first_loss, "history": run.history,
              "final_accuracy": final, "final_eval_n": cfg.report_n, "params": sum(p.numel() for p in hf.parameters()),
              "torch": torch.__version__, "command": command}
    export_tiny_model(hf, tokenizer, out, record)
    log("final accuracy: " + " ".join(f"{b}:{a:.3f}" for b, a in final.items()))
    return record


def model_card(record: dict) -> str:
    """A Markdown model card from a ``train_tiny`` record: architecture, command, steps, time,
    stopping rule and the measured held-out accuracy per box count."""
    c = record["config"]
    target = ", ".join(str(b) for b in c["target_boxes"])
    lines = [
        "# Tiny entity-tracking model (trained by circuit-distill)",
        "",
        f"Llama-style, {c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} heads, "
        f"{c['n_kv_heads']} KV heads (GQA), MLP width {c['d_mlp'] or 4 * c['d_model']}; "
        f"{record['params']:,} parameters; word-level tokenizer over the `entity_tracking` vocabulary.",
        "",
        "## Training",
        "",
        "```",
        record.get("command") or "(run through the Python API: circuit_distill.training.tiny.train_tiny)",
        "```",
        "",
        f"- Data: {c['min_boxes']}-{c['max_boxes']} boxes, {c['n_queries']} queries per sequence, "
        f"{c['easy_fraction']:.0%} in the easy form `Box T object`, loss on the answers only; "
        f"batch {c['batch_size']}, lr {c['lr']}, {c['warmup']} warmup steps"
        + (f", lr falling linearly to 0 from step {c['anneal_from']} to {c['max_steps']}"
           if c.get("anneal_from") is not None else "") + f", seed {c['seed']}"
        + (", one box count per batch" if c.get("same_boxes_per_batch") else "") + ".",
        f"- Stopping rule: the first evaluation (every {c['eval_every']} steps, {c['eval_n']} fresh prompts) "
        f"where held-out accuracy at {target} boxes reaches {c['target_accuracy']}, or {c['max_steps']} steps.",
        f"- Result: **{record['steps']} steps, {record['seconds'] / 60:.1f} minutes of training**, target "
        + ("**reached**." if record["reached_target"] else "**NOT reached** (stopped by max_steps or by hand)."),
        "",
        f"## Held-out accuracy (`make_task('entity_tracking', n={record['final_eval_n']}, n_boxes=k)`, "
        "seed 20000+k)",
        "",
        "| boxes | " + " | ".join(record["final_accuracy"]) + " |",
        "|---|" + "---|" * len(record["final_accuracy"]),
        "| accuracy | " + " | ".join(f"{a:.3f}" for a in record["final_accuracy"].values()) + " |",
        "",
        "Chance (a random object of the context) is 1/k at k boxes.",
        "",
        "## Evaluations during training",
        "",
        "| step | minutes | loss | " + " | ".join(f"acc@{b}" for b in c["target_boxes"]) + " |",
        "|---|---|---|" + "---|" * len(c["target_boxes"]),
    ]
    for h in record["history"]:
        lines.append(f"| {h['step']} | {h['seconds'] / 60:.1f} | {h['loss']:.3f} | "
                     + " | ".join(f"{h['accuracy'][str(b)]:.3f}" for b in c["target_boxes"]) + " |")
    return "\n".join(lines) + "\n"
