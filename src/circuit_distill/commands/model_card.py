"""``circuit-distill model-card DIR``: add the circuit section to a tiny model's card (entity tracking or theory
of mind: the task its ``training.json`` names, or ``--task``)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("model-card", help="discover a tiny model's circuit (entity tracking or theory of mind) and "
                       "write it into its model card (README.md) and circuit.json")
    p.add_argument("model", help="model directory (as written by train-tiny) or builtin:NAME")
    p.add_argument("--task", default=None, choices=("entity_tracking", "theory_of_mind"),
                   help="the model's task (default: the one its training.json names, else entity_tracking)")
    p.add_argument("--boxes", type=int, default=7, help="entity_tracking: box count of the held-out prompts")
    p.add_argument("--n", type=int, default=200, help="held-out prompts")
    p.add_argument("--seed", type=int, default=30_000)
    p.add_argument("--threshold", type=float, default=0.2, help="pruning threshold (fraction of the full metric)")
    p.add_argument("--out", default=None, help="directory to write to (default: the model directory)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from ..errors import ConfigError
    from ..model import load_model
    from ..model.loading import resolve_name
    from ..training.card import card_markdown, circuit_card, write_card
    from ..training.tom_card import tom_card_markdown, tom_circuit_card

    path, local = resolve_name(args.model)
    out = args.out
    if out is None:
        if not local:
            raise ConfigError(f"{args.model!r} is not a local model directory; pass --out DIR")
        out = path
    model = load_model(args.model)
    record = Path(path) / "training.json"
    task = args.task or (json.loads(record.read_text())["config"].get("task") if local and record.is_file() else None)
    if task == "theory_of_mind":
        card = tom_circuit_card(model, n=args.n, seed=args.seed, threshold=args.threshold,
                                progress=not args.no_progress)
        section = tom_card_markdown(card)
    else:
        card = circuit_card(model, boxes=args.boxes, n=args.n, seed=args.seed, threshold=args.threshold,
                            progress=not args.no_progress)
        section = card_markdown(card)
    write_card(out, card, section)
    print(section)
    print(f"wrote {Path(out) / 'circuit.json'} and the circuit section of {Path(out) / 'README.md'}")
    return 0
