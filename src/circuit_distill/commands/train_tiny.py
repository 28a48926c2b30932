"""``circuit-distill train-tiny OUT``: train a tiny model on a task (entity tracking or theory of mind) to a
competence level."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("train-tiny", help="train a tiny Llama-style model on a task (teacher or warm student) "
                       "until held-out accuracy reaches a target")
    p.add_argument("out", help="output directory (safetensors weights, tokenizer, training.json)")
    p.add_argument("--task", default="entity_tracking", choices=("entity_tracking", "theory_of_mind"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-mlp", type=int, default=None, help="MLP width (default 4 * d_model)")
    p.add_argument("--boxes", default="2-7", help="training box range, e.g. 2-7 (inclusive)")
    p.add_argument("--queries", type=int, default=4, help="queries per training sequence")
    p.add_argument("--easy-fraction", type=float, default=0.5,
                   help="fraction of queries in the easy 'Box T object' form")
    p.add_argument("--same-boxes-per-batch", action="store_true",
                   help="draw one box count per batch (no padding waste) instead of one per sequence")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--anneal-from", type=int, default=None,
                   help="from this step, lr falls linearly to 0 at --max-steps (may be added when resuming, "
                   "if it is not before the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=20_000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=300, help="held-out prompts per box count at each evaluation")
    p.add_argument("--target-accuracy", type=float, default=0.99,
                   help="stop at the first evaluation where every --target-boxes accuracy reaches this")
    p.add_argument("--target-boxes", default="7", help="comma-separated box counts, e.g. 7,9")
    p.add_argument("--report-boxes", default="2-9", help="box counts measured at the end, e.g. 2-9")
    p.add_argument("--report-n", type=int, default=500)
    p.add_argument("--target-cases", default="true_belief,false_belief,unknown",
                   help="theory_of_mind: comma-separated cases of the stopping rule (test split)")
    p.add_argument("--fillers", type=int, default=256, help="theory_of_mind: training-only entity words")
    p.add_argument("--story-loss", action="store_true", help="theory_of_mind: also train next-word prediction on "
                   "the predictable words (template words, entities seen before), not only the answers")
    p.add_argument("--bind-fraction", type=float, default=0.0, help="theory_of_mind: fraction of the extra questions "
                   "asking what a character first filled a container with (the container -> drink binding alone)")
    p.add_argument("--order-fraction", type=float, default=0.0, help="theory_of_mind: fraction of the extra questions "
                   "asking whether a character grabbed its container first (yes/no: which filling sentence is its own)")
    p.add_argument("--own-fraction", type=float, default=0.0, help="theory_of_mind: fraction of the extra questions "
                   "asking whether a character filled a container first (yes/no: false belief vs unknown itself)")
    p.add_argument("--case-weights", default="1,1,1", help="theory_of_mind: how often each case (true belief, false "
                   "belief, unknown) is drawn for training, e.g. 0.1,1,1")
    p.add_argument("--recap-fraction", type=float, default=0.0, help="theory_of_mind: fraction of sequences ending "
                   "with the two filling sentences again (their containers and drinks as targets: the bindings alone)")
    p.add_argument("--entity-shift", type=float, default=0.0, help="theory_of_mind: norm of one fixed random vector "
                   "added to every entity embedding (a word-independent query at entity words)")
    p.add_argument("--qk-match-init", type=float, default=0.0, help="start each query head as this multiple of its "
                   "key head (mimetic initialisation: heads start out matching a word with its earlier mentions)")
    p.add_argument("--lookback-offsets", default="", help="theory_of_mind: comma-separated, one per head: first-layer "
                   "head h starts looking this many words back (the lookback circuit; e.g. 1,2,4,5)")
    p.add_argument("--bind-heads", default="", help="with --lookback-offsets: two first-layer heads (query's, key's) "
                   "whose copies the second layer starts out matching (e.g. 2,3)")
    p.add_argument("--order-heads", default="", help="with --bind-heads: two first-layer heads (the question's "
                   "character's copy, the previous word's) the second layer starts out reading sentence order from "
                   "(see training.tiny_init); e.g. 2,3 with --lookback-offsets 4,5,7,1 --bind-heads 0,1")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoint.pt goes (default: OUT)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint (an error if there is none)")
    p.add_argument("--overwrite", action="store_true", help="start again in an OUT (or --checkpoint-dir) that "
                   "holds a run: its checkpoint is deleted, its model rewritten")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _floats(spec: str, flag: str) -> list[float]:
    from ..errors import ConfigError

    try:
        return [float(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, e.g. 0.1,1,1; got {spec!r}") from None


def _ints(spec: str) -> list[int]:
    from ..errors import ConfigError

    out: list[int] = []
    try:
        for part in spec.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out += list(range(int(lo), int(hi) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise ConfigError(f"expected box counts like '7', '7,9' or '2-9', got {spec!r}") from None
    return out


def run(args) -> int:
    from ..training.tiny import TinyTrainConfig, train_tiny

    lo, hi = (_ints(args.boxes) or [0])[0], (_ints(args.boxes) or [0])[-1]
    cfg = TinyTrainConfig(
        task=args.task, target_cases=[c for c in args.target_cases.split(",") if c], fillers=args.fillers, story_loss=args.story_loss,
        bind_fraction=args.bind_fraction, order_fraction=args.order_fraction,
        own_fraction=args.own_fraction, case_weights=_floats(args.case_weights, "--case-weights"), recap_fraction=args.recap_fraction,
        entity_shift=args.entity_shift, qk_match_init=args.qk_match_init,
        lookback_offsets=_ints(args.lookback_offsets), bind_heads=_ints(args.bind_heads), order_heads=_ints(args.order_heads),
        n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads,
        d_mlp=args.d_mlp,
        min_boxes=lo, max_boxes=hi, n_queries=args.queries, easy_fraction=args.easy_fraction,
        same_boxes_per_batch=args.same_boxes_per_batch, lr=args.lr,
        warmup=args.warmup, anneal_from=args.anneal_from, batch_size=args.batch_size, max_steps=args.max_steps, eval_every=args.eval_every,
        eval_n=args.eval_n, target_accuracy=args.target_accuracy, target_boxes=_ints(args.target_boxes),
        report_boxes=_ints(args.report_boxes), report_n=args.report_n, checkpoint_every=args.checkpoint_every,
        seed=args.seed, threads=args.threads,
    )
    import shlex
    import sys

    argv = sys.argv[1:]
    command = ("circuit-distill " + " ".join(shlex.quote(a) for a in argv)) if argv[:1] == ["train-tiny"] else None
    record = train_tiny(cfg, args.out, resume=args.resume, overwrite=args.overwrite, checkpoint_dir=args.checkpoint_dir,
                        progress=not args.no_progress, log=lambda m: print(m, flush=True), command=command)
    print(json.dumps({"steps": record["steps"], "seconds": record["seconds"],
                      "reached_target": record["reached_target"], "final_accuracy": record["final_accuracy"]}))
    return 0
