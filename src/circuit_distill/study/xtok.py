"""Circuit distillation across tokenizers (issue 15): one resumable protocol, ``circuit-distill xtok``.

The teacher and the student tokenise the same prompts differently (``analysis.named_task_pair``). The
protocol, in order, each step saved in ``out`` and skipped when a rerun finds it there:

1. ``data``: training, discovery, held-out (the training options) and harder held-out (``harder_options``)
   prompts, each tokenised by both models (fixed by ``data_seed``; the same prompts for every run).
2. ``discovery.json`` and ``map.json``: each model's all-head mean-ablation sweep on its own tokens of the
   discovery prompts, its top ``circuit_size`` heads, and the map of the student's circuit onto the
   teacher's (``matching``, the paper's ablation rule by default).
3. ``teacher_cache/`` (every teacher head's rows on the training prompts, at ``positions``) and
   ``eval_cache/`` (the same on the first ``n_cka`` held-out prompts): training runs no teacher forward.
4. ``start.json``: both models' accuracy on their own tokens of both held-out sets before training.
5. ``runs/<row>.s<seed>/``: one ``distill`` per (row, seed) with gold labels and trainable = the matched
   heads (the map's student heads; random rows pair them with seeded random teacher heads), checkpointed
   every ``checkpoint_every`` steps and resumed from there; ``result.json`` when done (then the run's
   full student and checkpoint are deleted unless ``keep_students``).
6. ``results.json`` and ``results.md``: per row, mean and spread over seeds of held-out accuracy (training
   and harder box count), logit difference and the held-out CKA of the *matched* pairs (every row, so the
   rows compare; a random row's own pairs are in its ``result.json``).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, option
from ..distill import DistillConfig, TeacherCache, build_cache
from ..distill.features import pair_cka
from ..distill.objectives import get_objective
from ..distill.trainer import distill
from ..errors import ConfigError
from ..files import atomic_write_json, atomic_write_text
from ..matching import ComponentMap, discover_and_match
from ..tasks.metrics import evaluate

SETS = ("train", "discovery", "held_out", "harder")
METRICS = ("accuracy", "logit_diff", "answer_prob")


@dataclass
class XtokConfig(Config):
    """The cross-tokenizer distillation protocol (module docstring); ``config_help(XtokConfig)`` lists the keys."""

    override_example = "steps=300 or task_options.n_boxes=3"

    teacher: str = option("gemma3-270m", "teacher model (its own tokenizer)")
    student: str = option("smollm2-135m", "student model (another tokenizer)")
    task: str = option("entity_tracking", "task with named positions (circuit_distill.tasks.task_names())")
    task_options: dict = option(help="task options of the training, discovery and held-out prompts",
                                factory=lambda: {"n_boxes": 3})
    harder_options: dict = option(help="task options of the harder held-out prompts", factory=lambda: {"n_boxes": 5})
    n_train: int = option(256, "training prompts")
    n_eval: int = option(500, "prompts of each held-out set")
    n_discovery: int = option(16, "prompts of the discovery sweeps")
    n_cka: int = option(128, "held-out prompts the final pair CKA is measured on")
    data_seed: int = option(1234, "seed of every prompt set (training, discovery, held-out, harder)")
    circuit_size: int = option(8, "heads per circuit (top-k by mean-ablation effect on the logit difference)")
    matching: str = option("ablation", "matcher of the student's circuit onto the teacher's")
    rows: list[str] = option(help="objectives, one row each", factory=lambda: ["ce", "ce+random_cka", "ce+align_cka"])
    seeds: list[int] = option(help="training seeds (batch order, random pairs)", factory=lambda: [0, 1, 2])
    steps: int = option(300, "optimizer steps per run")
    batch_size: int = option(8, "prompts per step")
    lr: float = option(1e-3, "AdamW learning rate")
    warmup: int = option(0, "linear warmup steps")
    lam: float = option(1.0, "weight of the alignment term")
    positions: str = option("last", "named position(s) the alignment reads, comma-separated (one row per prompt)")
    trainable: str = option("matched_heads", "trained subset (distill.trainable)")
    eval_batch_size: int = option(32, "batch size of evaluation and of the teacher caches")
    checkpoint_every: int = option(25, "checkpoint every N steps (the resume point of an interrupted run)")
    threads: int = option(0, "torch threads (0 = leave as is)")
    keep_students: bool = option(False, "keep each run's trained student and last checkpoint (a full model each)")

    def validate(self) -> None:
        for k in ("n_train", "n_eval", "n_discovery", "n_cka", "circuit_size", "steps", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not self.rows or not self.seeds:
            raise ConfigError("rows and seeds must each name at least one entry")
        for row in self.rows:
            obj = get_objective(row)
            if obj.needs_teacher_logits:
                raise ConfigError(f"row {row!r} needs the teacher's logits, which are not defined across vocabularies: "
                                  "use ce, ce+random_cka, ce+align_cka (or other rows without KD/IIT)")
        if self.positions == "all":
            raise ConfigError("positions must name task positions (e.g. last): tokens do not line up across tokenizers")
        self.distill_config(self.seeds[0], self.rows[0])  # DistillConfig checks the shared keys

    def distill_config(self, seed: int, row: str) -> DistillConfig:
        """The ``DistillConfig`` of run (``row``, ``seed``): gold labels, no evaluation during training."""
        return DistillConfig(task=self.task, n_train=self.n_train, n_eval=self.n_eval, seed=seed, objective=row,
                             lam=self.lam, positions=self.positions, labels="gold", trainable=self.trainable,
                             steps=self.steps, batch_size=min(self.batch_size, self.n_train), lr=self.lr,
                             warmup=self.warmup, eval_every=0, eval_batch_size=self.eval_batch_size,
                             checkpoint_every=self.checkpoint_every, use_cache=True)


def device() -> str:
    """Where the models run: the GPU if there is one (the trainer's ``accelerate`` picks the same)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_sets(cfg: XtokConfig, teacher_tok, student_tok) -> dict[str, tuple]:
    """``{set: (teacher_data, student_data)}``: the same prompts in each model's tokens (module docstring)."""
    from ..analysis import named_task_pair

    spec = {"train": (cfg.n_train, cfg.task_options, 0), "discovery": (cfg.n_discovery, cfg.task_options, 1),
            "held_out": (cfg.n_eval, cfg.task_options, 2), "harder": (cfg.n_eval, cfg.harder_options, 3)}
    return {name: named_task_pair(cfg.task, teacher_tok, student_tok, n, seed=cfg.data_seed + 10_000 * k, **opts)
            for name, (n, opts, k) in spec.items()}


def discovery_step(cfg: XtokConfig, out: Path, teacher, student, sets: dict, log) -> ComponentMap:
    """``map.json`` (and ``discovery.json``): both circuits on each model's own tokens and the map; read back
    when already there."""
    if (out / "map.json").is_file():
        return ComponentMap.from_json(out / "map.json")
    t_data, s_data = sets["discovery"]
    log(f"discovery: sweeping every head of both models on {len(t_data)} prompts")
    found = discover_and_match(teacher, student, t_data, student_data=s_data, matchers=(cfg.matching,),
                               top_k=cfg.circuit_size, log=log)
    record = {side: {"circuit": [str(c) for c in d.circuit.components], "faithfulness": d.circuit.faithfulness,
                     "sweep_seconds": d.sweep.seconds, "clean": d.sweep.clean,
                     "effects": {str(c): v for c, v in d.effects.items()}}
              for side, d in (("teacher", found.teacher), ("student", found.student))}
    atomic_write_json(out / "discovery.json", record, indent=1, default=float)
    found.maps[cfg.matching].to_json(out / "map.json")
    return found.maps[cfg.matching]


def cache_step(path: Path, teacher, data, positions: str, batch_size: int) -> TeacherCache:
    """Every teacher head's rows on ``data`` at ``positions`` in ``path`` (built once, then loaded)."""
    if (path / "index.json").is_file():
        cache = TeacherCache.load(path)
        cache.check(teacher.components("head") if teacher is not None else cache.components, positions, len(data))
        return cache
    return build_cache(teacher, data, teacher.components("head"), positions, path, batch_size=batch_size,
                       logits=False)


def start_step(cfg: XtokConfig, out: Path, teacher, student, sets: dict) -> dict:
    """``start.json``: both models on their own tokens of both held-out sets, before any training."""
    if (out / "start.json").is_file():
        return json.loads((out / "start.json").read_text())
    rec = {side: {name: evaluate(model, sets[name][i], batch_size=cfg.eval_batch_size, progress=False)
                  for name in ("held_out", "harder")}
           for side, model, i in (("teacher", teacher, 0), ("student", student, 1))}
    atomic_write_json(out / "start.json", rec, indent=1)
    return rec


def run_one(cfg: XtokConfig, out: Path, row: str, seed: int, student_name: str, sets: dict, cmap: ComponentMap,
            caches: dict[str, TeacherCache], log) -> dict:
    """One run (``runs/<row>.s<seed>``), resumed from its checkpoint if interrupted; its ``result.json``."""
    from ..model import load_model

    run_dir = out / "runs" / f"{row}.s{seed}"
    if (run_dir / "result.json").is_file():
        return json.loads((run_dir / "result.json").read_text())
    resume = (run_dir / "checkpoint.pt").is_file()
    log(f"run {row} seed {seed}" + (" (resuming)" if resume else ""))
    student = load_model(student_name, check=False, device=device())
    t0 = time.perf_counter()
    dc = cfg.distill_config(seed, row)
    res = distill(student, sets["train"][1], teacher=None, cache=caches["train"], teacher_data=sets["train"][0],
                  eval_sets={"held_out": sets["held_out"][1], "harder": sets["harder"][1]}, component_map=cmap,
                  config=dc, out_dir=run_dir, progress=False, resume=resume, overwrite=not resume)
    held = sets["held_out"][1].subset(slice(0, cfg.n_cka))
    matched = pair_cka(student, list(cmap.pairs), held, cfg.positions, cache=caches["eval"], n=cfg.n_cka)
    own = pair_cka(student, list(res.component_map.pairs), held, cfg.positions, cache=caches["eval"], n=cfg.n_cka)
    steps = [r["step_seconds"] for r in res.history if "step_seconds" in r]
    rec = {"row": row, "seed": seed, "steps": res.steps, "final_eval": res.final_eval,
           "held_out_pair_cka": statistics.fmean(matched), "held_out_own_pair_cka": statistics.fmean(own),
           "pairs": [[str(a), str(b)] for a, b in res.component_map.pairs],
           "trained_params": res.trained_params, "trained_fraction": res.trained_fraction,
           "median_step_seconds": statistics.median(steps) if steps else None,
           "seconds_this_session": time.perf_counter() - t0}
    atomic_write_json(run_dir / "result.json", rec, indent=1)
    if not cfg.keep_students:  # the record is written: the full student and the optimizer state can go
        shutil.rmtree(run_dir / "student", ignore_errors=True)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return rec


def summary(cfg: XtokConfig, start: dict, runs: list[dict]) -> dict:
    """Per row and metric: mean, sample standard deviation, min, max and the values over seeds."""
    table: dict[str, dict] = {}
    for row in cfg.rows:
        recs = [r for r in runs if r["row"] == row]
        if not recs:
            continue
        cols = {f"{s}/{m}": [r["final_eval"][s][m] for r in recs] for s in ("held_out", "harder") for m in METRICS}
        cols["held_out_pair_cka"] = [r["held_out_pair_cka"] for r in recs]
        table[row] = {k: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                          "min": min(v), "max": max(v), "values": v} for k, v in cols.items() if v}
    return {"config": cfg.to_dict(), "start": start, "table": table, "runs": runs}


def results_markdown(res: dict) -> str:
    """``results.md``: the table (mean +- sd over seeds [min, max]) and the models before training."""
    cfg, start = res["config"], res["start"]
    head = ("| row | seeds | held-out accuracy | harder accuracy | held-out logit diff | harder logit diff "
            "| held-out pair CKA |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for row, cols in res["table"].items():
        def cell(k, cols=cols):
            c = cols.get(k)
            return "-" if c is None else f"{c['mean']:.3f} +- {c['sd']:.3f} [{c['min']:.3f}, {c['max']:.3f}]"
        n = len(cols.get("held_out/accuracy", {}).get("values", []))
        lines.append(f"| {row} | {n} | {cell('held_out/accuracy')} | {cell('harder/accuracy')} | "
                     f"{cell('held_out/logit_diff')} | {cell('harder/logit_diff')} | {cell('held_out_pair_cka')} |")
    before = "\n".join(f"| {side} (before) | {start[side]['held_out']['accuracy']:.3f} | "
                       f"{start[side]['harder']['accuracy']:.3f} | {start[side]['held_out']['logit_diff']:.3f} | "
                       f"{start[side]['harder']['logit_diff']:.3f} |" for side in ("teacher", "student"))
    return (f"# {cfg['teacher']} -> {cfg['student']}, {cfg['task']} {cfg['task_options']} "
            f"(harder: {cfg['harder_options']})\n\n{cfg['steps']} steps, batch {cfg['batch_size']}, lr {cfg['lr']}, "
            f"alignment at `{cfg['positions']}`, trainable {cfg['trainable']}, {cfg['n_train']} training prompts, "
            f"{cfg['n_eval']} per held-out set. Mean +- sample sd over seeds [min, max].\n\n{head}"
            + "\n".join(lines) + "\n\n| model | held-out accuracy | harder accuracy | held-out logit diff "
            "| harder logit diff |\n|---|---|---|---|---|\n" + before + "\n\n" + map_line(res) + "\n")


def map_line(res: dict) -> str:
    """One line on the component map: pairs, distinct teacher heads, degenerate or not (``ComponentMap.quality``)."""
    q = res.get("map_quality") or {}
    if not q:
        return ""
    flag = " **degenerate**: every student head maps to the same teacher head" if q.get("degenerate") else ""
    return (f"Map ({res['config']['matching']}): {q.get('n_pairs')} student heads onto {q.get('n_teacher_distinct')} "
            f"distinct teacher heads (at most {q.get('max_teacher_reuse')} on one){flag}. "
            f"{'All' if res.get('complete') else 'Not all'} runs finished.")


def run_xtok(cfg: XtokConfig, out, *, log=print, max_runs: int | None = None) -> dict:
    """The whole protocol (module docstring) into ``out``; a rerun continues where the last one stopped.
    ``max_runs``: return after training that many runs (the finished ones so far are tabulated), so a shared
    machine can take the protocol in short slices; None = all of them."""
    import torch

    from ..model import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(cfg.to_dict())):
        raise ConfigError(f"{out} holds a protocol run with other settings ({saved}); use another --out")
    atomic_write_json(saved, cfg.to_dict(), indent=1)
    teacher, student = (load_model(name, check=False, device=device()) for name in (cfg.teacher, cfg.student))
    sets = make_sets(cfg, teacher.tokenizer, student.tokenizer)
    cmap = discovery_step(cfg, out, teacher, student, sets, log)
    held = sets["held_out"][0].subset(slice(0, cfg.n_cka))
    caches = {"train": cache_step(out / "teacher_cache", teacher, sets["train"][0], cfg.positions,
                                  cfg.eval_batch_size),
              "eval": cache_step(out / "eval_cache", teacher, held, cfg.positions, cfg.eval_batch_size)}
    start = start_step(cfg, out, teacher, student, sets)
    del teacher, student  # every run loads a fresh student; the teacher lives on in the caches
    runs, trained = [], 0
    for seed in cfg.seeds:
        for row in cfg.rows:
            done = (out / "runs" / f"{row}.s{seed}" / "result.json").is_file()
            if done or max_runs is None or trained < max_runs:
                runs.append(run_one(cfg, out, row, seed, cfg.student, sets, cmap, caches, log))
                trained += not done
    res = summary(cfg, start, runs)
    res["complete"] = len(runs) == len(cfg.rows) * len(cfg.seeds)
    res["map_quality"] = json.loads((out / "map.json").read_text()).get("quality", {})
    atomic_write_json(out / "results.json", res, indent=1)
    atomic_write_text(out / "results.md", results_markdown(res))
    return res
