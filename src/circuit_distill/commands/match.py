"""``circuit-distill match``: pair student circuit heads with teacher circuit heads -> map.json."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "match",
        help="match student circuit heads to teacher circuit heads (ablation, hungarian, cka, random)",
        description="Pair every student circuit component with a teacher circuit component and write a "
                    "component map (JSON). Effects files: {\"L0.H1\": dP, ...} or the discovery stage's sweep "
                    "JSON; circuit files: {\"components\": [\"L1.H2\", ...]} or a list of names.",
    )
    p.add_argument("--teacher-effects", help="teacher ablation effects JSON (needed by ablation/hungarian)")
    p.add_argument("--student-effects", help="student ablation effects JSON (needed by ablation/hungarian)")
    p.add_argument("--teacher-circuit", help="teacher circuit JSON (default: every component in the effects file)")
    p.add_argument("--student-circuit", help="student circuit JSON (default: every component in the effects file)")
    p.add_argument("--method", default="ablation", choices=["ablation", "hungarian", "cka", "random"])
    p.add_argument("--metric", default=None,
                   help="which effect to use when the effects files hold several metrics (e.g. p_correct)")
    p.add_argument("--teacher-acts", help="cka: teacher activations {name: [rows, d]} (.safetensors or torch.save)")
    p.add_argument("--student-acts", help="cka: student activations {name: [rows, d]} on the same inputs")
    p.add_argument("--debiased", action="store_true", help="cka: debiased (unbiased-HSIC) CKA")
    p.add_argument("--normalize", action="store_true",
                   help="ablation/hungarian/random: compare effects as fractions of each model's largest |dP| in its "
                        "circuit (helps when a weak student's effects are all small)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control")
    p.add_argument("--out", required=True, help="where to write the component map JSON")
    p.add_argument("--json", action="store_true", help="print the map as JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    from ..errors import ConfigError
    from ..matching import load_acts, load_circuit, load_effects, match

    te = load_effects(args.teacher_effects, args.metric) if args.teacher_effects else None
    se = load_effects(args.student_effects, args.metric) if args.student_effects else None
    tc = load_circuit(args.teacher_circuit) if args.teacher_circuit else (sorted(te) if te else None)
    sc = load_circuit(args.student_circuit) if args.student_circuit else (sorted(se) if se else None)
    if tc is None or sc is None:
        raise ConfigError("pass --teacher-circuit and --student-circuit (or effects files to take them from)")
    ta = load_acts(args.teacher_acts) if args.teacher_acts else None
    sa = load_acts(args.student_acts) if args.student_acts else None
    cmap = match(te, se, tc, sc, args.method, args.seed, teacher_acts=ta, student_acts=sa, debiased=args.debiased,
                 normalize=args.normalize)
    cmap.to_json(args.out)
    q = cmap.quality()
    if args.json:
        print(json.dumps(cmap.to_dict(), indent=2))
    else:
        print(f"{'student':<10} {'teacher':<10} distance")
        for (s, t), d in zip(cmap.pairs, cmap.distances):
            print(f"{str(s):<10} {str(t):<10} {d:.4g}")
        print(f"{q['n_pairs']} pairs, {q['n_teacher_distinct']} distinct teacher heads of {len(tc)} "
              f"(max reuse {q['max_teacher_reuse']}), method {cmap.method}; wrote {args.out}")
    if q["degenerate"]:
        print(f"warning: every student head maps to the same teacher head {q['most_used_teacher']}; the student "
              "may be too weak for ablation matching (try --normalize, or --method hungarian or cka)", file=sys.stderr)
    return 0
