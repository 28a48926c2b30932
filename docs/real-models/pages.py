"""Pages from the saved stages of circuits.py: `<model>.md` per model and one self-contained `report.html`."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

MODELS = ("smollm2-135m", "gemma3-270m", "gemma3-270m-et", "smollm2-135m-et")  # pages of those with stages
COMPARES = ("compare-et-centred", "compare-3boxes-centred", "compare-et", "compare-3boxes", "compare")  # compare runs in report.html, newest first
ORDER = ("A", "B", "C", "D")
ROLES = {  # group -> (name, query token, the token kind Prakash's account has it attend to)
    "A": ("value fetcher", "last", "answer_object"),
    "B": ("position transmitter", "last", "query_label"),
    "C": ("position detector", "query_label", "earlier_label"),
    "D": ("structure reader", "earlier_label", "answer_object"),
}
KINDS = ("query_label", "earlier_label", "answer_object", "other_objects", "other_labels", "shots", "self", "rest")
SHORT = {"query_label": "qlabel", "earlier_label": "label", "answer_object": "object", "other_objects": "oth.obj",
         "other_labels": "oth.lab", "shots": "shots", "self": "self", "rest": "rest"}
COMMAND = ("OMP_NUM_THREADS=1 .venv/bin/python docs/real-models/circuits.py --model {m} --n {n} --boxes {boxes} "
           "--shots {shots} --seed {seed}")


def load(run: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(run.glob("*.json"))}


def mass(st: dict, head: str, query: str) -> dict[str, float]:
    layer, h = (int(x) for x in head[1:].split(".H"))
    return {k: st["attention"]["mass"][query][k][layer][h] for k in KINDS}


def top_kind(m: dict[str, float]) -> str:
    return max((k for k in KINDS if k not in ("rest", "self", "shots")), key=lambda k: m[k])


def role_rows(st: dict) -> list[tuple]:
    """(group, head, path score, ablation effect, attention from the role's query token, matches Prakash?)."""
    circ = st.get("circuit", {})
    sweep = st["sweep"]
    rows = []
    for g in ORDER:
        stage = st.get(f"path_{g}")
        for head in circ.get("groups", {}).get(g, []):
            _, query, kind = ROLES[g]
            m = mass(st, head, query)
            effect = sweep["clean"]["logit_diff"] - sweep["ablated"][head]["logit_diff"]
            rows.append((g, head, stage["scores"][head], effect, m, top_kind(m) == kind))
    return rows


def model_markdown(name: str, st: dict) -> str:
    s, c, sw = st["setup"], st["clean"], st["sweep"]  # written first, in this order
    lines = [f"# {name}: the entity-tracking circuit", "",
             f"Reproduce (resumable; about {sum(v.get('stage_seconds', 0) for v in st.values()) / 60:.0f} minutes "
             "of stages on 2 shared CPU cores, plus loading):", "", "```bash",
             COMMAND.format(m=name, **{"shots": 0, **s}), "```", "",
             f"{s['n']} prompts at {s['boxes']} boxes (seed {s['seed']}), "
             + (f"each after {s['shots']} solved example(s) of the same box count (`n_shots`; other objects and "
                "labels), " if s.get("shots") else "") + f"objects drawn from the {len(s['objects'])} "
             "built-in objects both tokenizers keep whole, so both models see the same prompts; corruption: another "
             "box of the same context is queried (group D: every object replaced).", "",
             "## How well it does the task", "",
             f"accuracy {c['accuracy']:.3f} (argmax over the vocabulary); **accuracy among the prompt's own objects "
             f"{c['in_context_accuracy']:.3f} (chance {c['chance']:.3f})**; logit difference against another box's "
             f"object {c['logit_diff']:.3f}; answer probability {c['answer_prob']:.3f}.", "",
             "## All-head mean-ablation sweep", "",
             f"{len(sw['ablated'])} heads, each mean-ablated alone (per-position means over {s['n']} reference "
             f"prompts): **{sw['seconds']:.0f} s, {sw['forwards']:.1f} forward-equivalents** (one forward over the "
             "prompts = 1). Largest effects (clean logit difference minus ablated):", "",
             "| head | effect on LD |", "|---|---|"]
    effect = {k: sw["clean"]["logit_diff"] - v["logit_diff"] for k, v in sw["ablated"].items()}
    for k, v in sorted(effect.items(), key=lambda kv: -abs(kv[1]))[:12]:
        lines.append(f"| {k} | {v:+.3f} |")
    lines += ["", "## Path patching from the last token back", ""]
    for g in ORDER:
        p = st.get(f"path_{g}")
        if p is None:
            lines.append(f"- {g} ({ROLES[g][0]}): not run (no group it would act through).")
            continue
        grp = st.get("circuit", {}).get("groups", {}).get(g, [])
        lines.append(f"- **{g} ({ROLES[g][0]})**: {len(p['scores'])} senders at positions `{p['positions']}`, hops "
                     f"{' -> '.join(f'{len(r)} heads via {rt}' for r, rt in p['hops']) or 'none (direct)'}; "
                     f"clean LD {p['clean']:.3f}, corrupted {p['corrupted']:.3f}; {p['seconds']:.0f} s, "
                     f"{p['forwards']:.1f} forward-equivalents. Group: {', '.join(grp) or '(none above the threshold)'}.")
    circ = st.get("circuit")
    if circ and "attention" in st:
        f = circ["faithfulness"]
        lines += ["", "## The circuit", "",
                  f"**{', '.join(circ['circuit']) or '(empty)'}** ({len(circ['circuit'])} of {len(effect)} heads; "
                  f"a head joins a group at a path score >= {circ['min_score']} of the clean-corrupted gap). "
                  f"Faithfulness (every other head mean-ablated, LD kept / full LD): **{_f(f)}**; the same number of "
                  f"heads taken by ablation effect alone ({', '.join(circ['ablation_top'])}): "
                  f"{_f(circ['ablation_top_faithfulness'])}.", "",
                  "## Roles by attention", "",
                  "Attention mass from the role's query token by token kind (`object` = the answer object in the "
                  "context, `label` = its box label there, `qlabel` = the label in the question). *Prakash?* = the "
                  "kind it attends to most (besides itself and template tokens) is the one Prakash et al.'s role "
                  "reads: A last->object, B last->qlabel, C qlabel->label, D label->object.", "",
                  "| group | head | path score | ablation effect | from | " + " | ".join(SHORT[k] for k in KINDS)
                  + " | Prakash? |", "|---|---|---|---|---|" + "---|" * len(KINDS) + "---|"]
        for g, head, score, eff, m, ok in role_rows(st):
            lines.append(f"| {g} | {head} | {score:.3f} | {eff:+.3f} | {ROLES[g][1]} | "
                         + " | ".join(f"{m[k]:.2f}" for k in KINDS) + f" | {'yes' if ok else 'no'} |")
    if "attention" not in st:
        return "\n".join(lines + ["", "(The later stages have not run yet: rerun the command to resume.)"]) + "\n"
    lines += ["", "The ten heads with the largest ablation effects, attention from the final token:", "",
              "| head | ablation effect | " + " | ".join(SHORT[k] for k in KINDS) + " |",
              "|---|---|" + "---|" * len(KINDS)]
    for k, v in sorted(effect.items(), key=lambda kv: -abs(kv[1]))[:10]:
        m = mass(st, k, "last")
        lines.append(f"| {k} | {v:+.3f} | " + " | ".join(f"{m[x]:.2f}" for x in KINDS) + " |")
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def heatmap(st: dict) -> str:
    """The sweep's per-head effects as a layer x head heatmap (a data: URI)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    sw = st["sweep"]
    cells = {tuple(int(x) for x in k[1:].split(".H")): sw["clean"]["logit_diff"] - v["logit_diff"]
             for k, v in sw["ablated"].items()}
    L, H = max(a for a, _ in cells) + 1, max(b for _, b in cells) + 1
    grid = np.zeros((L, H))
    for (a, b), v in cells.items():
        grid[a, b] = v
    vmax = max(1e-9, float(np.abs(grid).max()))
    fig, ax = plt.subplots(figsize=(2 + 0.5 * H, 1 + 0.25 * L))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="LD drop when mean-ablated")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def md_to_html(md: str) -> str:
    """Just enough Markdown for these pages: headings, tables, code blocks, paragraphs, bold."""
    import re

    out, table, code = [], [], False
    for line in md.splitlines() + [""]:
        if line.startswith("```"):
            out.append("</pre>" if code else "<pre>")
            code = not code
            continue
        if code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-") for c in cells):
                table.append(cells)
            continue
        if table:
            rows = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{_inline(c)}</{'th' if i == 0 else 'td'}>"
                                            for c in r) + "</tr>" for i, r in enumerate(table))
            out.append(f"<table>{rows}</table>")
            table = []
        m = re.match(r"^(#+) (.*)", line)
        if m:
            n = min(len(m.group(1)) + 1, 4)
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    return "\n".join(out)


def _inline(s: str) -> str:
    import re

    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"\*(.+?)\*", r"<i>\1</i>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#1d2330}"
       "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccd;padding:2px 6px;text-align:right}"
       "pre{background:#f4f5f8;padding:8px}img{max-width:100%}")


def compare_html(d: dict, folder: str) -> str:
    """One compare run: its alignment score and the control pairs' (``d`` is its comparison.json)."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['alignment']:.3f}</td><td>{v['mean_similarity']:.3f}"
                   f"</td></tr>" for k, v in d.get("controls", {}).items())
    return (f"<h2>{html.escape(d['teacher'])} vs {html.escape(d['student'])} (compare, {folder}/)</h2>"
            f"<p>{d['n_examples']} prompts; alignment score A = {d['alignment']:.3f}, mean similarity "
            f"{d['mean_similarity']:.3f}, at named positions {', '.join(d.get('named_positions', []))}; the full "
            f"report is {folder}/report.html.</p><table><tr><th>control pair</th><th>A</th><th>mean S</th></tr>"
            f"<tr><td><b>true pair</b></td><td><b>{d['alignment']:.3f}</b></td><td>{d['mean_similarity']:.3f}</td></tr>"
            f"{rows}</table>")


def write_all(here: Path) -> None:
    """Write `<model>.md` for every model with saved stages and `report.html` with all of them."""
    parts = []  # only with a model page: the pages of an earlier run stay until a run has stages
    for name in MODELS:
        run = here / "stages" / name
        st = load(run) if run.is_dir() else {}
        if "sweep" not in st:
            continue
        md = model_markdown(name, st)
        (here / f"{name}.md").write_text(md)
        parts.append(md_to_html(md) + f'<p><img alt="sweep of {name}" src="{heatmap(st)}"></p>')
    for folder in COMPARES if parts else ():
        cmp = here / folder / "comparison.json"
        if cmp.is_file():
            parts.append(compare_html(json.loads(cmp.read_text()), folder))
    if parts:
        body = "\n<hr>\n".join(parts)
        (here / "report.html").write_text(f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Entity-"
                                          f"tracking circuits of real models</title><style>{CSS}</style></head>"
                                          f"<body><h1>Entity-tracking circuits of real models</h1>{body}</body></html>")
