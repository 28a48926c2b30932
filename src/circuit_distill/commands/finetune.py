"""``circuit-distill finetune OUT [--config FILE.yaml] [key=value ...] [--resume | --overwrite]``: fine-tune a
real teacher on entity tracking (LoRA, CE on gold answers) until held-out competence, keeping only the delta."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    from ..config import config_help
    from ..training.finetune import FinetuneConfig

    p = sub.add_parser("finetune", help="fine-tune a real teacher on entity tracking (LoRA) until held-out "
                                        "accuracy among the prompt's objects reaches a target; writes the delta",
                       epilog="config keys (YAML or key=value):\n" + config_help(FinetuneConfig),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory (delta.safetensors, finetune.json, README.md, run/)")
    p.add_argument("--config", default=None, help="YAML config (keys of circuit_distill.training.finetune.FinetuneConfig)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=200 target=0.9")
    p.add_argument("--resume", action="store_true", help="continue from OUT/run/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start again in an OUT that holds a run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..training.finetune import FinetuneConfig, finetune

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    rec = finetune(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                   log=lambda m: print(m, flush=True), config_path=args.config)
    print(json.dumps({k: rec[k] for k in ("steps", "reached_target", "heldout", "train_seconds", "delta_bytes")}))
    return 0
