"""``circuit-distill model-card DIR``: add the circuit section to a tiny entity-tracking model's card."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("model-card", help="discover a tiny entity-tracking model's circuit and write it into its "
                       "model card (README.md) and circuit.json")
    p.add_argument("model", help="model directory (as written by train-tiny) or builtin:NAME")
    p.add_argument("--boxes", type=int, default=7, help="box count of the held-out prompts")
    p.add_argument("--n", type=int, default=200, help="held-out prompts")
    p.add_argument("--seed", type=int, default=30_000)
    p.add_argument("--threshold", type=float, default=0.2, help="pruning threshold (fraction of the full metric)")
    p.add_argument("--out", default=None, help="directory to write to (default: the model directory)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from ..model import load_model
    from ..model.loading import resolve_name
    from ..training.card import card_markdown, circuit_card, write_card

    out = args.out
    if out is None:
        path, local = resolve_name(args.model)
        if not local:
            raise ConfigError(f"{args.model!r} is not a local model directory; pass --out DIR")
        out = path
    model = load_model(args.model)
    card = circuit_card(model, boxes=args.boxes, n=args.n, seed=args.seed, threshold=args.threshold,
                        progress=not args.no_progress)
    write_card(out, card)
    print(card_markdown(card))
    print(f"wrote {Path(out) / 'circuit.json'} and the circuit section of {Path(out) / 'README.md'}")
    return 0
