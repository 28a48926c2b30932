"""Per-step cost of the circuit-distillation trainer: alignment over KD, cached alignment over CE, and
cached interchange-intervention training (``ce+iit``) over CE.

Tiny Llama-style models with GQA (teacher 4 layers, d_model 128, 8 heads / 2 KV heads; student 2
layers, d_model 64, 4 heads / 2 KV heads), induction prompts of 24 tokens, batch 32, 4 matched head
pairs, trainable = matched heads, alignment over all non-padding positions. Goals: ``ce+align_cka``
/ ``kd`` (teacher online) <= 1.15; ``ce+align_cka`` with the teacher cache / ``ce`` (no teacher) <= 1.15;
``ce+iit`` with the teacher cache (its intervened logits precomputed; corrupted sources, all positions,
one pair per step, gold CE labels like ``ce``) / ``ce`` <= 2.0 (one extra student forward, of the
``[source; base]`` rows).

Step time: each variant is a full ``distill(...)`` call of ``--steps`` steps; the calls run
round-robin in one process, ``--repeats`` times, so machine noise hits all variants alike. The
trainer records each optimisation step's wall time (``step_seconds`` in its history: batch,
forward, losses, backward, update); the figure is the median over all steps but the first of each
call (which allocates the optimizer state). One-off work (set-up, and the end-of-run pair-CKA
evaluation that only the variants with a teacher or cache run) is therefore not in it; the whole
call divided by its steps is reported next to it as ``per_call``.

Peak memory: each variant in a fresh subprocess, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(peak resident set of the whole process, models and task data included) and its growth during
the training call.

    .venv/bin/python benchmarks/distill_step.py [--steps 30] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import interleaved_runs, print_table, write_results

from circuit_distill.distill import build_cache, distill
from circuit_distill.distill.config import DistillConfig
from circuit_distill.distill.iit import Interchange, cache_interchanges, teacher_head_sets
from circuit_distill.matching import ComponentMap
from circuit_distill.model import Component, load_model, tiny_model
from circuit_distill.tasks import make_task

PAIRS = [((1, 0), (3, 1)), ((1, 2), (2, 5)), ((0, 1), (1, 7)), ((1, 3), (3, 4))]
VARIANTS = ("kd_online", "align_online", "ce", "align_cached", "iit_cached")


def setup(root: Path):
    t = tiny_model("llama", root / "t", n_layers=4, n_heads=8, n_kv_heads=2, d_model=128, seed=1)
    s = tiny_model("llama", root / "s", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, seed=2)
    teacher, student = load_model(t, check=False), load_model(s, check=False)
    train = make_task("induction", student.tokenizer, 256, seed=0, seq_len=24)
    cmap = ComponentMap([(Component.make_head(*a), Component.make_head(*b)) for a, b in PAIRS])
    cache = build_cache(teacher, train, cmap.teacher_components, "all", root / "cache")
    cache_interchanges(cache, teacher, train, teacher_head_sets(cmap.pairs, "one"), Interchange())
    return s, teacher, train, cmap, cache


def runner(variant: str, s_dir, teacher, train, cmap, cache, steps: int):
    base = dict(steps=steps, batch_size=32, lr=1e-3, eval_every=0, use_cache=False, seed=0)
    cfgs = {"kd_online": (DistillConfig(objective="kd", **base), teacher, None),
            "align_online": (DistillConfig(objective="ce+align_cka", **base), teacher, None),
            "ce": (DistillConfig(objective="ce", labels="gold", **base), None, None),
            "align_cached": (DistillConfig(objective="ce+align_cka", **base), None, cache),
            "iit_cached": (DistillConfig(objective="ce+iit", labels="gold", **base), None, cache)}
    cfg, t, c = cfgs[variant]
    student = load_model(s_dir, check=False)
    init = {k: v.detach().clone() for k, v in student.hf.state_dict().items()}

    def run():
        student.hf.load_state_dict(init)
        res = distill(student, train, teacher=t, cache=c, component_map=cmap, config=cfg, progress=False)
        return [h["step_seconds"] for h in res.history if "step_seconds" in h]
    return run


def memory(variant: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        s, teacher, train, cmap, cache = setup(Path(d))
        fn = runner(variant, s, teacher, train, cmap, cache, steps)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": after / 1024, "growth_mb": (after - before) / 1024}))


def step_times(fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Round-robin calls (one warm-up round): every step time but each call's first, and the median
    whole-call time per step, per variant."""
    runs = interleaved_runs(fns, repeats, warmup=1)
    steps = {k: [t for _, times in v for t in times[1:]] for k, v in runs.items()}
    calls = {k: statistics.median(sec / len(times) for sec, times in v) for k, v in runs.items()}
    return steps, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--memory", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (each call's first step is not counted)")
    torch.set_num_threads(1)
    if args.memory:
        memory(args.memory, args.steps)
        return
    with tempfile.TemporaryDirectory() as d:
        s, teacher, train, cmap, cache = setup(Path(d))
        fns = {v: runner(v, s, teacher, train, cmap, cache, args.steps) for v in VARIANTS}
        samples, per_call = step_times(fns, args.repeats)
    per_step = {v: statistics.median(samples[v]) for v in VARIANTS}
    quartiles = {v: [float(q) for q in statistics.quantiles(samples[v], n=4)] for v in VARIANTS}
    mem = {}
    for v in VARIANTS:
        r = subprocess.run([sys.executable, __file__, "--memory", v, "--steps", str(args.steps)],
                           capture_output=True, text=True, check=True)
        mem[v] = json.loads(r.stdout.strip().splitlines()[-1])
    res = {
        "align_over_kd": per_step["align_online"] / per_step["kd_online"],
        "cached_align_over_ce": per_step["align_cached"] / per_step["ce"],
        "goal": 1.15,
        "cached_iit_over_ce": per_step["iit_cached"] / per_step["ce"],
        "iit_goal": 2.0,
        "step_seconds": per_step,
        "step_seconds_quartiles": quartiles,
        "per_call": {"align_over_kd": per_call["align_online"] / per_call["kd_online"],
                     "cached_align_over_ce": per_call["align_cached"] / per_call["ce"],
                     "cached_iit_over_ce": per_call["iit_cached"] / per_call["ce"],
                     "seconds_per_step": per_call,
                     "note": f"median whole distill() call of {args.steps} steps / {args.steps}: set-up and "
                             "the end-of-run pair-CKA evaluation included"},
        "memory": {"method": "resource.getrusage ru_maxrss, one fresh subprocess per variant (whole process)",
                   **mem},
        "setup": {"teacher": "llama 4L d128 8H/2KV", "student": "llama 2L d64 4H/2KV", "batch": 32, "seq": 24,
                  "pairs": len(PAIRS), "trainable": "matched_heads", "positions": "all",
                  "steps_per_call": args.steps, "repeats": args.repeats, "threads": 1,
                  "step_time": "median of the trainer's step_seconds over all steps but each call's first",
                  "iit": "ce+iit, gold labels, corrupted counterpart as the base, all positions, one pair per step, "
                         "teacher intervened logits cached"},
    }
    path = write_results("distill_step", res)
    print_table([(k, f"{per_step[k] * 1e3:.2f}", "-".join(f"{q * 1e3:.1f}" for q in quartiles[k][::2]),
                  f"{per_call[k] * 1e3:.2f}", f"{mem[k]['peak_rss_mb']:.0f}", f"{mem[k]['growth_mb']:.1f}")
                 for k in VARIANTS],
                ("variant", "ms/step", "IQR", "ms/step whole call", "peak RSS MB", "growth MB"))
    print(f"align/kd = {res['align_over_kd']:.3f}   cached align/ce = {res['cached_align_over_ce']:.3f}"
          f"   (goal <= 1.15; whole calls: {res['per_call']['align_over_kd']:.3f} and "
          f"{res['per_call']['cached_align_over_ce']:.3f})")
    print(f"cached iit/ce = {res['cached_iit_over_ce']:.3f}   (goal <= 2.0; whole calls: "
          f"{res['per_call']['cached_iit_over_ce']:.3f})   -> {path}")


if __name__ == "__main__":
    main()
