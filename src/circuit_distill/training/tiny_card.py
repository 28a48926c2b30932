"""The training part of a tiny model's card (``README.md``), written from its ``train_tiny`` record:
architecture, command, data, stopping rule, result and the held-out accuracy per box count or case.
(The circuit section is ``training.card``'s.)"""

from __future__ import annotations

from types import SimpleNamespace

from .curricula import curriculum_for

# what a record written before these options existed was trained with
RECORD_DEFAULTS = {"task": "entity_tracking", "anneal_from": None, "same_boxes_per_batch": False,
                   "story_loss": False, "bind_fraction": 0.0, "recap_fraction": 0.0, "entity_shift": 0.0, "qk_match_init": 0.0,
                   "order_fraction": 0.0, "own_fraction": 0.0, "case_weights": [1.0, 1.0, 1.0], "lookback_offsets": [],
                   "bind_heads": [], "order_heads": []}


def model_card(record: dict) -> str:
    """A Markdown model card from a ``train_tiny`` record: architecture, command, steps, time,
    stopping rule and the measured held-out accuracy per box count (or per case)."""
    c = SimpleNamespace(**(RECORD_DEFAULTS | record["config"]))
    cur = curriculum_for(c.task)
    text = cur.card_text(c)
    targets = cur.target_keys(c)
    lines = [
        f"# {text['title']}",
        "",
        f"Llama-style, {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, "
        f"{c.n_kv_heads} KV heads (GQA), MLP width {c.d_mlp or 4 * c.d_model}; "
        f"{record['params']:,} parameters; word-level tokenizer over {text['vocabulary']}.",
        "",
        "## Training",
        "",
        "```",
        record.get("command") or "(run through the Python API: circuit_distill.training.tiny.train_tiny)",
        "```",
        "",
        f"- Data: {text['data']}; "
        f"batch {c.batch_size}, lr {c.lr}, {c.warmup} warmup steps"
        + (f", lr falling linearly to 0 from step {c.anneal_from} to {c.max_steps}"
           if c.anneal_from is not None else "") + f", seed {c.seed}"
        + (", one box count per batch" if c.same_boxes_per_batch and c.task == "entity_tracking" else "") + ".",
        f"- Stopping rule: the first evaluation (every {c.eval_every} steps, {c.eval_n} fresh prompts) "
        f"where {text['target']} reaches {c.target_accuracy}, or {c.max_steps} steps.",
        f"- Result: **{record['steps']} steps, {record['seconds'] / 60:.1f} minutes of training**, target "
        + ("**reached**." if record["reached_target"] else "**NOT reached** (stopped by max_steps or by hand)."),
        "",
        f"## Held-out accuracy ({text['heldout'].format(n=record['final_eval_n'])})",
        "",
        f"| {text['key']} | " + " | ".join(record["final_accuracy"]) + " |",
        "|---|" + "---|" * len(record["final_accuracy"]),
        "| accuracy | " + " | ".join(f"{a:.3f}" for a in record["final_accuracy"].values()) + " |",
        "",
        text["chance"],
        "",
        "## Evaluations during training",
        "",
        "| step | minutes | loss | " + " | ".join(f"acc@{k}" for k in targets) + " |",
        "|---|---|---|" + "---|" * len(targets),
    ]
    for h in record["history"]:
        lines.append(f"| {h['step']} | {h['seconds'] / 60:.1f} | {h['loss']:.3f} | "
                     + " | ".join(f"{h['accuracy'][k]:.3f}" for k in targets) + " |")
    return "\n".join(lines) + "\n"
