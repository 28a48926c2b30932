"""Choose the entity-tracking setting of the real-model circuits (the protocol in README.md here).

    OMP_NUM_THREADS=1 .venv/bin/python docs/real-models/setting.py --model smollm2-135m   # then gemma3-270m
    .venv/bin/python docs/real-models/setting.py                                        # the decision only

Needs `make setup-real`. Every variant (box count x number of solved examples before the prompt)
is measured on the same prompts for both models (seed 0, the objects both tokenizers keep whole) and
saved to `setting/<model>.json` as it finishes, so a rerun resumes. Without `--model` the script
applies the decision rule to what is saved and writes `setting/decision.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from circuits import MODELS, clean_stage, shared_objects

from circuit_distill import load_model
from circuit_distill.tasks import make_task

HERE = Path(__file__).parent / "setting"
BOXES = (2, 3, 4)
SHOTS = (0, 1, 3)
MIN_MARGIN = 0.5  # (accuracy - chance) / (1 - chance): at least halfway from chance to perfect
MAX_P = 0.01  # and a one-sided binomial test against chance


def key(boxes: int, shots: int) -> str:
    return f"{boxes} boxes, {shots} shots"


def binomial_p(hits: int, n: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(hits, n + 1))


def measure(name: str, n: int, seed: int) -> None:
    HERE.mkdir(exist_ok=True)
    path = HERE / f"{name}.json"
    done = json.loads(path.read_text()) if path.is_file() else {"n": n, "seed": seed, "variants": {}}
    t0 = time.perf_counter()
    model = load_model(name)
    done["load_seconds"] = round(time.perf_counter() - t0, 1)
    objects = shared_objects()
    for boxes in BOXES:
        for shots in SHOTS:
            if key(boxes, shots) in done["variants"]:
                continue
            t0 = time.perf_counter()
            td = make_task("entity_tracking", model.tokenizer, n, seed=seed, n_boxes=boxes, n_shots=shots,
                           objects=objects)
            res = clean_stage(model, td)
            hits = round(res["in_context_accuracy"] * n)
            res.update(margin=(res["in_context_accuracy"] - res["chance"]) / (1 - res["chance"]),
                       p_value=binomial_p(hits, n, res["chance"]), tokens=int(td.clean.attention_mask[0].sum()),
                       seconds=round(time.perf_counter() - t0, 1))
            done["variants"][key(boxes, shots)] = res
            path.write_text(json.dumps(done, indent=1))
            print(f"{name} {key(boxes, shots)}: in-context {res['in_context_accuracy']:.3f} (chance "
                  f"{res['chance']:.3f}, margin {res['margin']:.2f}, p {res['p_value']:.1e}), vocabulary "
                  f"{res['accuracy']:.3f}, LD {res['logit_diff']:.2f}, {res['seconds']} s", flush=True)


def qualifies(res: dict) -> bool:
    return res["margin"] >= MIN_MARGIN and res["p_value"] < MAX_P


def decide() -> dict:
    """The rule: among variants where both models are well above chance, the most boxes, then the fewest
    shots, then the largest smaller margin; else the variant with the largest smaller margin."""
    runs = {m: json.loads((HERE / f"{m}.json").read_text())["variants"] for m in MODELS}
    variants = [(b, s) for b in BOXES for s in SHOTS if all(key(b, s) in r for r in runs.values())]
    if not variants:
        raise SystemExit("no variant measured for both models yet; run with --model first")

    def low(v):
        return min(r[key(*v)]["margin"] for r in runs.values())

    both = [v for v in variants if all(qualifies(r[key(*v)]) for r in runs.values())]
    if both:
        boxes, shots = max(both, key=lambda v: (v[0], -v[1], low(v)))
    else:
        boxes, shots = max(variants, key=low)
    out = {"boxes": boxes, "shots": shots, "both_well_above_chance": bool(both),
           "well_above_chance": {m: [key(*v) for v in variants if qualifies(r[key(*v)])] for m, r in runs.items()},
           "rule": decide.__doc__, "min_margin": MIN_MARGIN, "max_p": MAX_P}
    (HERE / "decision.json").write_text(json.dumps(out, indent=1))
    print("| model | " + " | ".join(key(*v) for v in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for m, r in runs.items():
        cells = [f"{r[key(*v)]['in_context_accuracy']:.2f} / {r[key(*v)]['accuracy']:.2f}"
                 + (" **" if qualifies(r[key(*v)]) else "") for v in variants]
        print(f"| {m} | " + " | ".join(cells) + " |")
    print(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help=f"measure these: {', '.join(MODELS)}")
    ap.add_argument("--n", type=int, default=48, help="prompts per variant (default 48)")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed (default 0; the circuits use 7)")
    args = ap.parse_args()
    for name in args.model or []:
        measure(name, args.n, args.seed)
    if not args.model:
        decide()


if __name__ == "__main__":
    main()
