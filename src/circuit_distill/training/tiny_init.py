"""Structured initialisations of ``train_tiny`` models: mimetic query-key heads and the lookback
(binding) circuit.

**Why the lookback circuit** (issue 16, ``docs/theory-of-mind-training.md``). With frozen random entity
embeddings redrawn at every step, RoPE and no biases, a model trained from the default initialisation
did not learn to match a word with its earlier mention in any number of steps we could afford: on a toy
associative recall (``k and fills it with v .`` pairs, then ``Question k :``), 2 layers stayed at chance
(0.50 with two pairs) for 3,000 steps whatever the knob (entity shift, lr 1e-3 / 3e-3 / 1e-2, 8 queries,
2 heads of 64, mimetic query-key init); plain induction (``k v`` ... ``k`` -> ``v``, four pairs) crept
from 0.25 to 0.62 in 6,000 steps. The circuit needs three pieces at once (a first-layer head that looks
back a fixed number of words and copies what it finds, a second-layer head whose query and key read
those copies, and a value/output that copies the fetched word), and the gradient reaches none of them
before the others exist. Started *with* the pieces (``lookback_offsets`` + ``bind_heads``), the same
toy reached 0.96 at step 300 and the theory-of-mind binding question alone 0.98 at step 100.

The pieces (every weight stays trainable):

- every learned embedding row starts like an entity row (the entity shift plus a random vector of norm
  about 1), so every token has the shift's constant component after the first RMSNorm;
- first layer: head ``h`` attends ``lookback_offsets[h]`` words back. Its query and key read the shift
  direction and are rotated against each other by RoPE's phase at that offset on the 5 fastest
  frequency pairs. Its value copies a random 32-dimensional projection of the word it finds, and its output writes
  it into a random subspace of its own;
- second layer (``bind_heads = (qh, kh)``): head 0's query reads the subspace written by first-layer
  head ``qh`` and its key the subspace of head ``kh``, on the RoPE pairs that turn by less than half a
  radian over ``HORIZON`` words (content, not position), so a position whose word ``qh``-back matches a
  position whose word ``kh``-back is attended; the two heads must share a key/value group (one value
  projection, so the copies are comparable). Matching two *different* offsets matters: with one offset
  the query matches itself. Head 0's value/output copies the fetched word's own embedding; the other
  second-layer heads start random (identical heads would stay identical).

An optional third ``bind_heads`` entry names an *owner* head of the first layer: the first head of the
second layer's second key/value group attends like the binding head and fetches that head's copy
there (``owner_head``). Toy (``/work/tom-runs/owner.py``, offsets 4,5,9,1, ``bind_heads`` 0,1,2): "What
grabs the CONT first ?" -> the name, 0.975 at step 150; without it 0.52 at step 600.

**Order heads** (``order_heads = (ch, prev)``): what tells false belief from unknown is whether the
queried container and the queried character come from the *same* filling sentence. Both the binding and
the owner lookups above left that to an equality of two random vectors, which no run learned (toy
``fbu``: 0.49 after 800 steps). The order heads read it from template words instead, the way the
lookback account's ordering IDs work (which sentence, not which word):

- the binding head's value keeps half of its copy of the attended word (the drink) and takes, in the
  other half, first-layer head ``ch``'s copy there: 7 words before a drink is ``an`` (first filling),
  ``another`` (second) or ``empties`` (the refill); it writes that to a subspace of its own;
- the first head of the second key/value group attends from the answer with ``ch``'s copy (7 words
  back: the question's character) to that character's mentions (key: the word itself) and copies head
  ``prev``'s copy there (the word before: ``and`` / ``Then`` before the second character, ``.`` or
  nothing before the first).

False belief is then the XNOR of two template features, left to the MLPs. Toy (``fbu``: the task's
question on "cannot" stories; ``/work/tom-runs/order.py``, offsets 4,5,7,1, ``bind_heads`` 0,1,
``order_heads`` 2,3): 0.74 at step 700, 0.97 at step 1,000; the query scale matters (1: still 0.50 at
700; ``ORDER_SCALE`` 4).

For theory of mind, ``lookback_offsets = 1,2,4,5`` and ``bind_heads = 2,3``: the question's container
is 4 words before the answer position (``the CONT contains ? Answer :`` and ``fill the CONT with ?
Answer :``) and each drink 5 words after its container (``CONT and fills it with DRINK``).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

HORIZON = 64  # words over which the second layer's content match must not be turned by RoPE
FAST_PAIRS = 5  # RoPE frequency pairs the first layer's positional heads use
LOOKBACK_SCALE = 0.8  # query/key scale of the positional heads (about 0.76 of their attention on the offset)
COPY_SCALE = 0.25  # value scale of the copying heads (writes of norm about 1, like an entity embedding)
ORDER_SCALE = 4.0  # query scale of the order head (about 0.36 of its attention on the character's mentions)


def validate_lookback(cfg) -> None:
    """``lookback_offsets``: one offset >= 1 per head, with a shift; ``bind_heads``, ``order_heads``: see the
    module docstring. Raises ``ConfigError`` saying what to change."""
    if cfg.lookback_offsets and (len(cfg.lookback_offsets) != cfg.n_heads or min(cfg.lookback_offsets) < 1
                                 or not cfg.entity_shift):
        raise ConfigError(f"lookback_offsets needs one offset >= 1 per head ({cfg.n_heads}) and entity_shift > 0, "
                          f"got {cfg.lookback_offsets} (entity_shift {cfg.entity_shift})")
    group = cfg.n_heads // max(1, cfg.n_kv_heads)
    heads_ok = all(0 <= h < cfg.n_heads for h in list(cfg.bind_heads) + list(cfg.order_heads))
    if cfg.bind_heads and (not cfg.lookback_offsets or cfg.n_layers < 2 or len(cfg.bind_heads) not in (2, 3)
                           or not heads_ok or cfg.bind_heads[0] // group != cfg.bind_heads[1] // group
                           or (len(cfg.bind_heads) == 3 and cfg.n_kv_heads < 2)):
        raise ConfigError(f"bind_heads: two heads of one key/value group (of {group}), optionally an owner head "
                          f"(2+ groups), with lookback_offsets and >= 2 layers; got {cfg.bind_heads}")
    if cfg.order_heads and (len(cfg.bind_heads) != 2 or len(cfg.order_heads) != 2 or not heads_ok
                            or cfg.n_kv_heads < 2 or cfg.n_heads // cfg.n_kv_heads < 1):
        raise ConfigError(f"order_heads: two first-layer heads (character copy, previous word), with two bind_heads "
                          f"(no owner head) and >= 2 key/value groups; got {cfg.order_heads} "
                          f"(bind_heads {cfg.bind_heads}, kv heads {cfg.n_kv_heads})")


def match_queries_to_keys(hf, scale: float, n_heads: int, n_kv_heads: int, layers=None) -> None:
    """Mimetic initialisation of the attention scores (Trockman and Kolter, 2023): each query head of
    ``layers`` (default: all) starts as ``scale`` times the key head of its GQA group, so ``W_Q^T W_K`` is
    positive semi-definite and every head starts out preferring tokens like its own."""
    with torch.no_grad():
        for layer in hf.model.layers if layers is None else layers:
            q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
            d_head = q.shape[0] // n_heads
            for h in range(n_heads):
                g = h // (n_heads // n_kv_heads)
                q[h * d_head:(h + 1) * d_head] = scale * k[g * d_head:(g + 1) * d_head]


def orthonormal_rows(n: int, d: int, gen: torch.Generator, avoid: torch.Tensor) -> torch.Tensor:
    """``[n, d]``: orthonormal rows drawn from ``gen``, all orthogonal to the unit vector ``avoid [d]``."""
    m = torch.randn(d, n + 1, generator=gen)
    m[:, 0] = avoid
    q, _ = torch.linalg.qr(m)
    return q[:, 1:].T.contiguous()


def rope_frequencies(hf, d_head: int) -> torch.Tensor:
    """``[d_head // 2]``: RoPE's angle per word of each frequency pair (pair ``p``: dims ``p``, ``p + d_head/2``)."""
    params = getattr(hf.config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf.config, "rope_theta", 10_000.0))
    return 1.0 / (theta ** (torch.arange(0, d_head, 2).float() / d_head))


def lookback_heads(att, offsets: list[int], shift_dir: torch.Tensor, freqs: torch.Tensor, n_kv_heads: int,
                   gen: torch.Generator) -> list[torch.Tensor]:
    """Make head ``h`` of attention ``att`` look ``offsets[h]`` words back and copy what it finds (see the
    module docstring); returns each head's write subspace ``[d_head, d_model]``."""
    d_head = att.q_proj.weight.shape[0] // len(offsets)
    d = shift_dir.shape[0]
    fast = min(FAST_PAIRS, d_head // 2)
    key = torch.zeros(d_head)
    key[:fast] = 1.0
    for g in range(n_kv_heads):
        att.k_proj.weight[g * d_head:(g + 1) * d_head] += LOOKBACK_SCALE * torch.outer(key, shift_dir)
        att.v_proj.weight[g * d_head:(g + 1) * d_head] = COPY_SCALE * orthonormal_rows(d_head, d, gen, shift_dir)
    writes = []
    for h, offset in enumerate(offsets):
        angle = -freqs[:fast] * offset  # query = key turned back by the offset's phase
        query = torch.zeros(d_head)
        query[:fast], query[d_head // 2:d_head // 2 + fast] = torch.cos(angle), torch.sin(angle)
        att.q_proj.weight[h * d_head:(h + 1) * d_head] += LOOKBACK_SCALE * torch.outer(query, shift_dir)
        writes.append(orthonormal_rows(d_head, d, gen, shift_dir))
        att.o_proj.weight[:, h * d_head:(h + 1) * d_head] = writes[-1].T
    return writes


def binding_head(att, query_space: torch.Tensor, key_space: torch.Tensor, shift_dir: torch.Tensor,
                 freqs: torch.Tensor, n_heads: int, gen: torch.Generator) -> None:
    """Make head 0 of ``att`` match the content of ``query_space`` at the query with ``key_space`` at the key
    (both ``[d_head, d_model]``), on RoPE's slow pairs, and copy the attended word's embedding. Only head 0's
    query and output are set (its key/value group's key and value too): identical heads would get identical
    gradients and stay copies, so the others start random."""
    d_head = att.q_proj.weight.shape[0] // n_heads
    rows = slow_rows(freqs, d_head)
    copy = orthonormal_rows(d_head, shift_dir.shape[0], gen, shift_dir)
    att.k_proj.weight[:d_head] = 0.0
    att.k_proj.weight[rows] = key_space[:len(rows)]
    att.v_proj.weight[:d_head] = copy
    att.q_proj.weight[:d_head] = 0.0
    att.q_proj.weight[rows] = query_space[:len(rows)]
    att.o_proj.weight[:, :d_head] = copy.T


def owner_head(att, query_space: torch.Tensor, key_space: torch.Tensor, value_space: torch.Tensor,
               value_source: torch.Tensor, freqs: torch.Tensor, n_heads: int, n_kv_heads: int) -> None:
    """Make the first head of ``att``'s second key/value group attend like the binding head (query
    ``query_space``, key ``key_space``) and fetch what ``value_space`` holds there (the copy of the owner
    head's word: in a filling sentence, 9 words before the drink, the name that filled the container);
    it writes that word's projection ``value_source [d_head, d_model]`` back into the embedding space."""
    d_head = att.q_proj.weight.shape[0] // n_heads
    rows = slow_rows(freqs, d_head)
    h = n_heads // n_kv_heads  # the first head of group 1
    att.k_proj.weight[d_head:2 * d_head] = 0.0
    att.k_proj.weight[[d_head + r for r in rows]] = key_space[:len(rows)]
    att.v_proj.weight[d_head:2 * d_head] = value_space
    att.q_proj.weight[h * d_head:(h + 1) * d_head] = 0.0
    att.q_proj.weight[[h * d_head + r for r in rows]] = query_space[:len(rows)]
    att.o_proj.weight[:, h * d_head:(h + 1) * d_head] = value_source.T


def order_heads(att, writes: list[torch.Tensor], source: torch.Tensor, shift_dir: torch.Tensor,
                freqs: torch.Tensor, n_heads: int, n_kv_heads: int, gen: torch.Generator) -> None:
    """Wire the two order readers of the module docstring into the second layer's attention ``att``:
    ``writes = [ch's, prev's]`` write subspaces ``[d_head, d_model]``; ``source [d_head, d_model]``: the
    first-layer value projection ``ch`` copies with (so the order head's key, the word itself, is comparable
    with ``ch``'s copy). Call after ``binding_head``."""
    d, d_head = shift_dir.shape[0], att.q_proj.weight.shape[0] // n_heads
    rows, half = slow_rows(freqs, d_head), d_head // 2
    copy = att.v_proj.weight[:d_head].clone()
    att.v_proj.weight[half:d_head] = writes[0][:half]  # the binding head's second half: the word 7 before
    att.o_proj.weight[:, :half] = copy[:half].T
    att.o_proj.weight[:, half:d_head] = orthonormal_rows(half, d, gen, shift_dir).T
    h = n_heads // n_kv_heads  # the first head of group 1 reads the character's order
    att.k_proj.weight[d_head:2 * d_head] = 0.0
    att.k_proj.weight[[d_head + r for r in rows]] = source[:len(rows)]
    att.v_proj.weight[d_head:2 * d_head] = writes[1]
    att.q_proj.weight[h * d_head:(h + 1) * d_head] = 0.0
    att.q_proj.weight[[h * d_head + r for r in rows]] = ORDER_SCALE * writes[0][:len(rows)]
    att.o_proj.weight[:, h * d_head:(h + 1) * d_head] = orthonormal_rows(d_head, d, gen, shift_dir).T


def slow_rows(freqs: torch.Tensor, d_head: int) -> list[int]:
    """The query/key rows of RoPE's pairs that turn by less than half a radian over ``HORIZON`` words."""
    slow = [p for p in range(d_head // 2) if freqs[p] * HORIZON < 0.5] or [d_head // 2 - 1]
    return slow + [p + d_head // 2 for p in slow]


def lookback_init(hf, cfg, shift: torch.Tensor, learned_rows: list[int]) -> None:
    """The lookback circuit of ``cfg.lookback_offsets`` / ``cfg.bind_heads`` (module docstring) in ``hf``;
    ``shift [d_model]`` is the entity shift, ``learned_rows`` the embedding rows that are not entity words."""
    d = cfg.d_model
    shift_dir = shift / shift.norm()
    gen = torch.Generator().manual_seed(cfg.seed + 99)
    freqs = rope_frequencies(hf, d // cfg.n_heads)
    with torch.no_grad():
        weight = hf.get_input_embeddings().weight
        weight[learned_rows] = shift + torch.randn(len(learned_rows), d, generator=gen) / d ** 0.5
        writes = lookback_heads(hf.model.layers[0].self_attn, list(cfg.lookback_offsets), shift_dir, freqs,
                                cfg.n_kv_heads, gen)
        if cfg.bind_heads:
            qh, kh = cfg.bind_heads[:2]
            binding_head(hf.model.layers[1].self_attn, writes[qh], writes[kh], shift_dir, freqs, cfg.n_heads, gen)
        if len(cfg.bind_heads) == 3:
            owner_head(hf.model.layers[1].self_attn, writes[qh], writes[kh], writes[cfg.bind_heads[2]],
                       copy_projection(hf, cfg, cfg.bind_heads[2]), freqs, cfg.n_heads, cfg.n_kv_heads)
        if cfg.order_heads:
            ch, prev = cfg.order_heads
            order_heads(hf.model.layers[1].self_attn, [writes[ch], writes[prev]], copy_projection(hf, cfg, ch),
                        shift_dir, freqs, cfg.n_heads, cfg.n_kv_heads, gen)


def copy_projection(hf, cfg, head: int) -> torch.Tensor:
    """``[d_head, d_model]``: the projection first-layer head ``head`` copies words with (its key/value group's
    value rows, without ``COPY_SCALE``), so a later key can read a word the way that head's copy holds it."""
    d_head = cfg.d_model // cfg.n_heads
    g = head // (cfg.n_heads // cfg.n_kv_heads)
    return hf.model.layers[0].self_attn.v_proj.weight[g * d_head:(g + 1) * d_head] / COPY_SCALE
