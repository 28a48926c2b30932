"""The circuit section of a tiny theory-of-mind model's card: the circuit (mean ablation, pruning,
faithfulness), each head's effect on each case, and where each head looks, read against the
lookback account of Prakash et al. (2025).

Key tokens fall in roles of the story (Q = the character asked about, P = the other one, who
refills a container): ``q_name`` / ``p_name`` (their mentions in the story), ``q_container`` /
``p_container`` (the container each grabbed, every mention), ``q_drink`` / ``p_drink`` (the drink
each first poured: Q's is the false-belief answer), ``new_drink`` (P's refill: the true-belief
answer), ``q_visibility`` / ``p_visibility`` (the "can"/"cannot" of "Q can observe P's actions" and
of "P can observe Q's actions"), ``question`` (the character and container named in the question),
``self`` and ``rest`` (template words).

Queries: ``last`` (the token that predicts the answer, measured per case), ``q_drink`` (where
Prakash et al. find the character-object-state binding: does the drink token read its character
and container?) and ``q_visibility`` (the visibility sentence: does it read what P did?).
"""

from __future__ import annotations

import torch

from ..tasks.theory_of_mind import CASES
from .card import END, START, attention_mass, word_ids

TOM_CATEGORIES = ("q_name", "p_name", "q_container", "p_container", "q_drink", "p_drink", "new_drink",
                  "q_visibility", "p_visibility", "question", "self", "rest")
TOM_QUERIES = ("last", "q_drink", "q_visibility")
SHORT = {"q_name": "Q", "p_name": "P", "q_container": "Q.cont", "p_container": "P.cont", "q_drink": "Q.drink",
         "p_drink": "P.drink", "new_drink": "new", "q_visibility": "Q.vis", "p_visibility": "P.vis",
         "question": "quest.", "self": "self", "rest": "rest"}


def story_roles(model, td, i: int, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
    """Prompt ``i`` (token ids ``[seq]``) of a ``theory_of_mind`` task: each token's role (index into
    ``TOM_CATEGORIES``) and the positions of the queries."""
    meta = td.metadata[i]
    ids = ids.tolist()
    one = lambda word: next(iter(word_ids(model, [word])), -1)  # noqa: E731
    # the two filling sentences: "NAME grabs an opaque CONTAINER and fills it with DRINK ."
    grabs = [t for t, tok in enumerate(ids) if tok == one("grabs")][:2]
    owner = {ids[g - 1]: (ids[g + 3], ids[g + 8], g + 8) for g in grabs}
    q, p = one(meta["character"]), one(meta["other"])
    roles = {q: "q_name", p: "p_name", owner[q][0]: "q_container", owner[p][0]: "p_container",
             owner[q][1]: "q_drink", owner[p][1]: "p_drink", one(meta["new_drink"]): "new_drink"}
    cat = torch.tensor([TOM_CATEGORIES.index(roles.get(tok, "rest")) for tok in ids])
    vis = int(td.positions["visibility"][i])
    cat[vis] = TOM_CATEGORIES.index("q_visibility")
    can = {one("can"), one("cannot")}
    cat[next(t for t in range(vis + 1, len(ids)) if ids[t] in can)] = TOM_CATEGORIES.index("p_visibility")
    for name in ("query_character", "query_container"):
        cat[int(td.positions[name][i])] = TOM_CATEGORIES.index("question")
    return cat, {"last": int(td.positions["last"][i]), "q_drink": owner[q][2], "q_visibility": vis}


def belief_attention(model, td, *, batch_size: int = 64) -> dict[str, dict[str, list[list[float]]]]:
    """``query -> role -> [layer][head]`` mean attention mass on ``theory_of_mind`` prompts ``td``."""
    return attention_mass(model, td, lambda i, ids: story_roles(model, td, i, ids), TOM_CATEGORIES, TOM_QUERIES,
                          batch_size=batch_size)


def head_roles(heads: list[dict]) -> dict[str, dict]:
    """The head that most reads each lookback's source from the last token: Q's visibility word, the
    drink of the belief (Q's first drink on false belief, the refill on true belief), Q's mentions in
    the story (the order reader: which filling sentence is Q's), and at Q's drink the head that most
    reads Q's name and container (the binding)."""
    def best(score):
        h = max(heads, key=score)
        return {"head": h["head"], "attention": round(score(h), 3)}

    att = lambda h, case, q, k: h["attention"][case][q][k]  # noqa: E731

    def over_cases(q, *keys):  # a head's attention from query q on the roles keys, mean over the cases
        return lambda h: sum(att(h, c, q, k) for c in CASES for k in keys) / len(CASES)

    return {
        "visibility": best(over_cases("last", "q_visibility")),
        "false_belief_drink": best(lambda h: att(h, "false_belief", "last", "q_drink")),
        "true_belief_drink": best(lambda h: att(h, "true_belief", "last", "new_drink")),
        "order": best(over_cases("last", "q_name")),
        "binding": best(over_cases("q_drink", "q_name", "q_container")),
    }


def tom_circuit_card(model, *, n: int = 200, seed: int = 30_000, threshold: float = 0.2,
                     progress: bool | None = None) -> dict:
    """Discover ``model``'s theory-of-mind circuit on test-split prompts of all three cases (mean
    ablation, logit difference against the belief with the visibility flipped) and describe each head:
    its ablation effect, the accuracy per case with it mean-ablated alone, and its attention per case."""
    from ..discovery import ablate, ablation_values, find_circuit
    from ..tasks import evaluate, make_task

    mixed = make_task("theory_of_mind", model, n, seed=seed, split="test")
    data = {c: make_task("theory_of_mind", model, n, seed=seed + 1 + k, cases=[c], split="test")
            for k, c in enumerate(CASES)}
    circ = find_circuit(model, mixed, method="ablation", ablation="mean", threshold=threshold, progress=progress)
    values = ablation_values(model, mixed, list(circ.scores))  # one mean over all cases for every ablation
    attn = {c: belief_attention(model, d) for c, d in data.items()}
    heads = []
    for comp, score in sorted(circ.scores.items(), key=lambda kv: -kv[1]):
        heads.append({
            "head": str(comp), "ablation_effect": round(score, 4), "in_circuit": comp in circ,
            "ablated_accuracy": {c: round(ablate(model, d, [comp], values=values, metrics=("accuracy",))["accuracy"], 3)
                                 for c, d in data.items()},
            "attention": {c: {q: {k: round(attn[c][q][k][comp.layer][comp.head], 3) for k in TOM_CATEGORIES}
                              for q in TOM_QUERIES} for c in CASES},
        })
    return {"task": "theory_of_mind", "split": "test", "n": n, "seed": seed,
            "accuracy": {c: evaluate(model, d)["accuracy"] for c, d in data.items()},
            "metric": circ.metric, "full_metric": circ.full_metric, "circuit_metric": circ.circuit_metric,
            "faithfulness": circ.faithfulness, "threshold": threshold,
            "circuit": [str(c) for c in circ.components], "heads": heads, "roles": head_roles(heads)}


def tom_card_markdown(card: dict) -> str:
    """The card's Markdown section (between the markers of ``training.card``)."""
    acc = ", ".join(f"{c} {a:.3f}" for c, a in card["accuracy"].items())
    r = card["roles"]
    lines = [
        START, "## Circuit", "",
        f"Discovered with `circuit_distill.training.tom_card.tom_circuit_card` on {card['n']} held-out prompts "
        f"per case (test split; seed {card['seed']}; accuracy {acc}): mean ablation of each head alone, then "
        f"pruning with threshold {card['threshold']} (`find_circuit`, metric {card['metric']}: the answer "
        "against the belief with the visibility flipped).",
        "",
        f"- **Circuit: {', '.join(card['circuit']) or '(empty)'}**; faithfulness (circuit-only {card['metric']} / "
        f"full) = **{card['faithfulness']:.2f}** ({card['circuit_metric']:.2f} / {card['full_metric']:.2f}).",
        f"- Reads the visibility sentence (last token -> Q's can/cannot): **{r['visibility']['head']}** "
        f"({r['visibility']['attention']:.2f} of its attention, mean over cases).",
        f"- Fetches the drink: false belief (last -> Q's first drink) **{r['false_belief_drink']['head']}** "
        f"({r['false_belief_drink']['attention']:.2f}); true belief (last -> the refill) "
        f"**{r['true_belief_drink']['head']}** ({r['true_belief_drink']['attention']:.2f}).",
        f"- Reads the queried character's mentions (last token -> Q's name in the story: which filling "
        f"sentence is Q's): **{r['order']['head']}** ({r['order']['attention']:.2f}).",
        f"- Binding (Q's drink token -> Q's name and container): **{r['binding']['head']}** "
        f"({r['binding']['attention']:.2f}).",
        "",
        "Roles of the key tokens: Q = the character asked about, P = the other one (who refills a "
        "container); `Q.cont` / `P.cont` = the container each grabbed; `Q.drink` / `P.drink` = the drink "
        "each poured first (Q's is the false-belief answer); `new` = P's refill (the true-belief answer); "
        "`Q.vis` / `P.vis` = the can/cannot of \"Q can observe P's actions\" / \"P can observe Q's "
        "actions\"; `quest.` = the character and container named in the question.",
        "",
        "Accuracy per case with each head mean-ablated alone (means over all three cases):",
        "",
        "| head | in circuit | ablation effect | " + " | ".join(CASES) + " |",
        "|---|---|---|" + "---|" * len(CASES),
    ]
    for h in card["heads"]:
        lines.append(f"| {h['head']} | {'yes' if h['in_circuit'] else ''} | {h['ablation_effect']:.2f} | "
                     + " | ".join(f"{h['ablated_accuracy'][c]:.3f}" for c in CASES) + " |")
    lines.append("")
    views = [("last", c) for c in CASES] + [(q, None) for q in TOM_QUERIES[1:]]
    for q, case in views:
        where = f"on {case} prompts" if case else "mean over the three cases"
        lines += [f"Attention from the `{q}` token ({where}):", "",
                  "| head | " + " | ".join(SHORT[k] for k in TOM_CATEGORIES) + " |",
                  "|---|" + "---|" * len(TOM_CATEGORIES)]
        for h in card["heads"]:
            cases = [case] if case else list(CASES)
            lines.append(f"| {h['head']} | " + " | ".join(
                f"{sum(h['attention'][c][q][k] for c in cases) / len(cases):.2f}" for k in TOM_CATEGORIES) + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"
