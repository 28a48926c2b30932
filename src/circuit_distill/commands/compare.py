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
                    "comparison.json and a self-contained report.html. Models with different tokenizers are "
                    "compared at the task's named positions (docs/real-models/README.md).",
    )
    p.add_argument("--teacher", default=None, help="teacher: local directory, builtin:NAME or hub id")
    p.add_argument("--student", default=None, help="student: local directory, builtin:NAME or hub id")
    p.add_argument("--task", default=None, help="task name (numerals, ioi, entity_tracking, ...)")
    p.add_argument("--n", type=int, default=100, help="number of task examples (default 100)")
    p.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="task option (repeatable), e.g. --option style=words")
    p.add_argument("--ablation", default="mean", choices=["mean", "zero", "resample"])
    p.add_argument("--similarity", default=None, choices=["attention", "attention_centred", "cka"],
                   help="default: attention, or attention_centred when the tokenizers differ (defined only "
                        "there; docs/real-models/README.md)")
    p.add_argument("--direction", default="student_to_teacher", choices=["student_to_teacher", "teacher_to_student"])
    p.add_argument("--kinds", default="head,mlp", help="component kinds to compare (default head,mlp)")
    p.add_argument("--metric", default="logit_diff", choices=["logit_diff", "answer_prob", "accuracy"])
    p.add_argument("--position", default="last", help="named position to score (e.g. mask for masked-LM tasks)")
    p.add_argument("--positions", default=None,
                   help="named positions to compare at when the tokenizers differ (comma list; default: every "
                        "position the task names, e.g. object,earlier_label,query_label,last)")
    p.add_argument("--controls", default="none",
                   help="control pairs to score too: none, or a comma list of shuffle_heads, reinit")
    p.add_argument("--control-sides", default="teacher,student",
                   help="whose control copies to make (each costs one more sweep): teacher, student or both")
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


def _task_data(args, teacher, student):
    """``(teacher data, student data or None)``: one shared tokenization, or the same prompts per tokenizer."""
    from ..analysis import check_same_tokens, named_task_pair
    from ..errors import ConfigError
    from ..tasks import make_task
    from .task import parse_option

    options = dict(parse_option(o) for o in args.option)
    data = make_task(args.task, teacher.tokenizer, args.n, seed=args.seed, **options)
    try:
        check_same_tokens(teacher, student, data)
        return data, None
    except ConfigError:
        t_data, s_data = named_task_pair(args.task, teacher.tokenizer, student.tokenizer, args.n, seed=args.seed,
                                         **options)
        print("the tokenizers differ: comparing at the task's named positions, one row per prompt")
        return t_data, s_data


def sweep_cache_key(model_name: str, data, kinds, args) -> str:
    """What a cached sweep depends on, hashed: the model's name (a control copy's is
    ``<name>+<kind>``), the ablation, position and component kinds, and every token of the task data
    (clean, corrupted and reference prompts, answers)."""
    import hashlib

    h = hashlib.sha256()
    for part in (model_name, args.ablation, args.position, ",".join(kinds)):
        h.update(f"{part}\0".encode())
    for t in (data.clean.input_ids, data.clean.attention_mask, data.corrupted.input_ids,
              data.reference.input_ids, data.answer_ids, data.wrong_ids):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _legacy_match(d: dict, data, args) -> bool:
    """A sweep cached before the keys (no ``cache_key``) is reused when its prompt count, ablation and
    position agree, as then (it is stamped with the key, and a note says how to sweep again)."""
    return ("cache_key" not in d and d.get("n_examples") == len(data) and d.get("method") == args.ablation
            and d.get("position") == args.position)


def _stamp(path, d: dict, key: str):
    from ..discovery import SweepResult
    from ..files import atomic_write_json

    if d.get("cache_key") != key:
        print(f"{path}: a sweep cached before keys, reused by its prompt count; delete it to sweep again")
        atomic_write_json(path, {**d, "cache_key": key})
    return SweepResult.from_dict(d)


def _sweep(path, model, data, kinds, args):
    """The all-component sweep ``compare`` runs, cached as JSON at ``path`` with its ``sweep_cache_key``
    (a rerun with the same models, prompts and options resumes from it; anything else sweeps again)."""
    import json

    from ..discovery import sweep_components
    from ..files import atomic_write_json

    key = sweep_cache_key(model.name, data, kinds, args)
    if path.is_file():
        d = json.loads(path.read_text())
        if d.get("cache_key") == key or _legacy_match(d, data, args):
            return _stamp(path, d, key)
        print(f"{path.name}: cached sweep is of other models, prompts or options; sweeping again")
    comps = [c for kd in kinds for c in model.components(kd)]
    sw = sweep_components(model, data, comps, method=args.ablation, position=args.position,
                          batch_size=args.batch_size)
    atomic_write_json(path, {**sw.to_dict(), "cache_key": key})
    return sw


def run(args) -> int:
    apply_config(args)
    from pathlib import Path

    from ..analysis.compare import compare
    from ..analysis.controls import CONTROLS, control_comparisons
    from ..analysis.report import write_report
    from ..errors import ConfigError
    from ..model import load_model

    controls = [c.strip() for c in args.controls.split(",") if c.strip() and c.strip() != "none"]
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise ConfigError(f"unknown control {bad[0]!r}; use none or a comma list of {', '.join(CONTROLS)}")
    eager = {"attn_implementation": "eager"} if (args.similarity or "attention").startswith("attention") else {}
    teacher = load_model(args.teacher, device=args.device, **eager)
    student = load_model(args.student, device=args.device, **eager)
    data, s_data = _task_data(args, teacher, student)
    if args.similarity is None:
        args.similarity = "attention" if s_data is None else "attention_centred"
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    positions = [p.strip() for p in args.positions.split(",") if p.strip()] if args.positions else None
    cache = Path(args.out) / "sweeps"
    kw = dict(ablation=args.ablation, similarity=args.similarity, direction=args.direction, kinds=kinds,
              metric=args.metric, position=args.position, batch_size=args.batch_size, positions=positions)
    t_sw = _sweep(cache / "teacher.json", teacher, data, kinds, args)
    s_sw = _sweep(cache / "student.json", student, data if s_data is None else s_data, kinds, args)
    cmp = compare(teacher, student, data, student_data=s_data, teacher_sweep=t_sw, student_sweep=s_sw, **kw)
    if controls:
        cmp.controls = _controls(args, teacher, student, data, s_data, cmp, controls, cache, kw, control_comparisons)
    path = write_report(cmp, args.out)
    _print(cmp, path)
    return 0


def _controls(args, teacher, student, data, s_data, cmp, controls, cache, kw, control_comparisons) -> dict:
    """The control pairs, their sweeps cached next to the true pair's."""
    import json

    from ..files import atomic_write_json

    s_data = data if s_data is None else s_data
    keys = {f"{side}+{kind}": sweep_cache_key(f"{m.name}+{kind}", d, kw["kinds"], args)
            for side, m, d in (("teacher", teacher, data), ("student", student, s_data)) for kind in controls}
    sweeps = {}
    for p in cache.glob("*+*.json"):
        d = json.loads(p.read_text())
        if p.stem in keys and (d.get("cache_key") == keys[p.stem] or _legacy_match(d, data, args)):
            sweeps[p.stem] = _stamp(p, d, keys[p.stem])
    cached = set(sweeps)
    sides = [x.strip() for x in args.control_sides.split(",") if x.strip()]
    out = control_comparisons(teacher, student, data, s_data, cmp, controls=controls,
                              sides=sides, sweeps=sweeps, **kw)
    for name, sw in sweeps.items():
        if name not in cached:
            atomic_write_json(cache / f"{name}.json", {**sw.to_dict(), "cache_key": keys[name]})
    return out


def _print(cmp, path) -> None:
    t, s = cmp.teacher_robustness, cmp.student_robustness
    where = f" at named positions {', '.join(cmp.positions)}" if cmp.positions else ""
    print(f"alignment score A = {cmp.alignment:.4f} over {len(cmp.pairs)} pairs{where} "
          f"({', '.join(f'{k} {v:.4f}' for k, v in cmp.alignment_by_kind.items())}); mean similarity "
          f"{cmp.mean_similarity:.4f}")
    print(f"mean drop teacher {t.mean_drop:.2f} [{t.ci_low:.2f}, {t.ci_high:.2f}] -> student {s.mean_drop:.2f} "
          f"[{s.ci_low:.2f}, {s.ci_high:.2f}]; severity {t.severity:.4f} -> {s.severity:.4f}; "
          f"compression {cmp.compression:.3f}")
    for name, c in cmp.controls.items():
        verdict = "lower" if c["alignment"] < cmp.alignment else "NOT lower"
        print(f"control {name}: A = {c['alignment']:.4f} ({verdict} than the true pair), mean similarity "
              f"{c['mean_similarity']:.4f}")
    for w in cmp.warnings:
        print(f"warning: {w}")
    print(f"wrote {path} and {path.parent / 'comparison.json'}")
