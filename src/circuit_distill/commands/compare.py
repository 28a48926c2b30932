"""``circuit-distill compare --teacher T --student S --task X --out DIR``: influence, alignment score and
robustness of a teacher/student pair on one task -> DIR/comparison.json and DIR/report.html.

    circuit-distill compare --teacher gpt2 --student distilgpt2 --task numerals --n 100 --out runs/cmp
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare teacher and student circuits: influence, alignment score, robustness, HTML report",
        description="Ablate every head and MLP of both models one at a time, match student components to "
                    "teacher components by similarity, score their alignment and robustness, and write "
                    "comparison.json and a self-contained report.html. Both models must share a tokenizer.",
    )
    p.add_argument("--teacher", default=None, help="teacher: local directory, builtin:NAME or hub id")
    p.add_argument("--student", default=None, help="student: local directory, builtin:NAME or hub id")
    p.add_argument("--task", default=None, help="task name (numerals, ioi, entity_tracking, ...)")
    p.add_argument("--n", type=int, default=100, help="number of task examples (default 100)")
    p.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="task option (repeatable), e.g. --option style=words")
    p.add_argument("--ablation", default="mean", choices=["mean", "zero", "resample"])
    p.add_argument("--similarity", default="attention", choices=["attention", "cka"])
    p.add_argument("--direction", default="student_to_teacher", choices=["student_to_teacher", "teacher_to_student"])
    p.add_argument("--kinds", default="head,mlp", help="component kinds to compare (default head,mlp)")
    p.add_argument("--metric", default="logit_diff", choices=["logit_diff", "answer_prob", "accuracy"])
    p.add_argument("--position", default="last", help="named position to score (e.g. mask for masked-LM tasks)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--config", default=None,
                   help="YAML file whose keys are these options (e.g. configs/gpt2_to_distilgpt2_compare.yaml); "
                        "options given on the command line win")
    p.set_defaults(func=run, _parser=p)


REQUIRED = ("teacher", "student", "task", "out")


def apply_config(args) -> None:
    """Fill options not given on the command line from ``args.config`` (YAML); unknown keys are errors."""
    from pathlib import Path

    import yaml

    from ..errors import ConfigError

    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values")
        parser = args._parser
        known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "func", "_parser")}
        for key, value in data.items():
            dest = key.replace("-", "_")
            if dest not in known:
                raise ConfigError(f"{path}: unknown key {key!r}; valid keys: {', '.join(sorted(known))}")
            if getattr(args, dest) == parser.get_default(dest):  # not given on the command line
                if dest == "kinds" and isinstance(value, (list, tuple)):
                    value = ",".join(value)
                setattr(args, dest, value)
    missing = [k for k in REQUIRED if not getattr(args, k)]
    if missing:
        raise ConfigError(f"missing {', '.join('--' + k for k in missing)} (give them on the command line "
                          "or in --config FILE.yaml)")


def run(args) -> int:
    apply_config(args)
    from ..analysis.compare import compare
    from ..analysis.report import write_report
    from ..model import load_model
    from ..tasks import make_task
    from .task import parse_option

    eager = {"attn_implementation": "eager"} if args.similarity == "attention" else {}
    teacher = load_model(args.teacher, device=args.device, **eager)
    student = load_model(args.student, device=args.device, **eager)
    options = dict(parse_option(o) for o in args.option)
    data = make_task(args.task, teacher.tokenizer, args.n, seed=args.seed, **options)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    cmp = compare(teacher, student, data, ablation=args.ablation, similarity=args.similarity,
                  direction=args.direction, kinds=kinds, metric=args.metric, position=args.position,
                  batch_size=args.batch_size)
    path = write_report(cmp, args.out)
    t, s = cmp.teacher_robustness, cmp.student_robustness
    print(f"alignment score A = {cmp.alignment:.4f} over {len(cmp.pairs)} pairs "
          f"({', '.join(f'{k} {v:.4f}' for k, v in cmp.alignment_by_kind.items())})")
    print(f"mean drop teacher {t.mean_drop:.2f} [{t.ci_low:.2f}, {t.ci_high:.2f}] -> student {s.mean_drop:.2f} "
          f"[{s.ci_low:.2f}, {s.ci_high:.2f}]; severity {t.severity:.4f} -> {s.severity:.4f}; "
          f"compression {cmp.compression:.3f}")
    for w in cmp.warnings:
        print(f"warning: {w}")
    print(f"wrote {path} and {path.parent / 'comparison.json'}")
    return 0
