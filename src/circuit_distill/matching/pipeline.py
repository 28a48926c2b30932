"""Discover both models' circuits and match them, sweeping each model once.

``discover`` runs one single-component mean-ablation sweep of a model (heads, and MLPs when asked:
``compare`` reuses the same sweep), picks its circuit from that sweep and keeps the heads' effects;
``discover_and_match`` does it for a teacher and a student and builds every matcher's map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..discovery import Circuit, SweepResult, find_circuit, sweep_components
from ..errors import ConfigError
from ..model.activations import read_activations
from ..model.components import Component
from ..tasks.base import TaskData
from ..tasks.positions import check_same_prompts, position_matrix, prompt_rows, same_tokens
from .map import ComponentMap
from .matchers import match

CIRCUIT_CHOICES = ("top_k", "pruned")
MATCHERS = ("ablation", "hungarian", "ablation_norm", "cka")


@dataclass
class Discovery:
    """One model's discovery: its sweep, its circuit, and each head's effect on ``effect_metric``."""

    sweep: SweepResult
    circuit: Circuit
    effects: dict[Component, float]


@dataclass
class MatchedCircuits:
    """Both models' discoveries and the component map of every matcher asked for."""

    teacher: Discovery
    student: Discovery
    maps: dict[str, ComponentMap]


def discover(model, td: TaskData, *, circuit: str = "top_k", top_k: int = 4, threshold: float = 0.2,
             metric: str = "logit_diff", effect_metric: str = "answer_prob",
             kinds: Sequence[str] = ("head",), progress: bool | None = False) -> Discovery:
    """Sweep every component of ``kinds`` once, then the circuit (the ``top_k`` heads by effect on
    ``metric``, or pruning at ``threshold`` when ``circuit="pruned"``) from that same sweep."""
    comps = [c for kind in kinds for c in model.components(kind)]
    sweep = sweep_components(model, td, comps, progress=progress)
    circ = find_circuit(model, td, method="ablation", top_k=top_k if circuit == "top_k" else None,
                        threshold=threshold, metric=metric, sweep=sweep, progress=progress)
    effects = {c: v for c, v in sweep.effect(effect_metric).items() if c.kind == "head"}
    return Discovery(sweep, circ, effects)


def check_shared_tokenizer(teacher, student, td: TaskData, max_prompts: int = 16) -> None:
    """``ConfigError`` unless ``student``'s tokenizer gives ``td``'s token ids as ``teacher``'s does (checked on
    up to ``max_prompts`` prompt texts; task data without texts pass)."""
    prompts = list(td.prompts[:max_prompts])
    if not prompts:
        return
    a = teacher.tokenizer(prompts, add_special_tokens=True)["input_ids"]
    b = student.tokenizer(prompts, add_special_tokens=True)["input_ids"]
    if a != b:
        raise ConfigError("teacher and student tokenise the task's prompts differently: circuit matching runs both "
                          "models on the same token ids, so it needs one shared tokenizer (circuit-distill compare "
                          "compares models across tokenizers at the task's named positions)")


def head_rows(model, td: TaskData, heads: Sequence[Component], n: int = 128, names: Sequence[str] | None = None):
    """Each head's output at every real token of the first ``n`` prompts: ``head -> [rows, d_head]``; with
    ``names`` (task positions), at those named positions only, concatenated: ``head -> [n, k * d_head]``."""
    b = td.clean
    if names is None:
        return read_activations(model, b.input_ids[:n], b.attention_mask[:n], heads, batch_size=None,
                                real_tokens=True, to_cpu=False)
    acts = read_activations(model, b.input_ids[:n], b.attention_mask[:n], heads, batch_size=None, to_cpu=False)
    pos = position_matrix(td, names)[:n].to(next(iter(acts.values())).device)
    return {c: prompt_rows(a, b.attention_mask[:n], pos) for c, a in acts.items()}


def discover_and_match(teacher, student, td: TaskData, *, matchers: Sequence[str] = MATCHERS, seed: int = 0,
                       log=None, student_data: TaskData | None = None, **discover_kw) -> MatchedCircuits:
    """Both circuits (see ``discover``; each model swept once) and the map of every one of ``matchers``:
    ``ablation`` (the paper's rule), ``hungarian``, ``ablation_norm`` (the paper's rule on per-model
    normalised effects), ``cka`` (by activation similarity on ``td``), ``random`` (seeded). Both models run
    ``td``'s token ids, so they must share a tokenizer (``ConfigError`` otherwise), unless ``student_data``
    holds the student's own tokenization of the same prompts: then each model is swept on its own tokens
    (ablation effects are per model) and ``cka`` compares the heads at every position both name, one row per
    prompt (the positions concatenated)."""
    if student_data is None:
        check_shared_tokenizer(teacher, student, td)
        student_data, names = td, None
    else:
        check_same_prompts(td, student_data)
        names = None if same_tokens(td, student_data) else sorted(set(td.positions) & set(student_data.positions))
    t = discover(teacher, td, **discover_kw)
    s = discover(student, student_data, **discover_kw)
    tc, sc = t.circuit.components, s.circuit.components
    maps = {}
    for name in matchers:
        kw = {"method": "ablation", "normalize": True} if name == "ablation_norm" else {"method": name}
        if name == "cka":
            kw.update(teacher_acts=head_rows(teacher, td, tc, names=names),
                      student_acts=head_rows(student, student_data, sc, names=names))
        maps[name] = match(t.effects, s.effects, tc, sc, seed=seed, **kw)
    if log is not None:
        for side, d in (("teacher", t), ("student", s)):
            log(f"  {side}: circuit {', '.join(map(str, d.circuit.components))} (faithfulness "
                f"{d.circuit.faithfulness:.2f}; sweep {d.sweep.seconds:.1f}s)")
        for name, cm in maps.items():
            log(f"  map {name}: " + ", ".join(f"{a}->{b}" for a, b in cm.pairs))
    return MatchedCircuits(t, s, maps)
