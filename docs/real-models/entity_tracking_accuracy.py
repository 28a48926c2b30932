"""Entity-tracking accuracy of the packaged real models at 2-7 boxes (the table in README.md here).

    .venv/bin/python docs/real-models/entity_tracking_accuracy.py [--n 200] [--seed 0] [--json out.json]

Needs `make setup-real`. Answers are drawn from the objects each tokenizer keeps whole, so no
``first_token``; the metric is the argmax over the whole vocabulary at the last token.
"""

from __future__ import annotations

import argparse
import json
import time

from circuit_distill import evaluate, load_model, make_task

MODELS = ("smollm2-135m", "gemma3-270m")
BOXES = range(2, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200, help="prompts per box count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()
    table = {}
    for name in MODELS:
        t0 = time.perf_counter()
        model = load_model(name)
        load = time.perf_counter() - t0
        rows = {}
        for k in BOXES:
            td = make_task("entity_tracking", model.tokenizer, args.n, seed=args.seed, n_boxes=k)
            rows[k] = {**evaluate(model, td, batch_size=50), "objects": td.options["word_pools"]["objects"]}
        table[name] = {"load_seconds": round(load, 1), "boxes": rows,
                       "eval_seconds": round(time.perf_counter() - t0 - load, 1)}
        del model
    print(f"entity tracking, {args.n} prompts per box count, seed {args.seed}: accuracy (logit diff, answer prob)")
    print("| model | " + " | ".join(f"{k} boxes" for k in BOXES) + " |")
    print("|---|" + "---|" * len(BOXES))
    for name, t in table.items():
        cells = [f"{r['accuracy']:.3f} ({r['logit_diff']:.2f}, {r['answer_prob']:.3f})" for r in t["boxes"].values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, t in table.items():
        print(f"{name}: loaded in {t['load_seconds']} s, evaluated in {t['eval_seconds']} s, "
              f"{next(iter(t['boxes'].values()))['objects']} objects kept whole")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "seed": args.seed, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
