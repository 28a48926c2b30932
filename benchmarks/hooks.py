"""Overhead of ``capture``: forward time while recording every head and MLP, over a plain forward.

GPT-2-small-shaped random model (12 layers, 12 heads, d_model 768), batch 8 x 128 tokens, fp32 CPU,
no grad. Both variants run round-robin in one process; we report medians. Goal: ratio <= 1.10.

    .venv/bin/python benchmarks/hooks.py [--repeats 15]
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, print_table, write_results
from transformers import AutoModelForCausalLM

from circuit_distill.model import Model, capture, tiny_config
from circuit_distill.model.arch import build_arch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = tiny_config("gpt2", n_layers=12, n_heads=12, d_model=768, vocab_size=50257, max_positions=1024)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    model = Model(hf, None, build_arch(hf), name="gpt2-small-shaped (random)")
    comps = model.components("head") + model.components("mlp")
    ids = torch.randint(0, 50257, (args.batch, args.seq))

    def plain():
        with torch.no_grad():
            hf(input_ids=ids)

    def captured():
        with torch.no_grad(), capture(model, comps) as cap:
            hf(input_ids=ids)
            # touch every record so lazy views cannot hide work
            assert len([cap[c] for c in comps]) == len(comps)

    med = interleaved_medians({"plain": plain, "capture": captured}, repeats=args.repeats)
    ratio = med["capture"] / med["plain"]
    print_table(
        [("plain forward", f"{med['plain'] * 1e3:.1f}", "1.000"),
         (f"capture {len(comps)} heads+MLPs", f"{med['capture'] * 1e3:.1f}", f"{ratio:.3f}")],
        ("variant", "median ms", "ratio"),
    )
    print(f"goal capture_over_plain <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'}")
    path = write_results("hooks", {
        "capture_over_plain": ratio, "plain_ms": med["plain"] * 1e3, "capture_ms": med["capture"] * 1e3,
        "components": len(comps), "batch": args.batch, "seq": args.seq, "repeats": args.repeats, "goal": 1.10,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
