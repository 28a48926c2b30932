"""Entity-tracking circuits of the packaged real models (the pages in this folder).

    .venv/bin/python docs/real-models/circuits.py --model smollm2-135m --boxes 3 --shots 1 --n 32
    .venv/bin/python docs/real-models/circuits.py --report-only          # pages from the saved stages

Needs `make setup-real`. Every stage writes `stages/<model>/<stage>.json` (committed with the pages)
and is skipped when that file exists, so an interrupted run resumes where it stopped (delete a file
to redo its stage; a run with other prompt settings than the saved `setup.json` is refused). Stages:

1. `clean`: accuracy (argmax over the vocabulary), accuracy among the prompt's own objects (chance
   1 / boxes), logit difference against another box's object;
2. `sweep`: every head mean-ablated alone (`sweep_components`, the sweep `compare --kinds head` runs on
   the same prompts, so `compare` reuses it), with its seconds and forward-equivalents;
3. `attention`: every head's attention mass by token kind from the final token, the query label and
   the earlier label (`shots` = any token of the solved examples before the prompt);
4. path patching from the last token back (`discovery.paths`, corruption = another box queried, for D
   every object replaced): A = direct effect on the logits (all heads); B = through A's queries;
   C = heads at the query label acting through B's keys/values and then A's queries; D = heads at the
   earlier label acting through A's keys/values. B, C and D test the `--candidates` heads with the
   largest single-ablation effects; a head joins a group at a score >= `--min-score` (at most
   `--group-size`, largest first, each head in its first group only);
5. `circuit`: A + B + C + D, its faithfulness (every other head mean-ablated), and that of the same
   number of heads taken by ablation effect alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from circuit_distill import load_model
from circuit_distill.discovery import faithfulness, sweep_components
from circuit_distill.discovery.paths import path_scores
from circuit_distill.model.components import Component
from circuit_distill.tasks import make_task
from circuit_distill.tasks.build import answer_token
from circuit_distill.tasks.entity_tracking import LABELS, OBJECTS
from circuit_distill.tasks.metrics import batched_final_logits, per_example, summarise
from circuit_distill.tasks.words import whole_words
from circuit_distill.training.card import attention_mass, word_ids

HERE = Path(__file__).parent
MODELS = ("smollm2-135m", "gemma3-270m")
KINDS = ("query_label", "earlier_label", "answer_object", "other_objects", "other_labels", "shots", "self", "rest")
QUERIES = ("last", "query_label", "earlier_label")


def shared_objects() -> list[str]:
    """The built-in objects both packaged tokenizers keep whole (so both models see the same prompts)."""
    from transformers import AutoTokenizer

    from circuit_distill.model.loading import checkpoint_location

    toks = [AutoTokenizer.from_pretrained(checkpoint_location(m)[0]) for m in MODELS]
    keep = [set(whole_words(t, OBJECTS, context="Box B contains the")) for t in toks]
    return [w for w in OBJECTS if all(w in k for k in keep)]


STAGES = ("setup", "clean", "sweep", "attention", "path_A", "path_B", "path_C", "path_D", "circuit")


class Stop(Exception):
    """Raised after the stage named by ``--until`` (the next run resumes after it)."""


UNTIL: list[str] = []  # the stage to stop after, if any


def stage(out: Path, name: str, fn):
    """Run ``fn()`` unless ``out/name.json`` exists; save its result (with the stage's seconds)."""
    path = out / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if UNTIL and STAGES.index(name) > STAGES.index(UNTIL[0]):
        raise Stop(name)
    t0 = time.perf_counter()
    result = fn()
    result["stage_seconds"] = round(time.perf_counter() - t0, 1)
    path.write_text(json.dumps(result, indent=1))
    print(f"{out.name}: {name} done in {result['stage_seconds']} s", flush=True)
    return result


def clean_stage(model, td) -> dict:
    logits = batched_final_logits(model, td.clean, td.position("last"))
    m = summarise(per_example(logits, td.answer_ids, td.wrong_ids))
    hits = []
    for i, meta in enumerate(td.metadata):
        ids = [answer_token(model.tokenizer, " " + o, context=td.prompts[i]) for o in meta["boxes"].values()]
        best = ids[int(logits[i, ids].argmax())]
        hits.append(best == int(td.answer_ids[i]))
    return {**m, "in_context_accuracy": sum(hits) / len(hits), "chance": 1 / td.metadata[0]["n_boxes"]}


def attention_stage(model, td, prefix_chars: list[int]) -> dict:
    """``prefix_chars[i]``: the characters of prompt ``i``'s solved examples (0 without shots)."""
    objects, labels = word_ids(model, OBJECTS), word_ids(model, LABELS)

    def label_prompt(i, ids):
        named = {k: int(td.positions[k][i]) for k in ("query_label", "earlier_label", "object", "last")}
        cat = torch.full((ids.shape[0],), KINDS.index("rest"))
        spans = model.tokenizer(td.prompts[i], return_offsets_mapping=True)["offset_mapping"]
        for t in range(ids.shape[0]):
            if t < len(spans) and spans[t][1] > 0 and spans[t][0] < prefix_chars[i]:
                cat[t] = KINDS.index("shots")
            elif int(ids[t]) in objects:
                cat[t] = KINDS.index("other_objects")
            elif int(ids[t]) in labels:
                cat[t] = KINDS.index("other_labels")
        for name, kind in (("query_label", "query_label"), ("earlier_label", "earlier_label"),
                           ("object", "answer_object")):
            cat[named[name]] = KINDS.index(kind)
        return cat, named

    return {"mass": attention_mass(model, td, label_prompt, KINDS, QUERIES)}


def pick(scores: dict, taken: set, min_score: float, size: int) -> list[str]:
    ranked = sorted(((v, k) for k, v in scores.items() if k not in taken and v >= min_score), reverse=True)
    return [k for _, k in ranked[:size]]


def path_stage(model, td, senders, hops, positions) -> dict:
    res = path_scores(model, td, senders, hops, sender_positions=positions, batch_size=64)
    return res.to_dict()


def run_model(name: str, args) -> None:
    out = HERE / "stages" / name
    out.mkdir(parents=True, exist_ok=True)
    wanted = {"n": args.n, "boxes": args.boxes, "shots": args.shots, "seed": args.seed}
    setup = stage(out, "setup", lambda: {"objects": shared_objects(), **wanted})
    if {k: setup.get(k, 0) for k in wanted} != wanted:
        raise SystemExit(f"{out} holds stages of {setup}, not {wanted}: move it away or pass those settings")
    objects = setup["objects"]
    t0 = time.perf_counter()
    model = load_model(name, attn_implementation="eager")
    print(f"{name}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    common = dict(seed=args.seed, n_boxes=args.boxes, n_shots=args.shots, objects=objects)
    td = make_task("entity_tracking", model.tokenizer, args.n, corruption="query", **common)
    bare = make_task("entity_tracking", model.tokenizer, args.n, corruption="query", **dict(common, n_shots=0))
    prefix_chars = [len(a) - len(b) for a, b in zip(td.prompts, bare.prompts)]
    td_obj = make_task("entity_tracking", model.tokenizer, args.n, corruption="objects", **common)
    heads = model.components("head")
    stage(out, "clean", lambda: clean_stage(model, td))
    sweep = stage(out, "sweep", lambda: sweep_components(model, td, heads, method="mean", position="last",
                                                       batch_size=64, progress=False).to_dict())
    stage(out, "attention", lambda: attention_stage(model, td, prefix_chars))
    effect = {k: sweep["clean"]["logit_diff"] - v["logit_diff"] for k, v in sweep["ablated"].items()}
    cands = [k for k, _ in sorted(effect.items(), key=lambda kv: -abs(kv[1]))[:args.candidates]]
    a = stage(out, "path_A", lambda: path_stage(model, td, heads, [], "all"))
    groups = {"A": pick(a["scores"], set(), args.min_score, args.group_size)}

    def comps(names):
        return [Component.parse(x) for x in names]

    def before(names, last_layer):
        return [c for c in comps(names) if c.layer < last_layer]

    taken = set(groups["A"])
    if groups["A"]:
        top_a = max(c.layer for c in comps(groups["A"]))
        b = stage(out, "path_B", lambda: path_stage(model, td, before(cands, top_a), [(comps(groups["A"]), "q")],
                                                    "all"))
        groups["B"] = pick(b["scores"], taken, args.min_score, args.group_size)
        taken |= set(groups["B"])
        if groups["B"]:
            top_b = max(c.layer for c in comps(groups["B"]))
            c = stage(out, "path_C", lambda: path_stage(model, td, before(cands, top_b), [
                (comps(groups["B"]), "kv"), (comps(groups["A"]), "q")], "query_label"))
            groups["C"] = pick(c["scores"], taken, args.min_score, args.group_size)
            taken |= set(groups["C"])
        d = stage(out, "path_D", lambda: path_stage(model, td_obj, before(cands, top_a),
                                                    [(comps(groups["A"]), "kv")], "earlier_label"))
        groups["D"] = pick(d["scores"], taken, args.min_score, args.group_size)

    def circuit():
        members = sorted({x for g in groups.values() for x in g}, key=lambda x: Component.parse(x).sort_key())
        by_effect = [k for k, _ in sorted(effect.items(), key=lambda kv: -kv[1])[:max(1, len(members))]]
        res = {"groups": groups, "circuit": members, "candidates": cands, "min_score": args.min_score}
        res["faithfulness"] = faithfulness(model, td, members, kind="head") if members else None
        res["ablation_top"] = by_effect
        res["ablation_top_faithfulness"] = faithfulness(model, td, by_effect, kind="head")
        return res

    stage(out, "circuit", circuit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help=f"model(s) to run: {', '.join(MODELS)} (default: none)")
    ap.add_argument("--n", type=int, default=12, help="prompts (default 12)")
    ap.add_argument("--boxes", type=int, default=6, help="boxes per prompt (default 6)")
    ap.add_argument("--shots", type=int, default=0, help="solved examples before each prompt (default 0)")
    ap.add_argument("--seed", type=int, default=7, help="prompt seed (default 7)")
    ap.add_argument("--candidates", type=int, default=30, help="senders tested for groups B, C, D")
    ap.add_argument("--min-score", type=float, default=0.05, help="path score for a group (fraction of the gap)")
    ap.add_argument("--group-size", type=int, default=8, help="at most this many heads per group")
    ap.add_argument("--until", choices=STAGES, help="stop after this stage (a later run resumes)")
    ap.add_argument("--report-only", action="store_true", help="only write the pages from the saved stages")
    args = ap.parse_args()
    UNTIL[:] = [args.until] if args.until else []
    if not args.report_only:
        for name in args.model or []:
            try:
                run_model(name, args)
            except Stop as e:
                print(f"{name}: stopped before {e} (--until {args.until})", flush=True)
            except Exception:  # report and go on with the next model; a rerun resumes
                import traceback

                traceback.print_exc()
    import pages

    pages.write_all(HERE)


if __name__ == "__main__":
    main()
