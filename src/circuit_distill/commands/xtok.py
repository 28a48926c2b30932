"""``circuit-distill xtok --config FILE.yaml --out DIR [key=value ...]``: the cross-tokenizer distillation
protocol (``circuit_distill.study.xtok``); rerun the same command to continue an interrupted one."""

from __future__ import annotations


def register(sub) -> None:
    import argparse

    from ..config import config_help
    from ..study.xtok import XtokConfig

    p = sub.add_parser("xtok", help="circuit distillation between models whose tokenizers differ: discovery on each "
                                    "model's own tokens, teacher caches at named positions, rows x seeds of distill "
                                    "runs, results.json and results.md; resumable",
                       epilog="config keys (YAML or key=value):\n" + config_help(XtokConfig),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (keys of circuit_distill.study.xtok.XtokConfig)")
    p.add_argument("--out", required=True, help="output directory (a rerun continues the runs there)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=20 seeds=[0]")
    p.add_argument("--max-runs", type=int, default=None, help="stop after training this many runs (rerun to go on)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..study.xtok import XtokConfig, run_xtok

    cfg = load_config(XtokConfig, args.config, args.overrides)
    res = run_xtok(cfg, args.out, log=lambda m: print(m, flush=True), max_runs=args.max_runs)
    total = len(cfg.rows) * len(cfg.seeds)
    print(f"{len(res['runs'])} of {total} runs finished; table in {args.out}/results.md")
    return 0
