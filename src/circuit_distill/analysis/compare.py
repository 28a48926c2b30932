"""``compare(teacher, student, task_data)``: influence, matching, alignment score and robustness of a
teacher/student pair on one task, as one JSON-serialisable ``Comparison``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..discovery import SweepResult, sweep_components
from ..errors import ConfigError
from ..files import atomic_write_text
from ..matching import DIRECTIONS, Pair, match_components
from ..model.components import Component
from ..tasks.base import TaskData
from .alignment import SIMILARITIES, align, influence, layer_cka, similarity_table
from .named import SIMILARITIES as NAMED_SIMILARITIES
from .named import check_same_prompts, named_layer_cka, named_similarity_table, shared_positions
from .robustness import Robustness, brittleness_slope, compression, drops, robustness


@dataclass
class Comparison:
    """The result of ``compare``.

    ``teacher_sweep`` / ``student_sweep``: the single-component ablation sweeps (``SweepResult``);
    ``*_influence`` and ``*_drop``: per component, from ``metric``; ``pairs``: the matched pair table;
    ``alignment``: the score A; ``*_robustness``: drop summaries; ``compression`` C and the
    brittleness slopes of mean drop and severity; ``layer_cka``: ``[teacher layers, student layers]``
    linear CKA of residual outputs; ``*_shape``: ``(n_layers, n_heads)`` of each model.
    ``positions``: the named positions the models were compared at when their tokenizers differ
    (``analysis.named``; empty: token by token, one shared tokenizer); ``controls``: control pairs
    (``analysis.controls``), each a summary with its alignment score.
    """

    teacher_name: str
    student_name: str
    task: str
    n_examples: int
    metric: str
    ablation: str
    similarity: str
    direction: str
    kinds: tuple[str, ...]
    teacher_shape: tuple[int, int]
    student_shape: tuple[int, int]
    teacher_params: int
    student_params: int
    teacher_sweep: object
    student_sweep: object
    teacher_influence: dict[Component, float]
    student_influence: dict[Component, float]
    teacher_drop: dict[Component, float]
    student_drop: dict[Component, float]
    pairs: list[Pair]
    alignment: float
    alignment_by_kind: dict[str, float]
    teacher_robustness: Robustness
    student_robustness: Robustness
    compression: float
    brittleness: dict[str, float]
    layer_cka: list[list[float]]
    position: str = "last"
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)
    controls: dict = field(default_factory=dict)

    @property
    def mean_similarity(self) -> float:
        """Mean similarity S over the matched pairs."""
        return sum(p.similarity for p in self.pairs) / len(self.pairs) if self.pairs else float("nan")

    def to_dict(self) -> dict:
        def comp_map(d):
            return {str(c): float(v) for c, v in sorted(d.items())}

        return {
            "teacher": self.teacher_name, "student": self.student_name, "task": self.task,
            "n_examples": self.n_examples, "metric": self.metric, "ablation": self.ablation,
            "similarity": self.similarity, "direction": self.direction, "kinds": list(self.kinds),
            "position": self.position,
            "teacher_shape": list(self.teacher_shape), "student_shape": list(self.student_shape),
            "teacher_params": self.teacher_params, "student_params": self.student_params,
            "alignment": self.alignment, "alignment_by_kind": dict(self.alignment_by_kind),
            "n_pairs": len(self.pairs), "pairs": [p.to_dict() for p in self.pairs],
            "teacher_influence": comp_map(self.teacher_influence),
            "student_influence": comp_map(self.student_influence),
            "teacher_drop": comp_map(self.teacher_drop), "student_drop": comp_map(self.student_drop),
            "teacher_robustness": self.teacher_robustness.to_dict(),
            "student_robustness": self.student_robustness.to_dict(),
            "compression": self.compression, "brittleness": dict(self.brittleness),
            "layer_cka": self.layer_cka,
            "teacher_sweep": self.teacher_sweep.to_dict(), "student_sweep": self.student_sweep.to_dict(),
            "seconds": self.seconds, "warnings": list(self.warnings),
            "named_positions": list(self.positions), "mean_similarity": self.mean_similarity,
            "controls": dict(self.controls),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Comparison:
        """Rebuild a ``Comparison`` from ``to_dict()`` output (e.g. a loaded comparison.json)."""
        def comp_map(m):
            return {Component.parse(k): float("nan") if v is None else float(v) for k, v in m.items()}

        def num(v):
            return float("nan") if v is None else float(v)

        pairs = [Pair(Component.parse(p["student"]), Component.parse(p["teacher"]), num(p["similarity"]),
                      num(p["influence_student"]), num(p["influence_teacher"]), num(p["norm_student"]),
                      num(p["norm_teacher"]), num(p["contribution"])) for p in d["pairs"]]
        fields_ = Robustness.__dataclass_fields__
        rob = {k: Robustness(**{f: (num(v) if isinstance(v, float) or v is None else v)
                                for f, v in d[k].items() if f in fields_})
               for k in ("teacher_robustness", "student_robustness")}
        return cls(
            teacher_name=d["teacher"], student_name=d["student"], task=d["task"], n_examples=int(d["n_examples"]),
            metric=d["metric"], ablation=d["ablation"], similarity=d["similarity"], direction=d["direction"],
            kinds=tuple(d["kinds"]), teacher_shape=tuple(d["teacher_shape"]), student_shape=tuple(d["student_shape"]),
            teacher_params=int(d["teacher_params"]), student_params=int(d["student_params"]),
            teacher_sweep=SweepResult.from_dict(_nan_back(d["teacher_sweep"])),
            student_sweep=SweepResult.from_dict(_nan_back(d["student_sweep"])),
            teacher_influence=comp_map(d["teacher_influence"]), student_influence=comp_map(d["student_influence"]),
            teacher_drop=comp_map(d["teacher_drop"]), student_drop=comp_map(d["student_drop"]), pairs=pairs,
            alignment=num(d["alignment"]), alignment_by_kind={k: num(v) for k, v in d["alignment_by_kind"].items()},
            teacher_robustness=rob["teacher_robustness"], student_robustness=rob["student_robustness"],
            compression=num(d["compression"]), brittleness={k: num(v) for k, v in d["brittleness"].items()},
            layer_cka=[[num(v) for v in row] for row in d["layer_cka"]], position=d.get("position", "last"),
            seconds=num(d.get("seconds", 0.0)), warnings=list(d.get("warnings", [])),
            positions=list(d.get("named_positions", [])), controls=_nan_back(dict(d.get("controls", {}))),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> Comparison:
        """Load a comparison.json written by ``to_json``."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """The comparison as JSON (NaN written as null); also written to ``path`` if given."""
        text = json.dumps(_no_nan(self.to_dict()), indent=indent)
        if path is not None:
            atomic_write_text(path, text)
        return text


def _nan_back(x):
    if x is None:
        return float("nan")
    if isinstance(x, dict):
        return {k: _nan_back(v) for k, v in x.items()}
    return x


def _no_nan(x):
    if isinstance(x, float):
        return None if not math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def _check_options(task_data: TaskData, similarity: str, direction: str, kinds: Sequence[str], metric: str,
                   position: str) -> tuple[str, ...]:
    """Raise ``ConfigError`` on an option ``compare`` cannot use; the kinds as a tuple."""
    if similarity not in (*SIMILARITIES, *NAMED_SIMILARITIES):
        raise ConfigError(f"unknown similarity {similarity!r}; use one of {', '.join(NAMED_SIMILARITIES)}")
    if direction not in DIRECTIONS:
        raise ConfigError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    kinds = tuple(kinds)
    if not kinds or any(kd not in ("head", "mlp") for kd in kinds):
        raise ConfigError(f"kinds must be a non-empty subset of ('head', 'mlp'), got {kinds}")
    task_data.position(position)
    if metric == "logit_diff" and bool((task_data.wrong_ids < 0).all()):
        raise ConfigError("metric 'logit_diff' needs wrong answers (Example.wrong_answer); the task has none. "
                          "Use metric='answer_prob'")
    return kinds


def _check_sweep(name: str, sw: SweepResult, comps: list[Component], task_data: TaskData, *, metric: str,
                 ablation: str, position: str) -> None:
    """Raise ``ConfigError`` unless ``sw`` is a sweep ``compare`` could have run itself (see ``compare``)."""
    missing = [str(c) for c in comps if c not in sw.ablated]
    if missing:
        raise ConfigError(f"the {name} sweep lacks {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}: "
                          "sweep every compared component")
    if metric not in sw.clean:
        raise ConfigError(f"the {name} sweep has no metric {metric!r}")
    made = {"method": sw.method, "position": sw.position, "per_position": sw.per_position}
    want = {"method": ablation, "position": position, "per_position": True}
    if sw.n_examples:  # 0: not recorded (a hand-made sweep)
        made["n_examples"], want["n_examples"] = sw.n_examples, len(task_data)
    if made != want:
        raise ConfigError(f"the {name} sweep was made with {made}, compare needs {want}: pass a sweep of the "
                          f"same task data with ablation_sweep(..., method={ablation!r}, position={position!r}), "
                          "or none")


def _brittleness(s_rob: Robustness, t_rob: Robustness, c: float) -> dict[str, float]:
    return {
        "mean_drop": brittleness_slope(s_rob.mean_drop, t_rob.mean_drop, c),
        "mean_drop_per_0.1C": brittleness_slope(s_rob.mean_drop, t_rob.mean_drop, c) / 10,
        "severity": brittleness_slope(s_rob.severity, t_rob.severity, c),
    }


def _similarities(teacher, student, task_data: TaskData, student_data: TaskData | None, *, similarity: str,
                  kinds: tuple[str, ...], k: int, mlp_space: str, batch_size: int,
                  positions: Sequence[str] | None) -> tuple[object, torch.Tensor, list[str]]:
    """The similarity table, the layer-by-layer CKA and the named positions used (none: token by token)."""
    if student_data is None:
        if similarity not in SIMILARITIES:
            raise ConfigError(f"similarity {similarity!r} is defined at the task's named positions only: pass "
                              "student_data= (the same prompts as the student tokenises them, e.g. from "
                              f"analysis.named_task_pair), or use one of {', '.join(SIMILARITIES)}")
        table = similarity_table(teacher, student, task_data, similarity=similarity, kinds=kinds, k=k,
                                 mlp_space=mlp_space, batch_size=batch_size)
        return table, layer_cka(teacher, student, task_data.clean, batch_size=batch_size), []
    check_same_prompts(task_data, student_data)
    names = list(shared_positions(task_data, student_data, positions))
    table = named_similarity_table(teacher, student, task_data, student_data, similarity=similarity, kinds=kinds,
                                   k=k, names=names, batch_size=batch_size)
    lc = named_layer_cka(teacher, student, task_data, student_data, names=names, batch_size=batch_size)
    return table, lc, names


def compare(teacher, student, task_data: TaskData, *, ablation: str = "mean", similarity: str = "attention",
            direction: str = "student_to_teacher", kinds: Sequence[str] = ("head", "mlp"),
            metric: str = "logit_diff", position: str = "last", mlp_space: str = "samples", k: int = 3,
            batch_size: int = 64, n_boot: int = 10_000, seed: int = 42, progress: bool | None = None,
            teacher_sweep: SweepResult | None = None, student_sweep: SweepResult | None = None,
            student_data: TaskData | None = None, positions: Sequence[str] | None = None) -> Comparison:
    """Compare how ``teacher`` and ``student`` (any depth and width) solve a task.

    Runs a single-component ``ablation`` sweep (``mean``, ``zero``, ``resample``) of every head and
    MLP (``kinds``) in each model, scoring ``metric`` at named ``position`` (``"mask"`` for masked-LM
    tasks built with ``Example(..., positions={"mask": idx})``); turns it into influences and drops;
    matches components by ``similarity`` (``attention`` patterns + MLP subspaces, or ``cka``) in
    ``direction`` (``matching.match_components``); and returns the alignment score, the pair table and
    both models' robustness.

    One shared tokenizer (``student_data=None``): both models run ``task_data`` and are compared token
    by token (``ConfigError`` if they tokenise it differently). Different tokenizers: pass
    ``student_data``, the same prompts tokenised by the student (``analysis.named_task_pair``); the
    student is swept on it, and components are compared at the named ``positions`` (default: every
    position both task data name), one row per prompt (``analysis.named``).

    ``teacher_sweep`` / ``student_sweep``: a caller that already swept a model passes its
    ``SweepResult`` (e.g. one teacher sweep for several students, or both sweeps for another
    direction). A passed sweep must be what ``compare`` would run itself:
    ``ablation_sweep(model, data, components, method=ablation, position=position,
    batch_size=batch_size)`` on that model's task data (clean prompts and reference set), with the
    defaults ``per_position=True``, ``seed=0`` and ``metrics`` (any set holding ``metric``), over at
    least every head and MLP of ``kinds`` (more components are ignored), ``fast=True`` unless the model
    cannot replay layers (encoders, post-processing heads: then ``fast=False``). Such a sweep gives
    results identical to passing none. Method, position, per-position values and the number of
    examples are checked (``ConfigError``); the prompts and batch size are the caller's to keep.
    """
    t0 = time.perf_counter()
    s_data = task_data if student_data is None else student_data
    kinds = _check_options(task_data, similarity, direction, kinds, metric, position)
    _check_options(s_data, similarity, direction, kinds, metric, position)
    warnings: list[str] = []
    table, lc, names = _similarities(teacher, student, task_data, student_data, similarity=similarity, kinds=kinds,
                                     k=k, mlp_space=mlp_space, batch_size=batch_size, positions=positions)
    t_comps = [c for kd in kinds for c in teacher.components(kd)]
    s_comps = [c for kd in kinds for c in student.components(kd)]
    kw = dict(method=ablation, position=position, batch_size=batch_size, progress=progress)
    t_sweep = teacher_sweep if teacher_sweep is not None else sweep_components(teacher, task_data, t_comps, **kw)
    s_sweep = student_sweep if student_sweep is not None else sweep_components(student, s_data, s_comps, **kw)
    for name, sw, comps, data in (("teacher", t_sweep, t_comps, task_data), ("student", s_sweep, s_comps, s_data)):
        _check_sweep(name, sw, comps, data, metric=metric, ablation=ablation, position=position)
        if sw.clean[metric] <= 0:
            warnings.append(f"the {name}'s clean {metric} is {sw.clean[metric]:.4g} <= 0: it does not solve the "
                            "task, so its influences and drops are hard to interpret")
    t_inf, s_inf = influence(t_sweep, metric), influence(s_sweep, metric)
    t_drop, s_drop = drops(t_sweep, metric), drops(s_sweep, metric)
    matches = match_components(table, direction)
    a, pairs = align(matches, s_inf, t_inf)
    by_kind = {}
    for kd in kinds:
        sub = [m for m in matches if m[0].kind == kd]
        if sub:
            by_kind[kd] = align(sub, s_inf, t_inf)[0]
    t_rob = robustness(t_drop, t_inf, n_boot=n_boot, seed=seed)
    s_rob = robustness(s_drop, s_inf, n_boot=n_boot, seed=seed)
    c = compression(teacher.n_params, student.n_params)
    if c <= 0:
        warnings.append(f"the student has at least as many parameters as the teacher (C = {c:.3g}): "
                        "brittleness slopes are not meaningful")
    return Comparison(
        teacher_name=teacher.name, student_name=student.name, task=task_data.name, n_examples=len(task_data),
        metric=metric, ablation=ablation, similarity=similarity, direction=direction, kinds=kinds,
        teacher_shape=(teacher.arch.n_layers, teacher.arch.n_heads),
        student_shape=(student.arch.n_layers, student.arch.n_heads),
        teacher_params=int(teacher.n_params), student_params=int(student.n_params),
        teacher_sweep=t_sweep, student_sweep=s_sweep, teacher_influence=t_inf, student_influence=s_inf,
        teacher_drop=t_drop, student_drop=s_drop, pairs=pairs, alignment=a, alignment_by_kind=by_kind,
        teacher_robustness=t_rob, student_robustness=s_rob, compression=c, brittleness=_brittleness(s_rob, t_rob, c),
        layer_cka=torch.as_tensor(lc).tolist(), position=position, seconds=time.perf_counter() - t0,
        warnings=warnings, positions=names,
    )
