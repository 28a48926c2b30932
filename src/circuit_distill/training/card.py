"""The circuit section of a tiny entity-tracking model's card: which heads the task needs (mean
ablation, pruned circuit, faithfulness) and where each head looks.

Attention is read per prompt at two query tokens: the final token (``last``, which predicts the
answer) and the box label where the answer object was put (``earlier_label``, where a binding of
label and object can form). Each key token falls in one category:

- ``query_label``: the label asked about in the question ("Box **T** contains the");
- ``earlier_label``: the same label in the context, next to the answer object;
- ``answer_object``: the answer object's mention in the context;
- ``other_objects`` / ``other_labels``: the other objects and box labels of the context;
- ``self``: the query token itself; ``rest``: every other token (template words).

The numbers are the mean attention mass per category (over prompts, rows sum to 1), so a head that
"retrieves the answer" shows most of its mass on ``answer_object`` from ``last``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..files import atomic_write_json, atomic_write_text
from ..model.attention import eager_attention, forward_attentions

CATEGORIES = ("query_label", "earlier_label", "answer_object", "other_objects", "other_labels", "self", "rest")
QUERIES = ("last", "earlier_label")
START, END = "<!-- circuit:start -->", "<!-- circuit:end -->"


def word_ids(model, words) -> set[int]:
    """Token ids of ``words`` in ``model``'s vocabulary (word-level or BPE with a space marker)."""
    vocab = model.tokenizer.get_vocab()
    ids = {tok.lstrip("Ġ▁ ").strip(): i for tok, i in vocab.items()}
    return {ids[w] for w in words if w in ids}


@torch.no_grad()
def attention_mass(model, td, label_prompt, categories, queries, *, batch_size: int = 64
                   ) -> dict[str, dict[str, list[list[float]]]]:
    """``query -> category -> [layer][head]``: mean attention mass from named query tokens to categories
    of key tokens. ``label_prompt(i, ids)`` gives prompt ``i`` (token ids ``[seq]``) its key categories
    (``[seq]`` indices into ``categories``) and ``{query name: position}``; the query token itself
    counts as ``self`` (which must be one of ``categories``). Rows of every query sum to 1."""
    L, H = model.arch.n_layers, model.arch.n_heads
    sums = {q: torch.zeros(len(categories), L, H, dtype=torch.float64) for q in queries}
    with eager_attention(model):
        for s in range(0, len(td), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(td)))
            b = td.clean.subset(idx).to(model.device)
            atts = forward_attentions(model, b.input_ids, b.attention_mask)
            atts = torch.stack([a.float().cpu() for a in atts], 1)  # [batch, L, H, q, k]
            ids = b.input_ids.cpu()
            mask = b.attention_mask.cpu() > 0
            for r in range(len(idx)):
                cat, qpos = label_prompt(int(idx[r]), ids[r])
                for q in queries:
                    c = cat.clone()
                    c[qpos[q]] = categories.index("self")
                    row = atts[r, :, :, qpos[q], :] * mask[r]  # [L, H, k]
                    for j in range(len(categories)):
                        sums[q][j] += row[:, :, c == j].sum(-1).double()
    n = max(1, len(td))
    return {q: {name: (sums[q][j] / n).tolist() for j, name in enumerate(categories)} for q in queries}


def attention_by_category(model, td, *, batch_size: int = 64) -> dict[str, dict[str, list[list[float]]]]:
    """``query -> category -> [layer][head]`` mean attention mass (see the module docstring)."""
    from ..tasks.entity_tracking import LABELS, OBJECTS

    objects, labels = word_ids(model, OBJECTS), word_ids(model, LABELS)

    def label_prompt(i, ids):
        named = {k: int(td.positions[k][i]) for k in ("query_label", "earlier_label", "object", "last")}
        cat = torch.full((ids.shape[0],), CATEGORIES.index("rest"))
        for t in range(ids.shape[0]):
            if int(ids[t]) in objects:
                cat[t] = CATEGORIES.index("other_objects")
            elif int(ids[t]) in labels:
                cat[t] = CATEGORIES.index("other_labels")
        cat[named["query_label"]] = CATEGORIES.index("query_label")
        cat[named["earlier_label"]] = CATEGORIES.index("earlier_label")
        cat[named["object"]] = CATEGORIES.index("answer_object")
        return cat, named

    return attention_mass(model, td, label_prompt, CATEGORIES, QUERIES, batch_size=batch_size)


def circuit_card(model, *, boxes: int = 7, n: int = 200, seed: int = 30_000, threshold: float = 0.2,
                 progress: bool | None = None) -> dict:
    """Discover ``model``'s entity-tracking circuit at ``boxes`` boxes and describe its heads."""
    from ..discovery import find_circuit
    from ..tasks import evaluate, make_task

    td = make_task("entity_tracking", model, n, seed=seed, n_boxes=boxes)
    acc = evaluate(model, td)["accuracy"]
    circ = find_circuit(model, td, method="ablation", ablation="mean", threshold=threshold, progress=progress)
    attn = attention_by_category(model, td)
    heads = []
    for c, score in sorted(circ.scores.items(), key=lambda kv: -kv[1]):
        heads.append({
            "head": str(c), "ablation_effect": round(score, 4), "in_circuit": c in circ,
            "attention": {q: {k: round(attn[q][k][c.layer][c.head], 3) for k in CATEGORIES} for q in QUERIES},
        })
    return {"task": "entity_tracking", "boxes": boxes, "n": n, "seed": seed, "accuracy": acc,
            "metric": circ.metric, "full_metric": circ.full_metric, "circuit_metric": circ.circuit_metric,
            "faithfulness": circ.faithfulness, "threshold": threshold,
            "circuit": [str(c) for c in circ.components], "heads": heads}


def card_markdown(card: dict) -> str:
    """The card's Markdown section (between markers, so it can be replaced in place)."""
    short = {"query_label": "qlabel", "earlier_label": "label", "answer_object": "object",
             "other_objects": "oth.obj", "other_labels": "oth.lab", "self": "self", "rest": "rest"}
    lines = [
        START, "## Circuit", "",
        f"Discovered with `circuit_distill.training.card.circuit_card` on {card['n']} held-out prompts at "
        f"{card['boxes']} boxes (seed {card['seed']}; accuracy {card['accuracy']:.3f}): mean ablation of each "
        f"head alone, then pruning with threshold {card['threshold']} (`find_circuit`, metric {card['metric']}).",
        "",
        f"- **Circuit: {', '.join(card['circuit']) or '(empty)'}**; faithfulness (circuit-only {card['metric']} / "
        f"full) = **{card['faithfulness']:.2f}** ({card['circuit_metric']:.2f} / {card['full_metric']:.2f}).",
        "",
        "Ablation effect = full logit difference minus the logit difference with that head mean-ablated. "
        "Attention is the mean mass from the query token to each kind of key token (`object` = the answer "
        "object in the context, `label` = its box label there, `qlabel` = the label in the question).",
        "",
    ]
    for q in QUERIES:
        lines += [f"From the `{q}` token:", "",
                  "| head | in circuit | ablation effect | " + " | ".join(short[k] for k in CATEGORIES) + " |",
                  "|---|---|---|" + "---|" * len(CATEGORIES)]
        for h in card["heads"]:
            a = h["attention"][q]
            lines.append(f"| {h['head']} | {'yes' if h['in_circuit'] else ''} | {h['ablation_effect']:.2f} | "
                         + " | ".join(f"{a[k]:.2f}" for k in CATEGORIES) + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_card(model_dir: str | Path, card: dict, section: str | None = None) -> None:
    """Write ``circuit.json`` and put the circuit section (default ``card_markdown(card)``) into
    ``README.md`` (replacing an earlier one)."""
    model_dir = Path(model_dir)
    atomic_write_json(model_dir / "circuit.json", card)
    readme = model_dir / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    section = card_markdown(card) if section is None else section
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END) + r"\n?", lambda _m: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    atomic_write_text(readme, text)
