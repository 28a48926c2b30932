"""Indirect object identification (Wang et al. 2022).

    "When Mary and John went to the store, John gave a drink to" -> " Mary"

The indirect object (IO) and the subject (S) are introduced together; S is repeated; the answer is
IO. ``order="ABBA"`` puts IO first ("Mary and John ..., John"), ``"BABA"`` puts S first ("John and
Mary ..., John"); ``"mixed"`` (default) alternates at random.

Named positions: ``IO`` and ``S1`` (the two names in the introduction), ``S2`` (the repeated
subject), ``end`` (the final word, also ``last``).

Corruptions (``corruption``): ``"abc"`` (default) replaces IO, S1 and S2 by three fresh distinct
names, so the prompt names no repeated person and has no correct answer; ``"flip"`` puts the IO
name at S2 (the answer becomes S: the corrupted answer). The wrong answer is always S.
"""

from __future__ import annotations

import random

from ..errors import TaskError
from .base import TaskData
from .build import Example, build_task_data
from .registry import register_task
from .words import fitted_pool

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Anna", "Paul", "Kate", "Mark",
    "Lisa", "Bob", "Rose", "Sam", "Jane", "Mike", "Sarah", "David", "Emma", "Adam", "Laura", "Alex",
)
PLACES: tuple[str, ...] = ("store", "garden", "restaurant", "school", "hospital", "office", "station",
                           "market", "park", "house")
OBJECTS: tuple[str, ...] = ("drink", "ring", "book", "kiss", "bone", "basketball", "computer", "necklace",
                            "snack", "apple")
# {A} and {B} are the introduction's names, {C} the repeated subject
TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {place}, {C} gave a {obj} to",
    "Then, {A} and {B} went to the {place}. {C} gave a {obj} to",
    "After {A} and {B} went to the {place}, {C} gave a {obj} to",
    "While {A} and {B} were working at the {place}, {C} gave a {obj} to",
    "Then, {A} and {B} had a lot of fun at the {place}. {C} gave a {obj} to",
)
ORDERS = ("ABBA", "BABA", "mixed")
CORRUPTIONS = ("abc", "flip")
SPLITS = ("train", "test")


def _pool(items: tuple[str, ...] | list[str], split: str | None) -> list[str]:
    if split is None:
        return list(items)
    if split not in SPLITS:
        raise TaskError(f"split must be 'train', 'test' or None, got {split!r}")
    return list(items)[0::2] if split == "train" else list(items)[1::2]


def vocabulary(*, names: list[str] | None = None, split: str | None = None, **_) -> list[str]:
    """Every word an ``ioi`` prompt or answer can contain (for a word-level tokenizer)."""
    words: list[str] = []
    for t in TEMPLATES:
        for w in t.replace(",", " , ").replace(".", " . ").split():
            if not w.startswith("{") and w not in words:
                words.append(w)
    return words + _pool(names or NAMES, split) + _pool(PLACES, split) + _pool(OBJECTS, split)


def _fill(template: str, a: str, b: str, c: str, place: str, obj: str) -> tuple[str, dict[str, int]]:
    """Fill ``template`` and return the text with the character offsets of A, B and C."""
    out, pos, i = "", {}, 0
    values = {"A": a, "B": b, "C": c, "place": place, "obj": obj}
    while i < len(template):
        if template[i] == "{":
            j = template.index("}", i)
            key = template[i + 1:j]
            if key in ("A", "B", "C"):
                pos[key] = len(out)
            out += values[key]
            i = j + 1
        else:
            out += template[i]
            i += 1
    pos["end"] = out.rindex(" ") + 1
    return out, pos


def _example(rng: random.Random, names: list[str], places: list[str], objects: list[str], order: str,
             corruption: str) -> Example:
    io, s, x, y, z = rng.sample(names, 5)
    template, place, obj = rng.choice(TEMPLATES), rng.choice(places), rng.choice(objects)
    this_order = rng.choice(("ABBA", "BABA")) if order == "mixed" else order
    a, b = (io, s) if this_order == "ABBA" else (s, io)
    prompt, p = _fill(template, a, b, s, place, obj)
    io_key, s1_key = ("A", "B") if this_order == "ABBA" else ("B", "A")
    positions = {"IO": p[io_key], "S1": p[s1_key], "S2": p["C"], "end": p["end"]}
    if corruption == "abc":
        ca, cb = (x, y) if this_order == "ABBA" else (y, x)
        c_prompt, cp = _fill(template, ca, cb, z, place, obj)
        c_answer = None
    else:
        c_prompt, cp = _fill(template, a, b, io, place, obj)
        c_answer = " " + s
    c_positions = {"IO": cp[io_key], "S1": cp[s1_key], "S2": cp["C"], "end": cp["end"]}
    return Example(prompt=prompt, answer=" " + io, wrong_answer=" " + s, corrupted_prompt=c_prompt,
                   corrupted_answer=c_answer, positions=positions, corrupted_positions=c_positions,
                   metadata={"IO": io, "S": s, "order": this_order, "template": template, "place": place,
                             "object": obj, "corrupted_prompt": c_prompt})


@register_task("ioi", vocabulary=vocabulary)
def ioi(tokenizer, n: int, *, seed: int = 0, order: str = "mixed", corruption: str = "abc",
        names: list[str] | None = None, split: str | None = None, first_token: bool = False,
        n_reference: int | None = None, padding_side: str = "right") -> TaskData:
    """``n`` IOI prompts (see the module docstring).

    ``names`` replaces the built-in name list (each must be one token with a leading space for the
    tokenizer); ``split`` ``"train"``/``"test"`` draws names, places and objects from disjoint
    halves of the lists; ``first_token`` scores only the first token of multi-token answers. The
    built-in names are narrowed to those the tokenizer keeps whole (``tasks.words``,
    ``options["word_pools"]``).

    ``n_reference`` mean-ablation prompts (default ``n``) come from a stream independent of the
    examples; ``padding_side`` is ``"right"`` or ``"left"``.
    """
    if order not in ORDERS:
        raise TaskError(f"ioi: order must be one of {ORDERS}, got {order!r}")
    if corruption not in CORRUPTIONS:
        raise TaskError(f"ioi: corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    pool = _pool(names or NAMES, split)
    if not names:  # the built-in names, narrowed to the answers this tokenizer keeps whole
        pool = fitted_pool(tokenizer, pool, task="ioi", kind="names", need=5, context="gave a drink to",
                           first_token=first_token, hint="Pass names= it keeps whole.")
    if len(set(pool)) < 5:
        raise TaskError(f"ioi: need at least 5 distinct names, got {len(set(pool))}")
    places, objects = _pool(PLACES, split), _pool(OBJECTS, split)
    rng = random.Random(seed)
    examples = [_example(rng, pool, places, objects, order, corruption) for _ in range(n)]
    if n_reference is not None and n_reference < 1:
        raise TaskError(f"ioi: n_reference must be >= 1, got {n_reference}")
    rng = random.Random(f"reference:{seed}")  # an independent stream: clean data does not depend on it
    reference = [_example(rng, pool, places, objects, order, corruption).prompt for _ in range(n_reference or n)]
    return build_task_data("ioi", tokenizer, examples, reference, first_token=first_token, padding_side=padding_side,
                           options={"order": order, "corruption": corruption, "names": names, "split": split,
                                    "first_token": first_token, "n_reference": n_reference,
                                    "padding_side": padding_side, "seed": seed,
                                    "word_pools": {"names": len(pool)}})
