"""Speed on a real vocabulary: SmolLM2-135M (49,152 tokens), side by side in one run.

1. A forward+backward training step (cross-entropy at the answer position of entity-tracking
   prompts, every parameter trainable): the full ``[batch, seq, vocab]`` logits then the answer
   rows, against ``answer_logits`` (unembedding at the answer positions only). Timed round-robin in
   this process (medians); ``train_step_full_over_answer_only`` is full / answer-only.
2. An all-head mean-ablation sweep (270 heads): ``ablation_sweep(fast=True)`` (layer replay) against
   ``fast=False`` (one full forward per head), with the largest difference between their metrics.

Peak memory is the largest resident-set growth over the process's size just before the measured
call, sampled every millisecond, each measurement in a fresh child process started with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the system and do not hide later
peaks. The sweeps are timed once each, in those children (the naive loop takes minutes).
Goals: training step >= 1.5x, fast sweep >= 2.5x, sweep max abs diff <= 1e-4.

    .venv/bin/python benchmarks/real_models.py [--repeats 5] [--batch 16] [--sweep-prompts 8] [--threads N]
        [--model gemma3-270m]

``--threads`` sets torch's thread count in every process (default: torch's own). On a machine whose
cores are shared with other busy jobs, two threads spend much of each operation waiting for each
other (every op is a barrier), which flattens the ratios; ``--threads 1`` measures the work.
``--model`` measures another packaged model (written to ``real_models-<model>.json``).

Needs ``make setup-real`` (the first load dequantises SmolLM2 into the cache, about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch
from _common import interleaved_medians, print_table, write_results

from circuit_distill import load_model, make_task
from circuit_distill.discovery import SweepResult, ablation_sweep
from circuit_distill.model.logits import answer_logits, select_positions

DEFAULT_MODEL = "smollm2-135m"
PAGE = os.sysconf("SC_PAGE_SIZE")


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


def train_data(model, batch: int):
    td = make_task("entity_tracking", model.tokenizer, batch, seed=0, n_boxes=(2, 7))
    return td.clean.input_ids, td.clean.attention_mask, td.position("last"), td.answer_ids


def train_step(model, data, answer_only: bool) -> float:
    ids, mask, pos, target = data
    model.hf.zero_grad(set_to_none=True)
    logits = answer_logits(model, ids, mask, pos) if answer_only else select_positions(model(ids, mask), pos)
    loss = torch.nn.functional.cross_entropy(logits.float(), target)
    loss.backward()
    return loss.item()


def sweep(model, prompts: int, fast: bool) -> SweepResult:
    td = make_task("entity_tracking", model.tokenizer, prompts, seed=1, n_boxes=(2, 7), n_reference=prompts)
    return ablation_sweep(model, td, model.components("head"), method="mean", fast=fast, progress=False)


def child(kind: str, args) -> None:
    """Measure one variant in this (fresh) process and print a JSON line."""
    torch.manual_seed(0)
    model = load_model(args.model)
    if kind.startswith("train"):
        model.hf.train(False)
        data = train_data(model, args.batch)
        answer_only = kind == "train_answer_only"
        train_step(model, data, answer_only)  # warm-up: the gradients exist from here on
        model.hf.zero_grad(set_to_none=False)
        seconds, peak, _ = peak_growth(lambda: train_step(model, data, answer_only))
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


def time_train_steps(args) -> tuple[float, int, dict[str, float], dict[str, float]]:
    """Load the model, then time both training steps round-robin: (load seconds, prompt width,
    median seconds per variant, last loss per variant)."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    data = train_data(model, args.batch)
    losses: dict[str, float] = {}
    steps = interleaved_medians({
        "full": lambda: losses.__setitem__("full", train_step(model, data, False)),
        "answer_only": lambda: losses.__setitem__("answer_only", train_step(model, data, True)),
    }, args.repeats)
    return load_seconds, int(data[0].shape[1]), steps, losses


def max_abs_diff(a: SweepResult, b: SweepResult) -> float:
    d = max(abs(a.clean[m] - b.clean[m]) for m in a.clean)
    return max([d] + [abs(a.ablated[c][m] - b.ablated[c][m]) for c in a.ablated for m in a.clean])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5, help="timed training steps per variant")
    ap.add_argument("--batch", type=int, default=16, help="prompts per training step")
    ap.add_argument("--sweep-prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, help="torch threads in every process (default: torch's own)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a packaged model's short name")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args)
    load_seconds, seq, steps, losses = time_train_steps(args)
    mem = {k: run_child(k, args) for k in ("train_full", "train_answer_only")}
    sweeps = {k: run_child(k, args) for k in ("sweep_fast", "sweep_naive")}
    fast, naive = (SweepResult.from_dict(sweeps[k]["result"]) for k in ("sweep_fast", "sweep_naive"))
    res = {
        "model": args.model,
        "train_step_full_over_answer_only": steps["full"] / steps["answer_only"],
        "sweep_naive_over_fast": sweeps["sweep_naive"]["seconds"] / sweeps["sweep_fast"]["seconds"],
        "sweep_max_abs_diff": max_abs_diff(fast, naive),
        "train_step_seconds": steps,
        "train_step_loss_diff": abs(losses["full"] - losses["answer_only"]),
        "train_step_peak_mib": {"full": mem["train_full"]["peak_mib"],
                                "answer_only": mem["train_answer_only"]["peak_mib"]},
        "sweep_seconds": {"fast": sweeps["sweep_fast"]["seconds"], "naive": sweeps["sweep_naive"]["seconds"]},
        "sweep_peak_mib": {"fast": sweeps["sweep_fast"]["peak_mib"], "naive": sweeps["sweep_naive"]["peak_mib"]},
        "sweep_heads": len(fast.ablated),
        "load_seconds": load_seconds,
        "train_batch": args.batch, "train_seq": seq, "sweep_prompts": args.sweep_prompts,
        "repeats": args.repeats,
        "goals": {"train_step_full_over_answer_only": 1.5, "sweep_naive_over_fast": 2.5, "sweep_max_abs_diff": 1e-4},
    }
    path = write_results("real_models" if args.model == DEFAULT_MODEL else f"real_models-{args.model}", res)
    print_table([
        ("train step (full / answer-only)", f"{steps['full']:.2f} s / {steps['answer_only']:.2f} s",
         f"{res['train_step_full_over_answer_only']:.2f}x",
         f"{res['train_step_peak_mib']['full']:.0f} / {res['train_step_peak_mib']['answer_only']:.0f} MiB"),
        (f"all-head sweep, {res['sweep_heads']} heads (naive / fast)",
         f"{res['sweep_seconds']['naive']:.1f} s / {res['sweep_seconds']['fast']:.1f} s",
         f"{res['sweep_naive_over_fast']:.2f}x",
         f"{res['sweep_peak_mib']['naive']:.0f} / {res['sweep_peak_mib']['fast']:.0f} MiB"),
    ], ("measurement", "seconds", "ratio", "peak memory"))
    print(f"sweep max abs diff {res['sweep_max_abs_diff']:.2e}; wrote {path}")


if __name__ == "__main__":
    main()
