"""``circuit-distill study CONFIG.yaml --out DIR``: run a controlled study (a grid of distillation runs)."""

from __future__ import annotations


def register(sub) -> None:
    import argparse

    p = sub.add_parser("study", help="run a grid of distillation runs (warmth x trainable scope x pairing and "
                                     "controls x positions x objective, several seeds) and write results.json "
                                     "and report.html; rerun the same command to continue an interrupted study")
    p.add_argument("config", help="study YAML (see configs/study.yaml; keys: circuit_distill.study.StudyConfig)")
    p.add_argument("--out", required=True, help="output directory (runs/, results.json, report.html)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study setting, e.g. --set steps=100 (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (each takes runs from one list)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds runs of other settings (default: continue the runs there)")
    p.add_argument("--report-only", action="store_true", help="only summarise the finished runs of --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..config import load_config
    from ..errors import ConfigError
    from ..study import StudyConfig, run_study, work, write_results

    cfg = load_config(StudyConfig, args.config, args.overrides)
    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    if args.worker:  # one of run_study's worker processes: runs only, no checks, no report
        import os

        cfg.threads = args.threads or cfg.threads
        parent = os.getppid()  # a worker whose study process died stops after its current run
        work(cfg, Path(args.out), log=lambda m: print(m, flush=True), stop=lambda: os.getppid() != parent)
        return 0
    if args.report_only:
        write_results(cfg, Path(args.out))
        return 0
    run_study(cfg, args.out, jobs=args.jobs, overwrite=args.overwrite, progress=not args.quiet)
    return 0
