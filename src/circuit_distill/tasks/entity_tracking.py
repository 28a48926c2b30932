"""Entity tracking (Kim & Schuster 2023, in the simplified form of Prakash et al. 2024).

    "The magnet is in Box X, the eggnog is in Box T, the bell is in Box Q. Box T contains the" -> " eggnog"

Labels are single capital letters, objects distinct single words from a built-in list. Optional
operations follow the context: ``n_moves`` sentences "The eggnog is moved to Box R." (to a box not
used before, emptying the old one) and ``n_removes`` sentences "The bell is removed from Box Q."
(emptying that box). Only non-empty boxes are queried.

``n_shots`` puts that many solved examples before each prompt, separated by blank lines:

    "The lamp is in Box K, the coin is in Box D. Box D contains the coin.\n\nThe magnet is in ..."

Each shot has as many boxes (and moves, removals) as its prompt and uses none of the prompt's
objects or labels (nor, for ``corruption="objects"``, its replacement objects); the corrupted prompt
keeps the same shots, and the named positions point into the prompt after them. The shots come
from their own random stream, so the prompts themselves are the same for every ``n_shots``.

Named positions (into the clean prompt; the corrupted prompt has its own):

- ``query_label``: the queried label in the question ("Box **T** contains the").
- ``earlier_label``: the same label where the answer object was put in that box.
- ``object``: the answer object's mention in that same sentence.
- ``last``: the final token (added by the builder).

Corruptions (``corruption``): ``"query"`` asks about another non-empty box of the same context;
``"objects"`` keeps labels and the query but replaces every object by another one (the answer
changes with them). The wrong answer (for logit difference) is always the object in another box of
the clean context, so it is a plausible distractor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import TaskError
from .base import TaskData
from .build import Example, build_task_data
from .registry import register_task
from .words import fitted_pool

OBJECTS: tuple[str, ...] = (
    "magnet", "eggnog", "bell", "apple", "book", "clock", "coin", "drum", "fan", "glove",
    "hat", "kite", "lamp", "map", "mug", "pen", "ring", "rope", "shoe", "sock",
    "spoon", "stone", "toy", "watch",
)
# single capital letters; "A" and "I" are left out because they are also English words
LABELS: tuple[str, ...] = tuple(c for c in "BCDEFGHJKLMNOPQRSTUVWXYZ")
TEMPLATE_WORDS: tuple[str, ...] = ("The", "the", "is", "in", "Box", "contains", ",", ".", "moved", "to",
                                   "removed", "from")
CORRUPTIONS = ("query", "objects")
SHOT_SEPARATOR = "\n\n"
SPLITS = ("train", "test")


def _pool(items: tuple[str, ...] | list[str], split: str | None, kind: str) -> list[str]:
    items = list(items)
    if split is None:
        return items
    if split not in SPLITS:
        raise TaskError(f"split must be 'train', 'test' or None, got {split!r}")
    # disjoint halves: even indices train, odd indices test
    return items[0::2] if split == "train" else items[1::2]


def vocabulary(*, objects: list[str] | None = None, labels: list[str] | None = None, **_) -> list[str]:
    """Every word an ``entity_tracking`` prompt or answer can contain (for a word-level tokenizer)."""
    return list(TEMPLATE_WORDS) + list(labels or LABELS) + list(objects or OBJECTS)


def parse_boxes(n_boxes: int | str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``7`` -> (7, 7); ``(2, 7)``, ``[2, 7]`` or ``"2-7"`` -> (2, 7) (inclusive)."""
    if isinstance(n_boxes, str):
        parts = n_boxes.replace(":", "-").split("-")
        try:
            lo, hi = (int(parts[0]), int(parts[-1]))
        except ValueError:
            raise TaskError(f"n_boxes must be an int or a range like '2-7', got {n_boxes!r}") from None
    elif isinstance(n_boxes, int):
        lo = hi = n_boxes
    else:
        try:
            lo, hi = (int(v) for v in n_boxes)
        except (TypeError, ValueError):
            raise TaskError(f"n_boxes must be an int or a (min, max) pair, got {n_boxes!r}") from None
    if lo < 2 or hi < lo:
        raise TaskError(f"n_boxes range must satisfy 2 <= min <= max, got {lo}..{hi}")
    return lo, hi


@dataclass
class _World:
    """One context: the sentences that fill boxes, then the operations."""

    placements: list[tuple[str, str]]  # (object, label) in order of the first sentence
    moves: list[tuple[str, str, str]]  # (object, old label, new label)
    removes: list[tuple[str, str]]  # (object, label)

    def contents(self) -> dict[str, str]:
        box = {lab: obj for obj, lab in self.placements}
        for obj, old, new in self.moves:
            del box[old]
            box[new] = obj
        for _obj, lab in self.removes:
            del box[lab]
        return box


def _sample_world(rng: random.Random, n: int, n_moves: int, n_removes: int, objects: list[str],
                  labels: list[str]) -> _World:
    objs = rng.sample(objects, n)
    labs = rng.sample(labels, n + n_moves)
    placements = list(zip(objs, labs[:n]))
    box = {lab: obj for obj, lab in placements}
    moves = []
    for new in labs[n:]:
        old = rng.choice(sorted(box))
        moves.append((box[old], old, new))
        box[new] = box.pop(old)
    removes = []
    for _ in range(n_removes):
        lab = rng.choice(sorted(box))
        removes.append((box.pop(lab), lab))
    return _World(placements, moves, removes)


def render(world: _World, query: str) -> tuple[str, dict[str, int]]:
    """The prompt text for ``world`` asking about box ``query`` and its named character positions."""
    text = ""
    pos: dict[str, int] = {}
    target = world.contents()[query]
    for i, (obj, lab) in enumerate(world.placements):
        text += ("The " if i == 0 else ", the ")
        if lab == query and obj == target:
            pos["object"] = len(text)
        text += f"{obj} is in Box "
        if lab == query and obj == target:
            pos["earlier_label"] = len(text)
        text += lab
    text += "."
    for obj, _old, new in world.moves:
        text += " The "
        if new == query:
            pos["object"] = len(text)
        text += f"{obj} is moved to Box "
        if new == query:
            pos["earlier_label"] = len(text)
        text += f"{new}."
    for obj, lab in world.removes:
        text += f" The {obj} is removed from Box {lab}."
    text += " Box "
    pos["query_label"] = len(text)
    text += f"{query} contains the"
    return text, pos


def solved(world: _World, query: str) -> str:
    """``world`` asking about box ``query`` with its answer filled in: "... Box T contains the eggnog." """
    return f"{render(world, query)[0]} {world.contents()[query]}."


def shot_prefix(rng: random.Random, n_shots: int, n: int, n_moves: int, n_removes: int, objects: list[str],
                labels: list[str], avoid: set[str]) -> str:
    """``n_shots`` solved examples of ``n`` boxes, none using a word in ``avoid``, each followed by
    ``SHOT_SEPARATOR`` ("" when ``n_shots`` is 0)."""
    objs = [o for o in objects if o not in avoid]
    labs = [lab for lab in labels if lab not in avoid]
    shots = []
    for _ in range(n_shots):
        world = _sample_world(rng, n, n_moves, n_removes, objs, labs)
        shots.append(solved(world, rng.choice(sorted(world.contents()))) + SHOT_SEPARATOR)
    return "".join(shots)


def _shifted(pos: dict[str, int], by: int) -> dict[str, int]:
    return {k: v + by for k, v in pos.items()}


def _check_pools(lo: int, hi: int, corruption: str, n_moves: int, n_removes: int, n_shots: int,
                 n_objs: int, n_labs: int) -> None:
    if n_removes > lo - 2:
        raise TaskError(f"n_removes={n_removes} would leave fewer than 2 filled boxes at {lo} boxes "
                        "(query corruption needs two); lower n_removes or raise the minimum of n_boxes")
    need_objs = hi * (2 if corruption == "objects" else 1) + (hi if n_shots else 0)
    if need_objs > n_objs:
        raise TaskError(f"{hi} boxes need {need_objs} distinct objects (corruption={corruption!r}, "
                        f"n_shots={n_shots}) but the pool has {n_objs}; pass more objects or fewer boxes")
    need_labs = (hi + n_moves) * (2 if n_shots else 1)
    if need_labs > n_labs:
        raise TaskError(f"{hi} boxes plus {n_moves} moves need {need_labs} distinct labels (n_shots={n_shots}) "
                        f"but the pool has {n_labs}; pass more labels or fewer boxes")


def _example(rng: random.Random, shot_rng: random.Random, k: int, n_moves: int, n_removes: int, n_shots: int,
             corruption: str, objs: list[str], labs: list[str]) -> Example:
    world = _sample_world(rng, k, n_moves, n_removes, objs, labs)
    box = world.contents()
    filled = [lab for _, lab in world.placements if lab in box] + [new for _, _, new in world.moves if new in box]
    query, other = rng.sample(filled, 2)
    prompt, pos = render(world, query)
    if corruption == "query":
        c_world, c_query = world, other
    else:
        used = {o for o, _ in world.placements}
        fresh = rng.sample([o for o in objs if o not in used], k)
        swap = {o: f for (o, _), f in zip(world.placements, fresh)}
        c_world = _World([(swap[o], lab) for o, lab in world.placements],
                         [(swap[o], a, b) for o, a, b in world.moves],
                         [(swap[o], lab) for o, lab in world.removes])
        c_query = query
    c_prompt, c_pos = render(c_world, c_query)
    avoid = {w for o, lab in world.placements + c_world.placements for w in (o, lab)} | {m[2] for m in world.moves}
    prefix = shot_prefix(shot_rng, n_shots, k, n_moves, n_removes, objs, labs, avoid)
    answer = box[query]
    return Example(
        prompt=prefix + prompt, answer=f" {answer}", wrong_answer=f" {box[other]}",
        corrupted_prompt=prefix + c_prompt, corrupted_answer=f" {c_world.contents()[c_query]}",
        positions=_shifted(pos, len(prefix)), corrupted_positions=_shifted(c_pos, len(prefix)),
        metadata={"boxes": dict(box), "query": query, "answer": answer, "n_boxes": k, "n_shots": n_shots,
                  "placements": [list(p) for p in world.placements],
                  "moves": [list(m) for m in world.moves], "removes": [list(r) for r in world.removes]},
    )


@register_task("entity_tracking", vocabulary=vocabulary)
def entity_tracking(tokenizer, n: int, *, seed: int = 0, n_boxes: int | str | tuple[int, int] = 7,
                    corruption: str = "query", n_moves: int = 0, n_removes: int = 0, n_shots: int = 0,
                    split: str | None = None, objects: list[str] | None = None,
                    labels: list[str] | None = None, n_reference: int | None = None,
                    first_token: bool = False, padding_side: str = "right") -> TaskData:
    """``n`` entity-tracking prompts; ``n_boxes`` is an int or an inclusive range (``(2, 7)``, ``"2-7"``).

    ``n_shots`` solved examples precede each prompt (module docstring). ``split="train"``/``"test"``
    draws objects and labels from disjoint halves of the pools. The built-in objects are narrowed to
    those the tokenizer keeps whole (``tasks.words``; how many are left is ``options["word_pools"]``);
    ``objects=`` is used as given. ``n_reference`` mean-ablation prompts (default ``n``, with shots
    like the prompts) come from an independent stream.
    """
    lo, hi = parse_boxes(n_boxes)
    if corruption not in CORRUPTIONS:
        raise TaskError(f"corruption must be one of {', '.join(CORRUPTIONS)}, got {corruption!r}")
    if n_moves < 0 or n_removes < 0 or n_shots < 0:
        raise TaskError("n_moves, n_removes and n_shots must be >= 0")
    objs = _pool(objects or OBJECTS, split, "objects")
    labs = _pool(labels or LABELS, split, "labels")
    if len(set(objs)) != len(objs) or len(set(labs)) != len(labs):
        raise TaskError("objects and labels must be distinct")
    need_objs = hi * (2 if corruption == "objects" else 1) + (hi if n_shots else 0)
    if not objects:  # the built-in objects, narrowed to the answers this tokenizer keeps whole
        objs = fitted_pool(tokenizer, objs, task="entity_tracking", kind="objects", need=need_objs,
                           context="Box B contains the", first_token=first_token,
                           hint=f"Pass objects= words it keeps whole or fewer boxes ({hi} boxes need {need_objs}).")
    _check_pools(lo, hi, corruption, n_moves, n_removes, n_shots, len(objs), len(labs))

    rng, shot_rng = random.Random(f"entity_tracking-{seed}"), random.Random(f"entity_tracking-shots-{seed}")
    examples = [_example(rng, shot_rng, rng.randint(lo, hi), n_moves, n_removes, n_shots, corruption, objs, labs)
                for _ in range(n)]
    ref_rng = random.Random(f"entity_tracking-reference-{seed}")
    ref_shot_rng = random.Random(f"entity_tracking-reference-shots-{seed}")
    reference = []
    for _ in range(n if n_reference is None else n_reference):
        world = _sample_world(ref_rng, ref_rng.randint(lo, hi), n_moves, n_removes, objs, labs)
        text = render(world, ref_rng.choice(sorted(world.contents())))[0]
        avoid = {w for o, lab in world.placements for w in (o, lab)} | {m[2] for m in world.moves}
        reference.append(shot_prefix(ref_shot_rng, n_shots, len(world.placements), n_moves, n_removes, objs,
                                     labs, avoid) + text)
    options = {"n_boxes": [lo, hi], "corruption": corruption, "n_moves": n_moves, "n_removes": n_removes,
               "n_shots": n_shots, "split": split, "word_pools": {"objects": len(objs)}}
    return build_task_data("entity_tracking", tokenizer, examples, reference, first_token=first_token,
                           padding_side=padding_side, options=options)
