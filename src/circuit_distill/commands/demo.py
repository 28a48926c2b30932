"""``circuit-distill demo``: the main job on the embedded default teacher and student."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="distil the built-in entity-tracking teacher into the built-in student with "
                                    "every method of the paper's table, over several seeds, and write a report")
    p.add_argument("--task", default="entity_tracking", choices=("entity_tracking", "theory_of_mind"),
                   help="the task and its built-in pair (theory_of_mind: builtin:tom-teacher -> builtin:tom-student, "
                   "accuracy per case, the paper's rows and ce@all only: --set \"extra_matchers=[hungarian, cka]\" adds "
                   "our matchers' rows, --set grid=true with grid_students a map)")
    p.add_argument("--out", default="runs/demo", help="output directory (results.json, report.html, runs.json)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1); default 3")
    p.add_argument("--jobs", type=int, default=None, help="worker processes for the runs (default 2; 1: in this process)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps per run (default: DemoConfig.steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DemoConfig field, e.g. --set lr=0.001 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds runs of other settings (default: continue the runs there)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..demo import DemoConfig, run_demo
    from ..errors import ConfigError
    from ..study.protocol import PAIRS

    if args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    flags = {"seeds": list(range(args.seeds)), **({"steps": args.steps} if args.steps is not None else {}),
             **({"jobs": args.jobs} if args.jobs is not None else {})}
    if args.task != "entity_tracking":  # its built-in pair; the map's students are entity tracking's
        # (and the paper's rows only: with our matchers' rows the ToM table takes over 10 minutes on 2 cores)
        flags.update(task=args.task, teacher=PAIRS[args.task][0], student=PAIRS[args.task][1], grid=False,
                     extra_matchers=[])
    cfg = load_config(DemoConfig, overrides=args.overrides, base=flags)
    run_demo(cfg, args.out, progress=not args.quiet, overwrite=args.overwrite)
    return 0
