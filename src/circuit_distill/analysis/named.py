"""Comparing two models whose tokenizers differ: heads and MLPs at the task's named positions.

Two tokenizers cut the same prompt into different tokens, so "token ``t``" of the teacher and of the
student are not the same thing and attention patterns cannot be compared cell by cell. What the two
runs do share is the *text*, and a task names the words that matter in it (entity tracking: the
answer object's earlier mention ``object``, its box label there ``earlier_label``, the label in the
question ``query_label``, and the final token ``last``). ``TaskData.position(name)`` gives, per
prompt, the token that holds the first character of that word in each model's own tokenization.
Both task data must hold the same prompts, row for row (``check_same_prompts``).

Everything here is read at those ``k`` named positions only, one row per prompt:

- **attention mass** of head ``h`` on prompt ``i``: ``M_h[i, a, b]`` = the attention probability
  from named query position ``a`` to named key position ``b`` (``[n, k, k]``; zero where ``b`` comes
  after ``a``). Head similarity ``attention`` = the row-wise cosine (over query positions) of the
  prompt-mean ``M_h`` of the student head and of the teacher head: the paper's attention-pattern
  similarity with the pattern restricted to the named tokens.
- **attention_centred**: the same prompt-mean ``M_h``, minus the mean of ``M`` over every head of
  that model (its "average head"); two heads are as similar as the cosine of those centred matrices
  (the ``k (k + 1) / 2`` entries on and below the diagonal, as one vector), clipped to [0, 1]. Why:
  ``attention`` is near its ceiling on real models (a ``k x k`` causal matrix of positive masses;
  its first row has one entry, so its cosine is 1 whenever both heads put any mass there), and a
  copy of SmolLM2 with re-initialised layers matched SmolLM2 as well as Gemma 3 did. Centring scores
  what a head does *unlike the average head of its model*: heads of a model whose heads all look
  alike (a random network's) get centred patterns of noise.
- **outputs** of a component on prompt ``i``: its activation at the ``k`` named positions,
  concatenated (``[n, k * d]``). Similarity ``cka`` = debiased linear CKA (unbiased HSIC, Song et
  al. 2012) of the two ``[n, k * d]`` matrices over the ``n`` prompts, clipped to [0, 1]; the
  debiased estimator because ``k * d`` far exceeds ``n`` here, where the biased CKA of two unrelated
  representations approaches 1.
- MLPs under ``attention`` keep the sample-space principal-subspace similarity of the alignment
  module, with rows = (prompt, named position) pairs, which line up between the two models.
- **layer CKA**: debiased linear CKA of every teacher layer's residual output with every student
  layer's, rows = prompts, features = the ``k`` named positions concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ..matching import SimilarityTable
from ..model.activations import read_activations
from ..model.attention import eager_attention, forward_attentions
from ..model.components import Component
from ..similarity import principal_subspace, rowwise_cosine, subspace_similarity
from ..tasks.base import TaskData
from ..tasks.positions import check_same_prompts, position_matrix

SIMILARITIES = ("attention", "attention_centred", "cka")


def shared_positions(teacher_data: TaskData, student_data: TaskData,
                     names: Sequence[str] | None = None) -> tuple[str, ...]:
    """The named positions to compare at: ``names``, or every position both task data name, ordered
    by their mean token index in the teacher's data (earliest first, so ``last`` comes last)."""
    if names is None:
        names = sorted(set(teacher_data.positions) & set(student_data.positions))
    names = list(names)
    for td in (teacher_data, student_data):
        for nm in names:
            td.position(nm)  # a clear PositionError for an unknown name
    if not names:
        raise ConfigError("the two task data share no named position")
    return tuple(sorted(names, key=lambda nm: (float(teacher_data.position(nm).float().mean()), nm)))


@torch.no_grad()
def named_attention(model, td: TaskData, names: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """Attention mass between named positions: ``[n_layers, n_heads, n, k, k]`` (float64, cpu);
    entry ``[l, h, i, a, b]`` is head ``(l, h)``'s probability from position ``names[a]`` of prompt
    ``i`` to position ``names[b]``. Runs eager attention for the call."""
    pos = position_matrix(td, names)
    n, k = pos.shape
    L, H = model.arch.n_layers, model.arch.n_heads
    out = torch.zeros(L, H, n, k, k, dtype=torch.float64)
    with eager_attention(model):
        for s in range(0, n, batch_size):
            rows = torch.arange(s, min(s + batch_size, n))
            b = td.clean.subset(rows).to(model.device)
            atts = forward_attentions(model, b.input_ids, b.attention_mask)
            p = pos[rows].to(model.device)
            r = torch.arange(len(rows), device=model.device)[:, None, None]
            for layer, a in enumerate(atts):  # a: [b, H, seq, seq]
                sel = a.permute(0, 2, 3, 1)[r, p[:, :, None], p[:, None, :]]  # [b, k, k, H]
                out[layer, :, rows] = sel.permute(3, 0, 1, 2).double().cpu()
    return out


def named_outputs(model, td: TaskData, components: Sequence[Component], names: Sequence[str], *,
                  batch_size: int = 64) -> dict[Component, torch.Tensor]:
    """``comp -> [n, k, d]``: each component's activation at the named positions (float32, cpu)."""
    pos = position_matrix(td, names)
    acts = read_activations(model, td.clean.input_ids, td.clean.attention_mask, list(components),
                            batch_size=batch_size)
    rows = torch.arange(pos.shape[0])[:, None]
    return {c: a[rows, pos] for c, a in acts.items()}


def u_centred_grams(x: torch.Tensor) -> torch.Tensor:
    """U-centred linear Gram matrices of ``x [P, n, d]`` -> ``[P, n, n]`` (float64), each scaled to unit
    Frobenius norm, so that the debiased CKA of two matrices is the sum of the products of their grams."""
    x = x.double()
    x = x - x.mean(1, keepdim=True)
    g = x @ x.transpose(1, 2)
    n = g.shape[-1]
    if n < 4:
        raise ConfigError(f"debiased CKA needs at least 4 prompts, got {n}")
    eye = torch.eye(n, dtype=torch.bool)
    g = g.masked_fill(eye, 0)
    means = g.sum(-2) / (n - 2)
    means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
    g = (g - means[..., :, None] - means[..., None, :]).masked_fill(eye, 0)
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]


def debiased_cka_table(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Debiased linear CKA of every ``xs[i] [n, d_i]`` with every ``ys[j] [n, d_j]``: ``[len(xs), len(ys)]``
    (float64; constant matrices give 0)."""
    def grams(ms):
        return torch.cat([u_centred_grams(m.reshape(1, m.shape[0], -1)) for m in ms]).flatten(1)

    return grams(xs) @ grams(ys).T


def _pairwise(rows: Sequence[Component], cols: Sequence[Component], sim) -> torch.Tensor:
    vals = torch.zeros(len(rows), len(cols), dtype=torch.float64)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            vals[i, j] = sim(r, c)
    return vals


def _attention_table(teacher, student, t_td, s_td, names, sc, tc, batch_size, centred: bool = False) -> torch.Tensor:
    """Heads by the row-wise cosine of their prompt-mean named attention mass (or ``centred_pattern_table``):
    ``[len(sc), len(tc)]``."""
    tm = named_attention(teacher, t_td, names, batch_size=batch_size).mean(2)  # [L, H, k, k]
    sm = named_attention(student, s_td, names, batch_size=batch_size).mean(2)
    if centred:
        return centred_pattern_table(sm, tm, sc, tc)
    return _pairwise(sc, tc, lambda s, t: rowwise_cosine(sm[s.layer, s.head], tm[t.layer, t.head]))


def centred_pattern_table(sm: torch.Tensor, tm: torch.Tensor, sc: Sequence[Component],
                          tc: Sequence[Component]) -> torch.Tensor:
    """``attention_centred`` of the heads ``sc`` x ``tc``: ``[len(sc), len(tc)]`` in [0, 1], from the
    prompt-mean named attention ``sm [L_s, H_s, k, k]`` and ``tm [L_t, H_t, k, k]`` (module docstring)."""
    k = sm.shape[-1]
    low = torch.tril(torch.ones(k, k, dtype=torch.bool))

    def centred(m: torch.Tensor, comps: Sequence[Component]) -> torch.Tensor:
        flat = m[..., low].double()  # [L, H, k(k+1)/2]
        flat = flat - flat.flatten(0, 1).mean(0)
        rows = torch.stack([flat[c.layer, c.head] for c in comps])
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero row stays zero

    return (centred(sm, sc) @ centred(tm, tc).T).clamp(0, 1)


def named_similarity_table(teacher, student, teacher_data: TaskData, student_data: TaskData, *,
                           similarity: str = "attention", kinds: Sequence[str] = ("head", "mlp"), k: int = 3,
                           names: Sequence[str] | None = None, batch_size: int = 64) -> SimilarityTable:
    """Same-kind similarities of all student and teacher components at the named positions (module
    docstring); works whatever the two tokenizers, given the same prompts in both task data."""
    if similarity not in SIMILARITIES:
        raise ConfigError(f"unknown similarity {similarity!r}; use one of {', '.join(SIMILARITIES)}")
    bad = [kd for kd in kinds if kd not in ("head", "mlp")]
    if bad:
        raise ConfigError(f"can only compare heads and MLPs, got kind(s) {', '.join(bad)}")
    check_same_prompts(teacher_data, student_data)
    names = shared_positions(teacher_data, student_data, names)
    tc = {kd: teacher.components(kd) for kd in kinds}
    sc = {kd: student.components(kd) for kd in kinds}
    values: dict[str, torch.Tensor] = {}
    need = [kd for kd in kinds if similarity == "cka" or kd == "mlp"]
    if need:
        t_out = named_outputs(teacher, teacher_data, [c for kd in need for c in tc[kd]], names, batch_size=batch_size)
        s_out = named_outputs(student, student_data, [c for kd in need for c in sc[kd]], names, batch_size=batch_size)
    for kd in kinds:
        if kd == "head" and similarity.startswith("attention"):
            values[kd] = _attention_table(teacher, student, teacher_data, student_data, names, sc[kd], tc[kd],
                                          batch_size, centred=similarity == "attention_centred")
        elif similarity == "cka":
            values[kd] = debiased_cka_table([s_out[c] for c in sc[kd]], [t_out[c] for c in tc[kd]]).clamp(0, 1)
        else:  # MLPs by principal subspaces over (prompt, position) rows
            tsub = {t: principal_subspace(t_out[t].flatten(0, 1), k, "samples") for t in tc[kd]}
            ssub = {s: principal_subspace(s_out[s].flatten(0, 1), k, "samples") for s in sc[kd]}
            values[kd] = _pairwise(sc[kd], tc[kd], lambda s, t: subspace_similarity(ssub[s], tsub[t]))
    return SimilarityTable(similarity, tc, sc, values)


def named_layer_cka(teacher, student, teacher_data: TaskData, student_data: TaskData, *,
                    names: Sequence[str] | None = None, batch_size: int = 64) -> torch.Tensor:
    """``[teacher n_layers, student n_layers]`` debiased linear CKA of residual outputs at the named
    positions (rows = prompts)."""
    check_same_prompts(teacher_data, student_data)
    names = shared_positions(teacher_data, student_data, names)
    tcomps, scomps = teacher.components("resid_post"), student.components("resid_post")
    t_out = named_outputs(teacher, teacher_data, tcomps, names, batch_size=batch_size)
    s_out = named_outputs(student, student_data, scomps, names, batch_size=batch_size)
    return debiased_cka_table([t_out[c] for c in tcomps], [s_out[c] for c in scomps])


def named_task_pair(task: str, teacher_tokenizer, student_tokenizer, n: int, *, seed: int = 0,
                    **options) -> tuple[TaskData, TaskData]:
    """The same ``n`` prompts of ``task`` tokenised by each model's tokenizer: ``(teacher_data, student_data)``.

    Generators narrow their built-in answer words to those a tokenizer keeps whole, so two tokenizers
    can draw different prompts from one seed. For entity tracking without ``objects=`` the objects
    are then narrowed to those *both* keep whole (in the built-in order) and both data rebuilt; any
    other mismatch is a ``ConfigError`` saying which word lists to pass.
    """
    from ..tasks import make_task
    from ..tasks.entity_tracking import OBJECTS
    from ..tasks.words import whole_words

    t = make_task(task, teacher_tokenizer, n, seed=seed, **options)
    s = make_task(task, student_tokenizer, n, seed=seed, **options)
    if t.prompts != s.prompts and task == "entity_tracking" and not options.get("objects"):
        both = [w for w in whole_words(teacher_tokenizer, OBJECTS, context="Box B contains the")
                if w in set(whole_words(student_tokenizer, OBJECTS, context="Box B contains the"))]
        options = dict(options, objects=both)
        t = make_task(task, teacher_tokenizer, n, seed=seed, **options)
        s = make_task(task, student_tokenizer, n, seed=seed, **options)
    check_same_prompts(t, s)
    return t, s
