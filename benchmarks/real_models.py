"""Speed on a real vocabulary: SmolLM2-135M (49,152 tokens), side by side in one run.

1. The circuit-distillation trainer's own optimisation step (``distill.trainer.train_step``: forward
   with the matched heads captured, CE on the teacher's labels + CKA alignment of 8 matched head pairs
   at every token, backward, AdamW on the matched heads' slices; the teacher's outputs from a teacher
   cache, as ``use_cache`` does; self-distillation from the loaded weights), before and after the
   trainer computed the unembedding at the answer position only. "Before" is the same step with the
   trainer's ``answer_logits`` swapped for what it ran until then (the full ``[batch, seq, vocab]``
   logits of the prepared module, then the answer rows). Both run round-robin on one trainer state in
   this process (medians); ``train_step_full_over_answer_only`` is before / after, and
   ``train_step_loss_diff`` the largest difference of the loss parts of the two from the same weights
   and batch.
2. An all-head mean-ablation sweep (270 heads): ``ablation_sweep(fast=True)`` (layer replay) against
   ``fast=False`` (one full forward per head, unembedding at the answer positions only), with the
   largest difference between their metrics.

Peak memory is the largest resident-set growth over the process's size just before the measured
call, sampled every millisecond, each measurement in a fresh child process started with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the system and do not hide later
peaks (the training steps: one step after a warm-up step). The sweeps are timed once each, in
those children (the naive loop takes minutes).
Goals: training step >= 1.5x, fast sweep >= 2.5x, sweep max abs diff <= 1e-4.

    .venv/bin/python benchmarks/real_models.py [--repeats 5] [--batch 16] [--sweep-prompts 8] [--threads N]
        [--model gemma3-270m] [--no-sweep]

``--threads`` sets torch's thread count in every process (default: torch's own). On a machine whose
cores are shared with other busy jobs, two threads spend much of each operation waiting for each
other (every op is a barrier), which flattens the ratios; ``--threads 1`` measures the work.
``--model`` measures another packaged model (written to ``real_models-<model>.json``); ``--no-sweep``
measures the training step only (written to ``real_models-<model>-train.json``).

Needs ``make setup-real`` (the first load dequantises SmolLM2 into the cache, about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
from _common import interleaved_runs, print_table, write_results

import circuit_distill.distill.trainer as trainer
from circuit_distill import load_model, make_task
from circuit_distill.discovery import SweepResult, ablation_sweep
from circuit_distill.distill import DistillConfig, build_cache
from circuit_distill.distill.objectives import get_objective
from circuit_distill.distill.state import start_training
from circuit_distill.distill.teacher import open_teacher_source
from circuit_distill.model import Component
from circuit_distill.model.loading import position_ids_from_mask
from circuit_distill.model.logits import select_positions

DEFAULT_MODEL = "smollm2-135m"
PAGE = os.sysconf("SC_PAGE_SIZE")
N_PAIRS = 8
VARIANTS = ("full", "answer_only")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_growth(fn) -> tuple[float, float, object]:
    """Run ``fn`` while a thread samples the resident set: (seconds, peak growth in MiB, result)."""
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    return seconds, (max(peak[0], rss()) - base) / 2**20, out


def full_logits_then_select(model, input_ids, attention_mask, positions, *, module=None):
    """What the trainer ran before: the prepared module's full ``[batch, seq, vocab]`` logits, then the
    answer rows ``[batch, vocab]``."""
    logits = module(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask)).logits
    return select_positions(logits, positions)


@contextlib.contextmanager
def variant(name: str):
    """The trainer as it is (``answer_only``) or with its student logits as before (``full``)."""
    kept = trainer.answer_logits
    if name == "full":
        trainer.answer_logits = full_logits_then_select
    try:
        yield
    finally:
        trainer.answer_logits = kept


def pair_heads(model) -> list[Component]:
    """``N_PAIRS`` student heads spread over the layers (each paired with itself in the teacher)."""
    a = model.arch
    heads = {Component.make_head((i + 1) * a.n_layers // (N_PAIRS + 1), i % a.n_heads) for i in range(N_PAIRS)}
    return sorted(heads)


def trainer_step(model, batch: int):
    """A trainer state on ``model`` (self-distillation of ``N_PAIRS`` head pairs with ``ce+align_cka``
    from a teacher cache of the loaded weights); returns ``(step, state)``, ``step()`` one ``train_step``."""
    from accelerate import Accelerator

    td = make_task("entity_tracking", model.tokenizer, 4 * batch, seed=0, n_boxes=(2, 7))
    heads = pair_heads(model)
    pairs = [(h, h) for h in heads]
    cfg = DistillConfig(objective="ce+align_cka", trainable="matched_heads", positions="all", labels="teacher",
                        batch_size=batch, lr=1e-4, steps=10**6, eval_every=0, use_cache=True, seed=0)
    with tempfile.TemporaryDirectory() as d:
        cache = build_cache(model, td, heads, cfg.positions, d, batch_size=batch)
    obj = get_objective(cfg.objective)
    source = open_teacher_source(obj, cfg, td, heads, cache=cache)
    state = start_training(model, cfg, heads, Accelerator(cpu=True))
    state.model.train()
    return (lambda: trainer.train_step(state, model, td, source, pairs, obj, cfg)), state, td


def loss_parity(model, step, state) -> float:
    """The largest difference between the loss parts of both variants' first step (same weights, same batch);
    the weights are left as they were."""
    init = {k: v.detach().clone() for k, v in model.hf.state_dict().items()}
    parts = {}
    for name in VARIANTS:
        model.hf.load_state_dict(init)
        state.step = 0
        with variant(name):
            rec = step()
        parts[name] = {k: v for k, v in rec.items() if k not in ("step", "lr", "step_seconds")}
    model.hf.load_state_dict(init)
    state.step = 0
    return max(abs(parts["full"][k] - parts["answer_only"][k]) for k in parts["full"])


def time_train_steps(args) -> dict:
    """Load the model and time the trainer's step in both variants round-robin (one warm-up round):
    median seconds per variant, the loss parity, the prompt width and the load time."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    step, state, td = trainer_step(model, args.batch)
    parity = loss_parity(model, step, state)

    def timed(name):
        def run():
            with variant(name):
                return step()["step_seconds"]
        return run

    runs = interleaved_runs({v: timed(v) for v in VARIANTS}, args.repeats, warmup=1)
    seconds = {v: sorted(s for _, s in runs[v])[len(runs[v]) // 2] for v in VARIANTS}
    return {"seconds": seconds, "all_seconds": {v: [s for _, s in runs[v]] for v in VARIANTS},
            "loss_diff": parity, "seq": int(td.clean.input_ids.shape[1]), "load_seconds": load_seconds,
            "pairs": [str(h) for h in pair_heads(model)]}


def sweep(model, prompts: int, fast: bool) -> SweepResult:
    td = make_task("entity_tracking", model.tokenizer, prompts, seed=1, n_boxes=(2, 7), n_reference=prompts)
    return ablation_sweep(model, td, model.components("head"), method="mean", fast=fast, progress=False)


def child(kind: str, args) -> None:
    """Measure one variant in this (fresh) process and print a JSON line."""
    torch.manual_seed(0)
    model = load_model(args.model)
    if kind.startswith("train_"):
        step, _, _ = trainer_step(model, args.batch)
        with variant(kind.removeprefix("train_")):
            step()  # warm-up: the optimizer state and the gradients exist from here on
            seconds, peak, _ = peak_growth(step)
        out = {}
    else:
        seconds, peak, res = peak_growth(lambda: sweep(model, args.sweep_prompts, kind == "sweep_fast"))
        out = {"result": res.to_dict()}
    print(json.dumps({"seconds": seconds, "peak_mib": peak, **out}))


def run_child(kind: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", kind, "--batch", str(args.batch),
           "--sweep-prompts", str(args.sweep_prompts), "--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def max_abs_diff(a: SweepResult, b: SweepResult) -> float:
    d = max(abs(a.clean[m] - b.clean[m]) for m in a.clean)
    return max([d] + [abs(a.ablated[c][m] - b.ablated[c][m]) for c in a.ablated for m in a.clean])


def sweep_results(args) -> dict:
    sweeps = {k: run_child(k, args) for k in ("sweep_fast", "sweep_naive")}
    fast, naive = (SweepResult.from_dict(sweeps[k]["result"]) for k in ("sweep_fast", "sweep_naive"))
    return {
        "sweep_naive_over_fast": sweeps["sweep_naive"]["seconds"] / sweeps["sweep_fast"]["seconds"],
        "sweep_max_abs_diff": max_abs_diff(fast, naive),
        "sweep_seconds": {"fast": sweeps["sweep_fast"]["seconds"], "naive": sweeps["sweep_naive"]["seconds"]},
        "sweep_peak_mib": {"fast": sweeps["sweep_fast"]["peak_mib"], "naive": sweeps["sweep_naive"]["peak_mib"]},
        "sweep_heads": len(fast.ablated), "sweep_prompts": args.sweep_prompts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5, help="timed training steps per variant")
    ap.add_argument("--batch", type=int, default=16, help="prompts per training step")
    ap.add_argument("--sweep-prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, help="torch threads in every process (default: torch's own)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a packaged model's short name")
    ap.add_argument("--no-sweep", action="store_true", help="measure the training step only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args)
    tr = time_train_steps(args)
    steps = tr["seconds"]
    mem = {v: run_child(f"train_{v}", args) for v in VARIANTS}
    res = {
        "model": args.model,
        "train_step_full_over_answer_only": steps["full"] / steps["answer_only"],
        "train_step_seconds": steps,
        "train_step_all_seconds": tr["all_seconds"],
        "train_step_loss_diff": tr["loss_diff"],
        "train_step_peak_mib": {v: mem[v]["peak_mib"] for v in VARIANTS},
        "train_step": {"what": "distill.trainer.train_step, ce+align_cka, teacher labels from a teacher cache, "
                               "matched_heads trainable, alignment at every token; 'full' = the same step with the "
                               "full logits then the answer rows (the trainer before)",
                       "pairs": tr["pairs"]},
        **({} if args.no_sweep else sweep_results(args)),
        "load_seconds": tr["load_seconds"],
        "train_batch": args.batch, "train_seq": tr["seq"], "repeats": args.repeats,
        "goals": {"train_step_full_over_answer_only": 1.5, "sweep_naive_over_fast": 2.5, "sweep_max_abs_diff": 1e-4},
    }
    name = "real_models" if args.model == DEFAULT_MODEL else f"real_models-{args.model}"
    path = write_results(name + ("-train" if args.no_sweep else ""), res)
    rows = [("trainer step (full / answer-only)", f"{steps['full']:.2f} s / {steps['answer_only']:.2f} s",
             f"{res['train_step_full_over_answer_only']:.2f}x",
             f"{res['train_step_peak_mib']['full']:.0f} / {res['train_step_peak_mib']['answer_only']:.0f} MiB")]
    if not args.no_sweep:
        rows.append((f"all-head sweep, {res['sweep_heads']} heads (naive / fast)",
                     f"{res['sweep_seconds']['naive']:.1f} s / {res['sweep_seconds']['fast']:.1f} s",
                     f"{res['sweep_naive_over_fast']:.2f}x",
                     f"{res['sweep_peak_mib']['naive']:.0f} / {res['sweep_peak_mib']['fast']:.0f} MiB"))
    print_table(rows, ("measurement", "seconds", "ratio", "peak memory"))
    print(f"trainer loss parts max abs diff {res['train_step_loss_diff']:.2e}"
          + ("" if args.no_sweep else f"; sweep max abs diff {res['sweep_max_abs_diff']:.2e}") + f"; wrote {path}")


if __name__ == "__main__":
    main()
