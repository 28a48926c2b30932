"""Why the real models are at chance: which of the prompt's objects they pick, by its place in the context.

    OMP_NUM_THREADS=1 .venv/bin/python docs/real-models/diagnose.py --model smollm2-135m [--boxes 2 3]

For each prompt (the protocol's prompts: seed 0, 48, no shots) the model's choice among the prompt's own
objects (argmax of their logits at the last token) is recorded by the mention index of the chosen object
(1 = first sentence) and of the queried one. A model that tracks entities chooses the queried index; a
model with a position bias chooses the same index whatever is asked. Writes `setting/diagnose-<model>.json`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from circuits import shared_objects

from circuit_distill import load_model
from circuit_distill.tasks import make_task
from circuit_distill.tasks.build import answer_token
from circuit_distill.tasks.metrics import batched_final_logits

HERE = Path(__file__).parent / "setting"


def choices(model, td) -> list[tuple[int, int]]:
    """``(queried mention index, chosen mention index)`` per prompt, both 1-based."""
    logits = batched_final_logits(model, td.clean, td.position("last"))
    out = []
    for i, meta in enumerate(td.metadata):
        objs = [o for o, _ in meta["placements"]]
        ids = [answer_token(model.tokenizer, " " + o, context=td.prompts[i]) for o in objs]
        out.append((objs.index(meta["answer"]) + 1, int(logits[i, ids].argmax()) + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--boxes", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = load_model(args.model)
    objects = shared_objects()
    res = {}
    for k in args.boxes:
        td = make_task("entity_tracking", model.tokenizer, args.n, seed=args.seed, n_boxes=k, objects=objects)
        pairs = choices(model, td)
        chosen = Counter(c for _, c in pairs)
        by_query = {q: sum(c == q for qq, c in pairs if qq == q) / max(1, sum(qq == q for qq, _ in pairs))
                    for q in range(1, k + 1)}
        res[k] = {"chosen_index": {i: chosen.get(i, 0) / len(pairs) for i in range(1, k + 1)},
                  "accuracy_by_queried_index": by_query, "pairs": pairs}
        print(f"{args.model}, {k} boxes: share of prompts choosing mention 1..{k}: "
              f"{[round(v, 2) for v in res[k]['chosen_index'].values()]}; accuracy when mention 1..{k} is asked: "
              f"{[round(v, 2) for v in by_query.values()]}", flush=True)
    HERE.mkdir(exist_ok=True)
    (HERE / f"diagnose-{args.model}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
