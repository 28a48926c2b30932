"""Influence, component similarity, matching and the influence-weighted alignment score
(Distilled Circuits, METHOD.md section 2).

- **Influence** of component ``c``: ``I(c) = |100 * (1 - LD_ablated(c) / LD_clean)|`` from a
  single-component ablation sweep.
- **Similarity** of a teacher and a student component of the same kind, on the *same token
  sequences* (teacher and student must tokenise the prompts identically):
  heads by the mean over query rows of the row-wise cosine of batch-mean attention patterns;
  MLPs by the mean squared cosine of the principal angles between the top-``k`` (k=3) principal
  subspaces of their outputs; or (``similarity="cka"``) linear CKA of the outputs.
- **Matching**: every student component to its most similar teacher component of the same kind
  (``student_to_teacher``) or the reverse; many-to-one allowed, ties go to the first in forward order.
- **Alignment score**: normalise each influence column over the N pairs (divide by its sum), then
  ``A = (1/N) sum_i S_i (1 - |I~_S,i - I~_T,i|)``, in [0, 1].

[ours] MLP subspaces are taken in *sample space* by default (the top-k left singular vectors of
the centred ``[tokens, d_model]`` output matrix), which compares models of different widths; the
paper's feature-space variant (top-k right singular vectors, needs equal ``d_model``) is
``mlp_space="features"``. Attention patterns are averaged per real-token index (padding never
enters a mean, left and right padding agree).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from ..errors import CircuitDistillError, ConfigError, TaskError
from ..model.components import Component
from ..model.hooks import capture
from ..model.loading import position_ids_from_mask
from ..similarity import linear_cka
from ..tasks.base import Batch, TaskData

SIMILARITIES = ("attention", "cka")
DIRECTIONS = ("student_to_teacher", "teacher_to_student")
MLP_SPACES = ("samples", "features")


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
                    "circuit comparison needs the same token sequences; use models that share a tokenizer"
                )
    elif tt.get_vocab() != ts.get_vocab():
        raise ConfigError("teacher and student tokenizers have different vocabularies (and the task has no "
                          "prompt text to compare): use models that share a tokenizer")
    ids = torch.cat([task_data.answer_ids, task_data.wrong_ids[task_data.wrong_ids >= 0]]).unique().tolist()
    if tt.convert_ids_to_tokens(ids) != ts.convert_ids_to_tokens(ids):
        raise ConfigError("teacher and student map the answer token ids to different tokens: use models that "
                          "share a tokenizer")
    top = int(task_data.clean.input_ids.max())
    for name, m in (("teacher", teacher), ("student", student)):
        vocab = m.hf.get_input_embeddings().weight.shape[0]
        if top >= vocab:
            raise ConfigError(f"the {name} has {vocab} input embeddings but the task uses token id {top}")


# ---- activations -----------------------------------------------------------------------------

def _real_rows(act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Real (non-padding) tokens of ``act [n, seq, d]`` as ``[m, d]`` (row-major)."""
    return act[mask.to(act.device) > 0]


@torch.no_grad()
def attention_patterns(model, batch: Batch, layers: Iterable[int] | None = None, *,
                       batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Batch-mean attention patterns ``layer -> [n_heads, T, T]`` (float32, cpu).

    Indexed by real-token index (row ``i`` = the ``i``-th real query token, column ``j`` = the
    ``j``-th real key token), so padding side does not matter; query row ``i`` is averaged over the
    prompts that have an ``i``-th token. ``T`` = the longest prompt. Switches the model to eager
    attention for the call (SDPA and flash attention return no patterns) and back afterwards.
    """
    layers = list(range(model.arch.n_layers)) if layers is None else sorted(set(layers))
    T = int(batch.attention_mask.sum(1).max())
    H = model.arch.n_heads
    sums = {layer: torch.zeros(H, T, T, dtype=torch.float64) for layer in layers}
    counts = torch.zeros(T, dtype=torch.float64)
    with eager_attention(model):
        for s in range(0, len(batch), batch_size):
            b = batch.subset(slice(s, s + batch_size)).to(model.device)
            out = _forward_attn(model, b)
            mask = b.attention_mask.cpu()
            for r in range(len(b)):
                real = torch.nonzero(mask[r] > 0).flatten()
                L = len(real)
                counts[:L] += 1
                for layer in layers:
                    a = out[layer][r].float().cpu()  # [H, seq, seq]
                    sums[layer][:, :L, :L] += a[:, real][:, :, real].double()
    return {layer: (sums[layer] / counts.clamp(min=1)[None, :, None]).float() for layer in layers}


@contextmanager
def eager_attention(model):
    """Run ``model`` with eager attention inside the block (SDPA and flash attention return no
    patterns), then switch back to what it had."""
    hf = model.hf
    was = getattr(hf.config, "_attn_implementation", None)
    switched = was != "eager"
    if switched:
        if not hasattr(hf, "set_attn_implementation"):
            raise CircuitDistillError(
                f"{type(hf).__name__} runs {was!r} attention, which returns no attention patterns; load it "
                "with load_model(..., attn_implementation='eager') or use similarity='cka'")
        hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switched:
            hf.set_attn_implementation(was)


def _forward_attn(model, b: Batch) -> tuple[torch.Tensor, ...]:
    kw = {} if model.is_encoder else {"position_ids": position_ids_from_mask(b.attention_mask), "use_cache": False}
    out = model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, output_attentions=True, **kw)
    atts = getattr(out, "attentions", None)
    if not atts or any(a is None for a in atts):
        raise CircuitDistillError(f"{type(model.hf).__name__} returned no attention patterns; load it with "
                                  "attn_implementation='eager' or use similarity='cka'")
    return atts


@torch.no_grad()
def component_outputs(model, batch: Batch, components: Sequence[Component], *,
                      batch_size: int = 64) -> dict[Component, torch.Tensor]:
    """Outputs of ``components`` at the real tokens of ``batch``: ``comp -> [m, d]`` (float32, cpu),
    ``m`` = real tokens in ``batch``; heads before the output projection (``d_head``), MLPs and
    residual points ``d_model``."""
    outs: dict[Component, list[torch.Tensor]] = {c: [] for c in components}
    for s in range(0, len(batch), batch_size):
        b = batch.subset(slice(s, s + batch_size)).to(model.device)
        with capture(model, list(components), detach=True) as cap:
            model(b.input_ids, b.attention_mask, **({} if model.is_encoder else {"use_cache": False}))
            for c in components:
                outs[c].append(_real_rows(cap[c], b.attention_mask).float().cpu())
    return {c: torch.cat(v) for c, v in outs.items()}


# ---- similarity ------------------------------------------------------------------------------

def rowwise_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over query rows of cos(``a[i]``, ``b[i]``) for patterns ``[T, T]`` (rows of zeros give 0)."""
    if a.shape != b.shape:
        raise ConfigError(f"attention patterns differ in shape {tuple(a.shape)} vs {tuple(b.shape)}: "
                          "compute them on the same prompts")
    a, b = a.double(), b.double()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return float((num / den.clamp_min(eps)).mean())


def principal_subspace(x: torch.Tensor, k: int = 3, space: str = "samples") -> torch.Tensor:
    """Orthonormal top-``k`` principal directions of the column-centred ``x [m, d]``:
    ``[m, k]`` (``space="samples"``: left singular vectors) or ``[d, k]`` (``"features"``)."""
    if space not in MLP_SPACES:
        raise ConfigError(f"unknown subspace {space!r}; use one of {', '.join(MLP_SPACES)}")
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(k, int((s > s.max() * 1e-10).sum()) if s.numel() and s.max() > 0 else 0)
    return u[:, :k] if space == "samples" else vh[:k].t()


def subspace_similarity(u: torch.Tensor, v: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spaces of orthonormal
    ``u [n, k1]`` and ``v [n, k2]``: ``||u^T v||_F^2 / max(k1, k2)`` in [0, 1] (0 if either is empty)."""
    if u.shape[0] != v.shape[0]:
        raise ConfigError(f"subspaces live in spaces of different size ({u.shape[0]} vs {v.shape[0]}); with "
                          "different model widths use mlp_space='samples'")
    k = max(u.shape[1], v.shape[1])
    if k == 0 or min(u.shape[1], v.shape[1]) == 0:
        return 0.0
    return float((u.t().double() @ v.double()).pow(2).sum() / k)


@dataclass
class SimilarityTable:
    """Similarity of every student component to every teacher component of the same kind.

    ``values[kind]`` is ``[n_student_of_kind, n_teacher_of_kind]``; rows follow ``student[kind]``,
    columns ``teacher[kind]`` (forward order).
    """

    method: str
    teacher: dict[str, list[Component]]
    student: dict[str, list[Component]]
    values: dict[str, torch.Tensor]


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
        t_out = component_outputs(teacher, batch, [c for kd in need_outputs for c in tc[kd]], batch_size=batch_size)
        s_out = component_outputs(student, batch, [c for kd in need_outputs for c in sc[kd]], batch_size=batch_size)
        m = next(iter(t_out.values())).shape[0]
        rows = torch.linspace(0, m - 1, min(m, max_rows)).round().long().unique()
    for kd in kinds:
        vals = torch.zeros(len(sc[kd]), len(tc[kd]), dtype=torch.float64)
        if kd == "head" and similarity == "attention":
            tp = attention_patterns(teacher, batch, batch_size=batch_size)
            sp = attention_patterns(student, batch, batch_size=batch_size)
            for i, s in enumerate(sc[kd]):
                for j, t in enumerate(tc[kd]):
                    vals[i, j] = rowwise_cosine(sp[s.layer][s.head], tp[t.layer][t.head])
        elif similarity == "cka":
            for i, s in enumerate(sc[kd]):
                for j, t in enumerate(tc[kd]):
                    vals[i, j] = float(linear_cka(s_out[s][rows], t_out[t][rows]))
        else:  # MLP subspaces
            if mlp_space == "features" and teacher.arch.d_model != student.arch.d_model:
                raise ConfigError(f"mlp_space='features' needs equal widths (teacher d_model "
                                  f"{teacher.arch.d_model}, student {student.arch.d_model}); use 'samples'")
            tsub = {t: principal_subspace(t_out[t][rows], k, mlp_space) for t in tc[kd]}
            for i, s in enumerate(sc[kd]):
                us = principal_subspace(s_out[s][rows], k, mlp_space)
                for j, t in enumerate(tc[kd]):
                    vals[i, j] = subspace_similarity(us, tsub[t])
        values[kd] = vals
    return SimilarityTable(similarity, tc, sc, values)


# ---- matching and score ----------------------------------------------------------------------

@dataclass
class Pair:
    """One matched pair: the student and teacher components, their similarity ``S``, raw
    influences and influences normalised over the pair list, and ``S (1 - |I~_S - I~_T|)``."""

    student: Component
    teacher: Component
    similarity: float
    influence_student: float
    influence_teacher: float
    norm_student: float = 0.0
    norm_teacher: float = 0.0
    contribution: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["student"], d["teacher"] = str(self.student), str(self.teacher)
        d["kind"] = self.student.kind
        return d


def match_components(table: SimilarityTable, direction: str = "student_to_teacher"
                     ) -> list[tuple[Component, Component, float]]:
    """Best match per component: ``(student, teacher, S)`` triples.

    ``student_to_teacher``: one triple per student component (its most similar teacher component
    of the same kind); ``teacher_to_student``: one per teacher component. Ties go to the earliest
    component in forward order.
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    out = []
    for kd, vals in table.values.items():
        sc, tc = table.student[kd], table.teacher[kd]
        if not sc or not tc:
            continue
        if direction == "student_to_teacher":
            best = vals.argmax(1)  # first maximum: forward order
            out += [(s, tc[int(best[i])], float(vals[i, best[i]])) for i, s in enumerate(sc)]
        else:
            best = vals.argmax(0)
            out += [(sc[int(best[j])], t, float(vals[best[j], j])) for j, t in enumerate(tc)]
    return out


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
    t_out = component_outputs(teacher, batch, tcomps, batch_size=batch_size)
    s_out = component_outputs(student, batch, scomps, batch_size=batch_size)
    m = t_out[tcomps[0]].shape[0]
    if s_out[scomps[0]].shape[0] != m:
        raise TaskError("teacher and student saw different numbers of tokens; use the same prompts")
    rows = torch.linspace(0, m - 1, min(m, max_rows)).round().long().unique()
    out = torch.zeros(len(tcomps), len(scomps), dtype=torch.float64)
    for i, t in enumerate(tcomps):
        for j, s in enumerate(scomps):
            out[i, j] = float(linear_cka(t_out[t][rows], s_out[s][rows]))
    return out
