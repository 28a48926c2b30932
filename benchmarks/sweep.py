"""Cost of discovery: the fast single-head ablation sweep against the naive loop, and attribution patching.

GPT-2-small-shaped random model (12 layers, 12 heads, d_model 768), batch 8 x 32 tokens, fp32 CPU.
All 144 heads are mean-ablated one at a time, by the fast path (clean prefix cached, only layers
L.. re-run, several ablations stacked per forward) and by the naive loop (one full forward per head
with ``intervene``), round-robin in one process; we report medians and the largest difference
between their results. Goals: speedup >= 2 with identical results (max_abs_diff <= 1e-5), and one
attribution-patching pass over every head and MLP <= 4 forward-equivalents (its wall time over
a plain forward's).

    .venv/bin/python benchmarks/sweep.py [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, print_table, write_results
from transformers import AutoModelForCausalLM

from circuit_distill.discovery import ablation_sweep, attribution_patching
from circuit_distill.model import Model, tiny_config
from circuit_distill.model.arch import build_arch
from circuit_distill.tasks import Batch, TaskData

VOCAB = 50257


def random_task(batch: int, seq: int, seed: int = 0) -> TaskData:
    g = torch.Generator().manual_seed(seed)

    def b() -> Batch:
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        return Batch(ids, torch.ones_like(ids))

    clean = b()
    return TaskData("random", clean, torch.randint(0, VOCAB, (batch,), generator=g),
                    torch.randint(0, VOCAB, (batch,), generator=g), b(), b(), {"last": clean.last})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--sweep-batch-size", type=int, default=64, help="rows per forward of the fast path")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = tiny_config("gpt2", n_layers=12, n_heads=12, d_model=768, vocab_size=VOCAB, max_positions=1024)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    model = Model(hf, None, build_arch(hf), name="gpt2-small-shaped (random)")
    td = random_task(args.batch, args.seq)
    heads = model.components("head")
    kw = dict(method="mean", batch_size=args.sweep_batch_size, progress=False)
    results = {}

    def fast():
        results["fast"] = ablation_sweep(model, td, heads, fast=True, **kw)

    def naive():
        results["naive"] = ablation_sweep(model, td, heads, fast=False, **kw)

    med = interleaved_medians({"fast": fast, "naive": naive}, repeats=args.repeats, warmup=0)
    a, b = results["fast"], results["naive"]
    diff = max(abs(a.ablated[c][m] - b.ablated[c][m]) for c in heads for m in a.clean)
    diff = max(diff, max(abs(a.clean[m] - b.clean[m]) for m in a.clean))
    speedup = med["naive"] / med["fast"]

    comps = heads + model.components("mlp")

    def plain():
        with torch.no_grad():
            model(td.clean.input_ids, td.clean.attention_mask, use_cache=False)

    def attribution():
        attribution_patching(model, td, comps, metric="logit_diff")

    med_a = interleaved_medians({"forward": plain, "attribution": attribution}, repeats=max(5, args.repeats * 3))
    fe = med_a["attribution"] / med_a["forward"]
    print_table(
        [("naive loop (1 forward per head)", f"{med['naive']:.2f}", f"{b.forwards:.1f}", "1.00"),
         ("fast sweep (prefix cache + stacking)", f"{med['fast']:.2f}", f"{a.forwards:.1f}", f"{speedup:.2f}"),
         ("plain forward", f"{med_a['forward']:.3f}", "1.0", ""),
         (f"attribution patching ({len(comps)} comps)", f"{med_a['attribution']:.3f}", f"{fe:.2f} (by time)", "")],
        ("variant", "median s", "forward-equivalents", "speedup"),
    )
    print(f"max_abs_diff fast vs naive: {diff:.2e}")
    print(f"goal speedup >= 2: {'met' if speedup >= 2 else 'MISSED'}; goal identical (<= 1e-5): "
          f"{'met' if diff <= 1e-5 else 'MISSED'}; goal attribution <= 4 forward-equivalents: "
          f"{'met' if fe <= 4 else 'MISSED'}")
    path = write_results("sweep", {
        "fast_over_naive_speedup": speedup, "max_abs_diff": diff, "attribution_forward_equivalents": fe,
        "fast_seconds": med["fast"], "naive_seconds": med["naive"], "fast_counted_forwards": a.forwards,
        "naive_counted_forwards": b.forwards, "forward_seconds": med_a["forward"],
        "attribution_seconds": med_a["attribution"], "heads": len(heads), "batch": args.batch, "seq": args.seq,
        "sweep_batch_size": args.sweep_batch_size, "repeats": args.repeats,
        "goals": {"fast_over_naive_speedup": 2.0, "max_abs_diff": 1e-5, "attribution_forward_equivalents": 4.0},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
