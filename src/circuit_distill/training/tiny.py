"""Train the project's own tiny models (the built-in teachers and warm students) on a task by name.

A Llama-style model is trained from scratch on sequences drawn by the task's curriculum
(``training.curricula``: ``entity_tracking`` and ``theory_of_mind``), with the loss on the answer
tokens only; each curriculum says which easier auxiliary forms its sequences mix in to leave the
loss plateau, and how competence is measured on fresh held-out ``make_task`` prompts.

Training stops at a *competence level*, not a step count: every ``eval_every`` steps the held-out
accuracy of each target (entity tracking: each of ``target_boxes``; theory of mind: each of
``target_cases`` on the test split) is measured and training stops at the first evaluation where all
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
from ..tasks.theory_of_mind import CASES
from .curricula import curriculum_for
from .tiny_card import model_card
from .tiny_init import lookback_init, match_queries_to_keys, validate_lookback

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "elapsed", "history", "reached", "config")
MODEL_FILES = ("model.safetensors", "training.json")  # what a finished run leaves in its output directory


@dataclass
class TinyTrainConfig(Config):
    """Everything that defines a ``train_tiny`` run (saved with the model as ``training.json``)."""

    task: str = option("entity_tracking", "task to train on: entity_tracking or theory_of_mind")
    n_layers: int = option(2, "transformer layers")
    d_model: int = option(128, "residual width")
    n_heads: int = option(4, "query heads per layer")
    n_kv_heads: int = option(2, "key/value heads per layer (GQA)")
    d_mlp: int | None = option(None, "MLP width (None: 4 * d_model)")
    min_boxes: int = option(2, "fewest boxes in a training context")
    max_boxes: int = option(7, "most boxes in a training context")
    n_queries: int = option(4, "queries per training sequence")
    easy_fraction: float = option(0.5, "fraction of queries in the easy form (entity_tracking: 'Box T object'; "
                                       "theory_of_mind: of the extra questions, answered right after the container)")
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
    report_n: int = option(500, "prompts per box count (or case) of the final measurement")
    target_cases: list[str] = option(help="theory_of_mind: cases of the stopping rule (test split)",
                                     factory=lambda: list(CASES))
    case_weights: list[float] = option(help="theory_of_mind: how often each case (true belief, false belief, unknown) "
                                       "is drawn for training (see training.curricula)", factory=lambda: [1.0, 1.0, 1.0])
    fillers: int = option(256, "theory_of_mind: training-only entity words e0.. (see training.curricula)")
    story_loss: bool = option(False, "theory_of_mind: also train next-word prediction on every predictable "
                                     "word (template words and entities seen before), not only the answers")
    bind_fraction: float = option(0.0, "theory_of_mind: fraction of the extra questions asking what a character "
                                       "first filled a container with (the binding alone; see training.curricula)")
    order_fraction: float = option(0.0, "theory_of_mind: fraction of the extra questions asking whether a character "
                                        "grabbed its container first (yes/no; see training.curricula)")
    own_fraction: float = option(0.0, "theory_of_mind: fraction of the extra questions asking whether a character "
                                      "filled a container first (yes/no; see training.curricula)")
    recap_fraction: float = option(0.0, "theory_of_mind: fraction of sequences ending with the two filling "
                                        "sentences again, their containers and drinks as targets (see training.curricula)")
    entity_shift: float = option(0.0, "theory_of_mind: norm of one fixed random vector added to every entity "
                                      "embedding, so a head at any entity word has a word-independent query (see "
                                      "training.curricula)")
    qk_match_init: float = option(0.0, "start each query head as this multiple of its key head (mimetic "
                                       "initialisation: heads start out matching a word with its earlier mentions; 0: off)")
    lookback_offsets: list[int] = option(help="theory_of_mind: start first-layer head h looking this many words back "
                                         "and copying (one per head; empty: off; see training.tiny_init)", factory=list)
    bind_heads: list[int] = option(help="with lookback_offsets: two first-layer heads (query's, key's) whose copies "
                                   "the second layer starts out matching, optionally a third (owner: its copy is "
                                   "fetched where they match; see training.tiny_init)", factory=list)
    order_heads: list[int] = option(help="with bind_heads: two first-layer heads (the question's character's copy, "
                                    "the previous word's) the second layer starts out reading order from (which "
                                    "filling sentence a container or character came first in; see training.tiny_init)",
                                    factory=list)
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
        curriculum_for(self.task).validate(self)
        if self.n_heads % self.n_kv_heads or self.d_model % self.n_heads:
            raise ConfigError("n_heads must divide d_model and be a multiple of n_kv_heads")
        for k in ("entity_shift", "qk_match_init"):
            if not 0.0 <= getattr(self, k) < float("inf"):
                raise ConfigError(f"{k} must be a finite number >= 0, got {getattr(self, k)}")
        validate_lookback(self)
        for k in ("easy_fraction", "bind_fraction", "order_fraction", "own_fraction", "recap_fraction"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        if self.bind_fraction + self.order_fraction + self.own_fraction > 1.0:
            raise ConfigError(f"bind_fraction + order_fraction + own_fraction must be <= 1 (fractions of the extra "
                              f"questions), got {self.bind_fraction} + {self.order_fraction} + {self.own_fraction}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        if self.anneal_from is not None and not 0 <= self.anneal_from < self.max_steps:
            raise ConfigError(f"anneal_from must be in [0, max_steps), got {self.anneal_from}")
        for k in ("n_queries", "batch_size", "eval_every", "eval_n", "checkpoint_every", "threads"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")


def entity_tokenizer():
    """The word-level tokenizer over the ``entity_tracking`` vocabulary (shipped with the models)."""
    return curriculum_for("entity_tracking").tokenizer(None)


def sample_batch(cfg: TinyTrainConfig, tokenizer, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training batch of ``step``: ``input_ids [batch, seq]``, ``attention_mask [batch, seq]`` and
    ``labels [batch, seq]`` (the answer token at the position that predicts it, -100 elsewhere)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    rows, targets = curriculum_for(cfg.task).rows(cfg, rng, tokenizer.get_vocab())
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


def entity_shift(cfg: TinyTrainConfig) -> torch.Tensor:
    """``[d_model]``: the vector added to every frozen and redrawn embedding (norm ``cfg.entity_shift``, a
    fixed random direction of ``cfg.seed``; zeros when 0)."""
    v = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(cfg.seed + 77_777))
    return v / v.norm() * cfg.entity_shift


def build_model(cfg: TinyTrainConfig, tokenizer) -> torch.nn.Module:
    """A fresh Llama-style model, initialised from ``cfg.seed``.

    If the task's curriculum ties input and output embeddings and names frozen words (theory of
    mind), their rows are redrawn with std 1/sqrt(d_model) and a gradient hook keeps them there."""
    from transformers import AutoModelForCausalLM

    cur = curriculum_for(cfg.task)
    extra = {"tie_word_embeddings": True} if cur.tied_embeddings else {}
    hf_cfg = tiny_config("llama", n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                         d_model=cfg.d_model, d_mlp=cfg.d_mlp, vocab_size=len(tokenizer), max_positions=256, **extra)
    torch.manual_seed(cfg.seed)
    hf = AutoModelForCausalLM.from_config(hf_cfg)
    if cfg.qk_match_init:
        match_queries_to_keys(hf, cfg.qk_match_init, cfg.n_heads, cfg.n_kv_heads)
    vocab = tokenizer.get_vocab()
    frozen = sorted(vocab[w] for w in cur.frozen_words(cfg))
    if frozen:
        weight = hf.get_input_embeddings().weight
        with torch.no_grad():
            weight[frozen] = torch.randn(len(frozen), cfg.d_model) / cfg.d_model ** 0.5 + entity_shift(cfg)
        keep = torch.ones(weight.shape[0], 1)
        keep[frozen] = 0.0
        weight.register_hook(lambda grad: grad * keep)
    if cfg.lookback_offsets:
        entity_rows = set(frozen)
        lookback_init(hf, cfg, entity_shift(cfg), [i for i in range(len(tokenizer)) if i not in entity_rows])
    return hf


def measure_competence(model: Model, cfg: TinyTrainConfig, n: int, *, final: bool = False) -> dict[str, float]:
    """Held-out accuracy on ``n`` fresh prompts per key: the stopping rule's keys (``target_boxes`` or
    ``target_cases``), or with ``final`` the report's (``report_boxes``, or every case on both splits)."""
    cur = curriculum_for(cfg.task)
    keys = cur.report_keys(cfg) if final else cur.target_keys(cfg)
    return {k: cur.accuracy(model, k, n, final=final) for k in keys}


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


def tiny_optimizer(hf, cfg: TinyTrainConfig) -> torch.optim.AdamW:
    """AdamW over every parameter; when the curriculum freezes embedding rows, the embeddings get no
    weight decay (frozen rows keep their scale, so words never drawn in training stay like the others)."""
    opt = dict(lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    if not curriculum_for(cfg.task).frozen_words(cfg):
        return torch.optim.AdamW(hf.parameters(), **opt)
    emb = hf.get_input_embeddings().weight
    rest = [p for p in hf.parameters() if p is not emb]
    return torch.optim.AdamW([{"params": rest}, {"params": [emb], "weight_decay": 0.0}], **opt)


def redraw_embeddings(hf, cfg: TinyTrainConfig, tokenizer, step: int) -> None:
    """Give the curriculum's training-only words fresh random embeddings for ``step`` (std 1/sqrt(d_model),
    seeded by (seed, step)): no feature of a particular vector can be learned (theory of mind's fillers)."""
    words = curriculum_for(cfg.task).redrawn_words(cfg)
    if not words:
        return
    vocab = tokenizer.get_vocab()
    rows = [vocab[w] for w in words]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    with torch.no_grad():
        hf.get_input_embeddings().weight[rows] = (torch.randn(len(rows), cfg.d_model, generator=gen) / cfg.d_model ** 0.5
                                                  + entity_shift(cfg))


def tiny_step(hf, opt, sched, cfg: TinyTrainConfig, tokenizer, step: int) -> torch.Tensor:
    """One optimisation step on the batch of ``step`` (loss on the answer tokens, gradients clipped at 1);
    returns the loss."""
    hf.train()
    redraw_embeddings(hf, cfg, tokenizer, step)
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
    and return the training record (steps, seconds, eval history, final accuracies per box count or case).

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
    tokenizer = curriculum_for(cfg.task).tokenizer(cfg)
    hf = build_model(cfg, tokenizer)
    opt = tiny_optimizer(hf, cfg)
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
            accs = measure_competence(model, cfg, cfg.eval_n)
            run.elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            run.history.append({"step": run.step, "loss": round(loss.item(), 5), "seconds": round(run.elapsed, 1),
                                "accuracy": accs})
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
    final = measure_competence(model, cfg, cfg.report_n, final=True)
    record = {"config": asdict(cfg), "steps": run.step, "seconds": round(run.elapsed, 1),
              "reached_target": run.reached, "first_loss": run.first_loss, "history": run.history,
              "final_accuracy": final, "final_eval_n": cfg.report_n, "params": sum(p.numel() for p in hf.parameters()),
              "torch": torch.__version__, "command": command}
    export_tiny_model(hf, tokenizer, out, record)
    log("final accuracy: " + " ".join(f"{b}:{a:.3f}" for b, a in final.items()))
    return record
