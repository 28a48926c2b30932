"""The main job on the embedded default: circuit distillation of the project-trained entity-tracking
teacher into the warm student, every method of the paper's table, several seeds, one report.

Protocol (fixed before comparing rows; see ``DemoConfig``): the same training prompts, the same
number of steps, the same learning rate and the same trainable subset for every row (by default the
matched student heads' query rows and output-projection columns; see ``DemoConfig.trainable`` and
``train_kv``); only the objective (and, for the ``@hungarian`` / ``@cka`` rows, the component map)
changes. ``ce@all`` trains every parameter with CE as a reference. Each seed changes the data order
of every row alike (the seed is shared by the rows), never the data itself.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config
from .files import atomic_write_json, atomic_write_text

TEACHER = "builtin:entity-tracking-teacher"
STUDENT = "builtin:entity-tracking-student"
# row name -> (objective preset, component-map key, trainable subset). For ``ce+random_cka`` the
# trainer keeps the map's student heads (so the trainable subset is the same) and pairs each with a
# seeded random teacher circuit head.
PAPER_ROWS: dict[str, tuple[str, str, str]] = {
    "ce": ("ce", "ablation", "matched_heads"),
    "kd": ("kd", "ablation", "matched_heads"),
    "ce+random_cka": ("ce+random_cka", "ablation", "matched_heads"),
    "ce+align_cka": ("ce+align_cka", "ablation", "matched_heads"),
    "align_cka": ("align_cka", "ablation", "matched_heads"),
    "ce@all": ("ce", "ablation", "all"),
}
OUR_MATCHERS = ("hungarian", "cka")  # the default extra rows
EXTRA_MATCHERS = (*OUR_MATCHERS, "ablation_norm")  # ablation_norm: the paper's rule on per-model normalised effects


@dataclass
class DemoConfig(Config):
    """Everything that defines the demo's experiment. Change it here or with ``--set key=value``."""

    label = "demo setting"

    teacher: str = TEACHER
    student: str = STUDENT
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20
    lam: float = 1.0
    positions: str = "all"
    # the teacher was trained on 2-7 boxes; the student is distilled on 2-5 and also tested on 7
    # (more boxes than it is distilled on, where the teacher is still >= 0.98)
    train_boxes: str = "2-5"
    eval_boxes: int = 5
    hard_boxes: int = 7
    n_train: int = 2000
    n_eval: int = 200
    n_discovery: int = 200
    eval_every: int = 50
    # each model's circuit: the circuit_top_k heads of largest mean-ablation effect ("top_k"), or
    # iterative pruning that keeps what costs more than circuit_threshold of the metric ("pruned")
    circuit: str = "top_k"
    circuit_top_k: int = 4
    circuit_threshold: float = 0.2
    data_seed: int = 1234
    extra_matchers: list[str] = field(default_factory=lambda: list(OUR_MATCHERS))
    # what every row but ce@all trains: "matched_heads" (the paper's: query rows and output-projection
    # columns of the mapped student heads) or "attention" (all attention weights); ``train_kv`` adds the
    # mapped heads' GQA key/value groups to "matched_heads"
    trainable: str = "matched_heads"
    train_kv: bool = False

    def validate(self) -> None:
        from .errors import ConfigError

        unknown = [m for m in self.extra_matchers if m not in EXTRA_MATCHERS]
        if unknown:
            raise ConfigError(f"unknown demo matcher(s) {', '.join(map(repr, unknown))} in extra_matchers; "
                              f"choose from {', '.join(EXTRA_MATCHERS)}")
        if self.circuit not in ("top_k", "pruned"):
            raise ConfigError(f"demo setting circuit must be 'top_k' or 'pruned', got {self.circuit!r}")
        if self.trainable not in ("matched_heads", "attention"):
            raise ConfigError(f"demo setting trainable must be 'matched_heads' or 'attention', got {self.trainable!r} "
                              "(the ce@all row already trains everything)")


def _rows(cfg: DemoConfig, maps: dict) -> dict[str, tuple[str, str, str]]:
    rows = {name: (obj, key, cfg.trainable if subset == "matched_heads" else subset)
            for name, (obj, key, subset) in PAPER_ROWS.items()}
    for m in cfg.extra_matchers:
        if m in maps and maps[m].pairs != maps["ablation"].pairs:
            rows[f"ce+align_cka@{m}"] = ("ce+align_cka", m, cfg.trainable)
    return rows


def _atomic_json(path: Path, data) -> None:
    atomic_write_json(path, data, default=float)


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def make_data(cfg: DemoConfig, tokenizer) -> dict:
    """Training prompts, held-out sets at the evaluation and harder box counts, and a discovery set.

    Every set is drawn from its own seed stream, so no prompt is shared between them."""
    from .tasks import make_task

    s = cfg.data_seed
    return {
        "train": make_task("entity_tracking", tokenizer, cfg.n_train, seed=s, n_boxes=cfg.train_boxes),
        "eval": make_task("entity_tracking", tokenizer, cfg.n_eval, seed=s + 1, n_boxes=cfg.eval_boxes),
        "hard": make_task("entity_tracking", tokenizer, cfg.n_eval, seed=s + 2, n_boxes=cfg.hard_boxes),
        "discovery": make_task("entity_tracking", tokenizer, cfg.n_discovery, seed=s + 3, n_boxes=cfg.eval_boxes),
    }


def pair_ckas_on(student, teacher, td, pairs, positions: str, n: int = 128) -> list[float]:
    """CKA of each (student head, teacher head) pair on the first ``n`` prompts of ``td``."""
    from .distill.features import pair_cka

    return pair_cka(student, pairs, td, positions, teacher=teacher, n=n)


def _alignment(teacher, student, td, teacher_sweep=None) -> tuple[float, object]:
    """The influence-weighted alignment score A (Distilled Circuits) of the pair, and the comparison."""
    from .analysis import compare

    cmp = compare(teacher, student, td, n_boot=200, progress=False, teacher_sweep=teacher_sweep)
    return float(cmp.alignment), cmp


def discover_and_match(teacher, student, td, cfg: DemoConfig, log=print) -> dict:
    """Both circuits (top-k heads by mean-ablation effect on logit difference, or pruned; see
    ``DemoConfig.circuit``), the effects dP on answer probability, and the component maps of every matcher."""
    from .discovery import ablation_sweep, find_circuit
    from .matching import match
    from .model import capture

    out: dict = {}
    for side, m in (("teacher", teacher), ("student", student)):
        sweep = ablation_sweep(m, td, m.components("head"), metrics=("answer_prob", "logit_diff", "accuracy"),
                               progress=False)
        circ = find_circuit(m, td, method="ablation", top_k=cfg.circuit_top_k if cfg.circuit == "top_k" else None,
                            threshold=cfg.circuit_threshold, metric="logit_diff", progress=False)
        out[side] = {"sweep": sweep, "circuit": circ, "effects": sweep.effect("answer_prob")}
        log(f"  {side}: circuit {', '.join(map(str, circ.components))} (faithfulness {circ.faithfulness:.2f}; "
            f"sweep {sweep.seconds:.1f}s)")
    tc, sc = out["teacher"]["circuit"].components, out["student"]["circuit"].components
    te, se = out["teacher"]["effects"], out["student"]["effects"]
    maps = {"ablation": match(te, se, tc, sc, "ablation"), "hungarian": match(te, se, tc, sc, "hungarian"),
            "ablation_norm": match(te, se, tc, sc, "ablation", normalize=True)}
    # the cka matcher compares head activations over the same prompts (all real positions)
    from .tasks.positions import select_rows

    b = td.clean.subset(torch.arange(min(128, len(td))))
    acts = {}
    for side, m, comps in (("teacher", teacher, tc), ("student", student, sc)):
        with capture(m, comps, detach=True) as cap:
            m(b.input_ids, b.attention_mask)
            acts[side] = {c: select_rows(cap[c], b.attention_mask, "all") for c in comps}
    maps["cka"] = match(te, se, tc, sc, "cka", teacher_acts=acts["teacher"], student_acts=acts["student"])
    out["maps"] = maps
    for name, cm in maps.items():
        log(f"  map {name}: " + ", ".join(f"{s}->{t}" for s, t in cm.pairs))
    return out


def _curve(history: list[dict]) -> list[dict]:
    pts = []
    for h in history:
        if "eval/eval/accuracy" in h:
            pts.append({"step": h["step"], "acc": h["eval/eval/accuracy"], "acc_hard": h.get("eval/hard/accuracy")})
    return pts


def run_demo(cfg: DemoConfig, out: str | os.PathLike = "runs/demo", *, progress: bool = True, log=print) -> dict:
    """Run the whole demo and write ``results.json`` and ``report.html`` into ``out``; return the results."""
    from tqdm.auto import tqdm

    from .distill.cache import TeacherCache, build_cache
    from .distill.config import DistillConfig
    from .distill.trainer import distill
    from .model import load_model
    from .tasks import evaluate

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.data_seed)
    teacher = load_model(cfg.teacher)
    student0 = load_model(cfg.student)
    if teacher.tokenizer.get_vocab() != student0.tokenizer.get_vocab():
        from .errors import CircuitDistillError

        raise CircuitDistillError("the demo's teacher and student must share one tokenizer")
    log(f"teacher {cfg.teacher}: {teacher.arch.n_layers} layers x {teacher.arch.n_heads} heads, "
        f"{teacher.n_params:,} params; student {cfg.student}: {student0.arch.n_layers} x {student0.arch.n_heads}, "
        f"{student0.n_params:,} params")
    data = make_data(cfg, teacher.tokenizer)
    ev = {"eval": data["eval"], "hard": data["hard"]}
    t_acc = {k: evaluate(teacher, td, progress=False)["accuracy"] for k, td in ev.items()}
    s_acc = {k: evaluate(student0, td, progress=False)["accuracy"] for k, td in ev.items()}
    log(f"teacher accuracy {t_acc['eval']:.3f} at {cfg.eval_boxes} boxes, {t_acc['hard']:.3f} at {cfg.hard_boxes}; "
        f"student before {s_acc['eval']:.3f} / {s_acc['hard']:.3f}")

    log("discovering circuits and matching components")
    found = discover_and_match(teacher, student0, data["discovery"], cfg, log=log)
    maps = found["maps"]
    a_before, cmp_before = _alignment(teacher, student0, data["discovery"])
    log(f"alignment score A before distillation: {a_before:.3f}")

    # one teacher cache for every row: all teacher circuit heads over the training prompts
    t_heads = found["teacher"]["circuit"].components
    cdir = out / "teacher_cache"
    build_cache(teacher, data["train"], t_heads, cfg.positions, cdir)
    cache = TeacherCache.load(cdir)

    rows = _rows(cfg, maps)
    runs: list[dict] = []
    results_path = out / "results.json"
    todo = [(row, seed) for seed in cfg.seeds for row in rows]
    bar = tqdm(todo, desc="demo runs", disable=not progress)
    last_cmp = None
    for row, seed in bar:
        bar.set_postfix_str(f"{row} seed {seed}")
        objective, map_key, subset = rows[row]
        student = load_model(cfg.student)
        dc = DistillConfig(objective=objective, seed=seed, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                           warmup=cfg.warmup, lam=cfg.lam, positions=cfg.positions, trainable=subset,
                           train_kv=cfg.train_kv and subset == "matched_heads",
                           eval_every=cfg.eval_every, labels="teacher", use_cache=True)
        res = distill(student, data["train"], teacher=None, eval_sets=ev, component_map=maps[map_key], config=dc,
                      cache=cache, progress=False)
        ckas = pair_ckas_on(student, teacher, data["eval"], maps["ablation"].pairs, cfg.positions)
        a_after, cmp = _alignment(teacher, student, data["discovery"], cmp_before.teacher_sweep)
        if row == "ce+align_cka" and seed == cfg.seeds[0]:
            last_cmp = cmp
        runs.append({
            "row": row, "seed": seed, "objective": objective, "matching": map_key, "trainable": subset,
            "acc": res.final_eval["eval"]["accuracy"], "acc_hard": res.final_eval["hard"]["accuracy"],
            "pair_cka_after": sum(ckas) / len(ckas) if ckas else math.nan, "alignment_after": a_after,
            "trained_param_fraction": res.trained_fraction, "trained_params": res.trained_params,
            "curve": [{"step": 0, "acc": s_acc["eval"], "acc_hard": s_acc["hard"]}] + _curve(res.history)
            + [{"step": res.steps, "acc": res.final_eval["eval"]["accuracy"],
                "acc_hard": res.final_eval["hard"]["accuracy"]}],
        })
        _atomic_json(out / "runs.json", _nan_to_none(runs))  # nothing lost if interrupted
    bar.close()

    from .analysis_demo_tables import format_table, summarise_rows

    summary = summarise_rows(runs)
    results = {
        "rows": {r: summary[r] for r in rows},
        "teacher": {"acc": t_acc["eval"], "acc_hard": t_acc["hard"], "model": cfg.teacher,
                    "params": teacher.n_params},
        "student_before": {"acc": s_acc["eval"], "acc_hard": s_acc["hard"], "alignment": a_before,
                           "model": cfg.student, "params": student0.n_params},
        "circuits": {side: {"components": [str(c) for c in found[side]["circuit"].components],
                            "faithfulness": found[side]["circuit"].faithfulness} for side in ("teacher", "student")},
        "maps": {k: m.to_dict() for k, m in maps.items()},
        "seeds": list(cfg.seeds),
        "config": cfg.to_dict(),
        "runtime_s": time.perf_counter() - t0,
    }
    _atomic_json(results_path, _nan_to_none(results))
    table = format_table(results["rows"])
    log("\n" + table)
    write_demo_report(results, out, cmp_before=cmp_before, cmp_after=last_cmp)
    log(f"\nwrote {results_path} and {out / 'report.html'} in {results['runtime_s']:.0f}s")
    return results


def write_demo_report(results: dict, out: Path, *, cmp_before=None, cmp_after=None) -> Path:
    """A self-contained HTML page: the table, accuracy curves, bars, and head-influence heatmaps."""
    import base64
    import html
    import tempfile

    from .analysis_demo_tables import format_table, plot_bars, plot_curves

    def img(fn, *args, **kw) -> str:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "f.png"
            fn(*args, p, **kw)
            return f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'

    rows = results["rows"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>circuit-distill demo</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}h2{margin-top:1.6em}</style>",
        "</head><body><h1>circuit-distill demo: entity tracking</h1>",
        f"<p>Teacher <code>{html.escape(results['teacher']['model'])}</code>: accuracy "
        f"{results['teacher']['acc']:.3f} (training-range boxes), {results['teacher']['acc_hard']:.3f} (harder split). "
        f"Student before distillation: {results['student_before']['acc']:.3f} / "
        f"{results['student_before']['acc_hard']:.3f}, alignment A = {results['student_before']['alignment']:.3f}. "
        f"Seeds: {results['seeds']}. Runtime {results['runtime_s']:.0f}s.</p>",
        "<h2>Results (mean ± std over seeds)</h2><pre>" + html.escape(format_table(rows)) + "</pre>",
        "<h2>Accuracy over distillation steps</h2>",
        img(plot_curves, rows, key="acc", title="held-out accuracy (evaluation box count)"),
        img(plot_curves, rows, key="acc_hard", title="held-out accuracy (harder split)"),
        "<h2>Final accuracy</h2>",
        img(plot_bars, rows, reference={"teacher": results["teacher"]["acc_hard"]}),
    ]
    if cmp_before is not None:
        from .analysis.report import influence_heatmaps

        parts += ["<h2>Head influence: teacher and student before distillation</h2>",
                  f'<img src="{influence_heatmaps(cmp_before)}">']
    if cmp_after is not None:
        from .analysis.report import influence_heatmaps

        parts += ["<h2>Head influence: teacher and student after ce+align_cka (first seed)</h2>",
                  f'<img src="{influence_heatmaps(cmp_after)}">']
    parts.append("<h2>Circuits and component maps</h2><pre>" + html.escape(json.dumps(
        {"circuits": results["circuits"], "maps": {k: v.get("pairs") for k, v in results["maps"].items()}},
        indent=1, default=str)) + "</pre></body></html>")
    return atomic_write_text(out / "report.html", "\n".join(parts))
