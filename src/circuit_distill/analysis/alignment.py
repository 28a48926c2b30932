"""Influence, component similarity, matching and the influence-weighted alignment score
(Distilled Circuits, METHOD.md section 2).

- **Influence** of component ``c``: ``I(c) = |100 * (1 - LD_ablated(c) / LD_clean)|`` from a
  single-component ablation sweep.
- **Similarity** of a teacher and a student component of the same kind, on the *same token
  sequences* (teacher and student must tokenise the prompts identically):
  heads by the mean over query rows of the row-wise cosine of batch-mean attention patterns;
  MLPs by the mean squared cosine of the principal angles between the top-``k`` (k=3) principal
  subspaces of their outputs; or (``similarity="cka"``) linear CKA of the outputs.
- **Matching** (``matching.match_components``): every student component to its most similar teacher
  component of the same kind (``student_to_teacher``) or the reverse; many-to-one allowed, ties go to
  the first in forward order.
- **Alignment score**: normalise each influence column over the N pairs (divide by its sum), then
  ``A = (1/N) sum_i S_i (1 - |I~_S,i - I~_T,i|)``, in [0, 1].

[ours] MLP subspaces are taken in *sample space* by default (the top-k left singular vectors of
the centred ``[rows, d_model]`` output matrix over real tokens), which compares models of different widths; the
paper's feature-space variant (top-k right singular vectors, needs equal ``d_model``) is
``mlp_space="features"``. Attention patterns are averaged per real-token index (padding never
enters a mean, left and right padding agree).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..errors import CircuitDistillError, ConfigError, TaskError
from ..matching import Pair, SimilarityTable
from ..model.activations import read_activations
from ..model.attention import attention_patterns
from ..model.components import Component
from ..similarity import linear_cka, principal_subspace, rowwise_cosine, subspace_similarity
from ..tasks.base import Batch, TaskData

SIMILARITIES = ("attention", "cka")
NAMED_HINT = ("For models with different tokenizers pass student_data= (the same prompts tokenised by the student: "
              "analysis.named_task_pair) to compare them at the task's named positions; the compare command does this")


# ---- influence -----------------------------------------------------------------------------------

def influence(sweep, metric: str = "logit_diff") -> dict[Component, float]:
    """``I(c) = |100 * (1 - m_ablated(c) / m_clean)|`` per component of a ``SweepResult``.

    ``metric`` is usually ``logit_diff`` (the paper's LD). Raises ``CircuitDistillError`` when the
    clean metric is zero or not finite (the ratio is undefined); a negative clean LD is allowed
    but makes the numbers hard to read (``Comparison.warnings`` says so).
    """
    if metric not in sweep.clean:
        raise CircuitDistillError(f"metric {metric!r} not in the sweep; it has {', '.join(sweep.clean)}")
    clean = float(sweep.clean[metric])
    if not math.isfinite(clean) or abs(clean) < 1e-12:
        raise CircuitDistillError(
            f"clean {metric} is {clean}: influence = |100 (1 - ablated/clean)| is undefined. "
            "Use a task the model solves (clean logit difference > 0), or metric='answer_prob'"
        )
    return {c: abs(100.0 * (1.0 - float(v[metric]) / clean)) for c, v in sweep.ablated.items()}


# ---- shared token sequences ------------------------------------------------------------------

def check_same_tokens(teacher, student, task_data: TaskData, max_prompts: int = 64) -> None:
    """Raise ``ConfigError`` unless teacher and student tokenise ``task_data`` identically.

    Both models are run on the same ``input_ids``; that is only meaningful if each model's own
    tokenizer produces those ids (checked on up to ``max_prompts`` prompts) and maps the answer
    ids to the same tokens, and if every id fits both embedding tables.
    """
    tt, ts = teacher.tokenizer, student.tokenizer
    prompts = list(task_data.prompts[:max_prompts])
    if prompts:
        a = tt(prompts, add_special_tokens=True)["input_ids"]
        b = ts(prompts, add_special_tokens=True)["input_ids"]
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                raise ConfigError(
                    f"teacher and student tokenise prompt {i} ({prompts[i]!r}) differently "
                    f"({tt.convert_ids_to_tokens(x)[:12]} vs {ts.convert_ids_to_tokens(y)[:12]}): "
                    f"token-by-token comparison needs the same token sequences. {NAMED_HINT}"
                )
    elif tt.get_vocab() != ts.get_vocab():
        raise ConfigError("teacher and student tokenizers have different vocabularies (and the task has no "
                          f"prompt text to compare). {NAMED_HINT}")
    ids = torch.cat([task_data.answer_ids, task_data.wrong_ids[task_data.wrong_ids >= 0]]).unique().tolist()
    if tt.convert_ids_to_tokens(ids) != ts.convert_ids_to_tokens(ids):
        raise ConfigError(f"teacher and student map the answer token ids to different tokens. {NAMED_HINT}")
    top = int(task_data.clean.input_ids.max())
    for name, m in (("teacher", teacher), ("student", student)):
        vocab = m.hf.get_input_embeddings().weight.shape[0]
        if top >= vocab:
            raise ConfigError(f"the {name} has {vocab} input embeddings but the task uses token id {top}")


# ---- similarity tables ---------------------------------------------------------------------

def _outputs(model, batch: Batch, components: Sequence[Component], batch_size: int) -> dict[Component, torch.Tensor]:
    """``comp -> [rows, d]``: the components' outputs at the real tokens of ``batch`` (float32, cpu)."""
    return read_activations(model, batch.input_ids, batch.attention_mask, components, batch_size=batch_size,
                            real_tokens=True)


def _even_rows(m: int, max_rows: int) -> torch.Tensor:
    """At most ``max_rows`` evenly spaced row indices of ``m`` rows: ``[rows]``."""
    return torch.linspace(0, m - 1, min(m, max_rows)).round().long().unique()


def _pairwise(rows: Sequence[Component], cols: Sequence[Component], sim) -> torch.Tensor:
    """``[len(rows), len(cols)]`` float64 table of ``sim(row, col)``."""
    vals = torch.zeros(len(rows), len(cols), dtype=torch.float64)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            vals[i, j] = sim(r, c)
    return vals


def _pattern_table(teacher, student, batch: Batch, sc: list[Component], tc: list[Component],
                   batch_size: int) -> torch.Tensor:
    """Heads by the row-wise cosine of their batch-mean attention patterns: ``[len(sc), len(tc)]``."""
    tp = attention_patterns(teacher, batch.input_ids, batch.attention_mask, batch_size=batch_size)
    sp = attention_patterns(student, batch.input_ids, batch.attention_mask, batch_size=batch_size)
    return _pairwise(sc, tc, lambda s, t: rowwise_cosine(sp[s.layer][s.head], tp[t.layer][t.head]))


def _subspace_table(s_out: dict, t_out: dict, sc: list[Component], tc: list[Component], rows: torch.Tensor,
                    k: int, space: str) -> torch.Tensor:
    """MLPs by the similarity of the top-``k`` principal subspaces of their outputs: ``[len(sc), len(tc)]``."""
    tsub = {t: principal_subspace(t_out[t][rows], k, space) for t in tc}
    ssub = {s: principal_subspace(s_out[s][rows], k, space) for s in sc}
    return _pairwise(sc, tc, lambda s, t: subspace_similarity(ssub[s], tsub[t]))


def similarity_table(teacher, student, task_data: TaskData, *, similarity: str = "attention",
                     kinds: Sequence[str] = ("head", "mlp"), k: int = 3, mlp_space: str = "samples",
                     max_rows: int = 4096, batch_size: int = 64) -> SimilarityTable:
    """Pairwise same-kind similarities of all student and teacher components on ``task_data.clean``.

    ``similarity="attention"``: heads by row-wise cosine of batch-mean attention patterns, MLPs by
    top-``k`` principal subspace similarity of their outputs; ``"cka"``: linear CKA of head and MLP
    outputs over the real tokens (at most ``max_rows`` of them, evenly spaced).
    """
    if similarity not in SIMILARITIES:
        raise ConfigError(f"unknown similarity {similarity!r}; use one of {', '.join(SIMILARITIES)}")
    bad = [kd for kd in kinds if kd not in ("head", "mlp")]
    if bad:
        raise ConfigError(f"can only compare heads and MLPs, got kind(s) {', '.join(bad)}")
    check_same_tokens(teacher, student, task_data)
    batch = task_data.clean
    tc = {kd: teacher.components(kd) for kd in kinds}
    sc = {kd: student.components(kd) for kd in kinds}
    values: dict[str, torch.Tensor] = {}
    need_outputs = [kd for kd in kinds if similarity == "cka" or kd == "mlp"]
    if need_outputs:
        t_out = _outputs(teacher, batch, [c for kd in need_outputs for c in tc[kd]], batch_size)
        s_out = _outputs(student, batch, [c for kd in need_outputs for c in sc[kd]], batch_size)
        rows = _even_rows(next(iter(t_out.values())).shape[0], max_rows)
    for kd in kinds:
        if kd == "head" and similarity == "attention":
            values[kd] = _pattern_table(teacher, student, batch, sc[kd], tc[kd], batch_size)
        elif similarity == "cka":
            values[kd] = _pairwise(sc[kd], tc[kd], lambda s, t: float(linear_cka(s_out[s][rows], t_out[t][rows])))
        else:  # MLP subspaces
            if mlp_space == "features" and teacher.arch.d_model != student.arch.d_model:
                raise ConfigError(f"mlp_space='features' needs equal widths (teacher d_model "
                                  f"{teacher.arch.d_model}, student {student.arch.d_model}); use 'samples'")
            values[kd] = _subspace_table(s_out, t_out, sc[kd], tc[kd], rows, k, mlp_space)
    return SimilarityTable(similarity, tc, sc, values)


# ---- alignment score -----------------------------------------------------------------------


def _normalise(x: torch.Tensor) -> torch.Tensor:
    total = x.sum()
    return x / total if total > 0 else torch.full_like(x, 1.0 / len(x))


def alignment_score(similarity: Sequence[float], influence_student: Sequence[float],
                    influence_teacher: Sequence[float]) -> tuple[float, list[float], list[float]]:
    """``A = (1/N) sum_i S_i (1 - |I~_S,i - I~_T,i|)`` over ``N`` pairs.

    Each influence column is divided by its sum over the pairs (duplicates count each time they
    appear); a column of zeros becomes uniform ``1/N``. Returns ``(A, I~_S, I~_T)``. Similarities
    must be in [0, 1] (clipped from [-1e-6, 1 + 1e-6]) and influences >= 0.
    """
    s = torch.as_tensor(list(similarity), dtype=torch.float64)
    i_s = torch.as_tensor(list(influence_student), dtype=torch.float64)
    i_t = torch.as_tensor(list(influence_teacher), dtype=torch.float64)
    if not (len(s) == len(i_s) == len(i_t)):
        raise ConfigError(f"alignment_score: {len(s)} similarities, {len(i_s)} student and {len(i_t)} teacher "
                          "influences; pass one of each per pair")
    if len(s) == 0:
        raise ConfigError("alignment_score needs at least one matched pair")
    if (s < -1e-6).any() or (s > 1 + 1e-6).any() or not torch.isfinite(s).all():
        raise ConfigError(f"similarities must lie in [0, 1]; got min {float(s.min()):.3g}, max {float(s.max()):.3g}")
    if (i_s < 0).any() or (i_t < 0).any() or not (torch.isfinite(i_s).all() and torch.isfinite(i_t).all()):
        raise ConfigError("influences must be finite and >= 0")
    s = s.clamp(0, 1)
    n_s, n_t = _normalise(i_s), _normalise(i_t)
    a = float((s * (1 - (n_s - n_t).abs())).mean())
    return a, n_s.tolist(), n_t.tolist()


def align(matches: Iterable[tuple[Component, Component, float]], influence_student: Mapping[Component, float],
          influence_teacher: Mapping[Component, float]) -> tuple[float, list[Pair]]:
    """The alignment score and pair table of ``matches`` (``(student, teacher, S)`` triples)."""
    matches = list(matches)
    missing = [str(s) for s, _, _ in matches if s not in influence_student]
    missing += [str(t) for _, t, _ in matches if t not in influence_teacher]
    if missing:
        raise ConfigError(f"no influence for {', '.join(sorted(set(missing))[:8])}: sweep every matched component")
    sims = [sim for _, _, sim in matches]
    i_s = [influence_student[s] for s, _, _ in matches]
    i_t = [influence_teacher[t] for _, t, _ in matches]
    a, n_s, n_t = alignment_score(sims, i_s, i_t)
    pairs = [Pair(s, t, float(min(max(sim, 0.0), 1.0)), a_s, a_t, b_s, b_t,
                  float(min(max(sim, 0.0), 1.0)) * (1 - abs(b_s - b_t)))
             for (s, t, sim), a_s, a_t, b_s, b_t in zip(matches, i_s, i_t, n_s, n_t)]
    return a, pairs


# ---- layer-by-layer CKA ----------------------------------------------------------------------

def layer_cka(teacher, student, batch: Batch, *, max_rows: int = 4096, batch_size: int = 64) -> torch.Tensor:
    """Linear CKA of every teacher layer's residual output with every student layer's:
    ``[teacher n_layers, student n_layers]`` over the real tokens of ``batch`` (at most ``max_rows``)."""
    tcomps = teacher.components("resid_post")
    scomps = student.components("resid_post")
    t_out = _outputs(teacher, batch, tcomps, batch_size)
    s_out = _outputs(student, batch, scomps, batch_size)
    m = t_out[tcomps[0]].shape[0]
    if s_out[scomps[0]].shape[0] != m:
        raise TaskError("teacher and student saw different numbers of tokens; use the same prompts")
    rows = _even_rows(m, max_rows)
    return _pairwise(tcomps, scomps, lambda t, s: float(linear_cka(t_out[t][rows], s_out[s][rows])))
