"""``circuit-distill discover --model M --task T --out circuit.json``: find a task circuit."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("discover", help="find the circuit of a task in a model and write it as JSON")
    p.add_argument("--model", required=True, help="local directory, builtin:NAME or hub id")
    p.add_argument("--task", required=True, help="task name (see circuit_distill.tasks.task_names())")
    p.add_argument("--n", type=int, default=64, help="number of task examples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    p.add_argument("--method", choices=("ablation", "path", "attribution"), default="ablation",
                   help="how candidates are scored (default ablation: single mean ablation)")
    p.add_argument("--kind", choices=("head", "mlp", "all"), default="head", help="candidate components")
    p.add_argument("--metric", choices=("logit_diff", "answer_prob", "accuracy"), default="logit_diff")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="pruning threshold: fraction of the full metric a removal may cost (default 0.2)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k highest-scoring components instead of pruning")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True, help="where to write circuit.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..discovery import find_circuit
    from ..model import load_model
    from ..tasks import make_task

    model = load_model(args.model)
    task_data = make_task(args.task, model.tokenizer, args.n, seed=args.seed)
    circuit = find_circuit(model, task_data, method=args.method, kind=args.kind, threshold=args.threshold,
                           top_k=args.top_k, metric=args.metric, batch_size=args.batch_size,
                           progress=False if args.quiet else None)
    circuit.extra.update({"n": args.n, "seed": args.seed})
    path = circuit.save(args.out)
    if not args.quiet:
        print(f"{len(circuit)} components: {', '.join(map(str, circuit.components))}")
        print(f"full {circuit.metric} {circuit.full_metric:.4g}, circuit only {circuit.circuit_metric:.4g}, "
              f"faithfulness {circuit.faithfulness:.3f}")
        print(f"wrote {path}")
    return 0
