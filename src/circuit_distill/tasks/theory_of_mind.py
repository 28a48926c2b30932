"""Theory of mind, CausalToM style (Prakash et al. 2025).

    "Bob and Carla are working in a busy bar. Bob grabs an opaque bottle and fills it with beer.
    Then Carla grabs another opaque cup and fills it with tea. Later, Carla empties the bottle and
    fills it with milk. Bob cannot observe Carla's actions. Carla can observe Bob's actions.
    Question: What does Bob believe the bottle contains? Answer:" -> " beer"

Two characters each fill an opaque container with a drink. Then the *other* character P (not the
queried one, Q) empties the queried container and refills it with a third drink. Whether Q can
observe P's actions decides Q's belief about the queried container:

- ``true_belief``: Q observes P, so Q believes the new drink (whoever's container it is).
- ``false_belief``: Q's own container, Q does not observe P: Q still believes its first drink.
- ``unknown``: P's container, Q does not observe P: Q never saw its contents: " unknown".

``cases`` picks which of these to draw (uniformly). The second visibility sentence (P observing Q)
is random and irrelevant.

Named positions: ``query_character`` and ``query_container`` (in the question),
``character_mention`` (Q's mention in its filling sentence), ``container_mention`` (the queried
container's filling sentence), ``visibility`` ("can"/"cannot" of "Q can observe P's actions"),
``new_drink`` (the refill drink).

Corruptions (``corruption``): ``"visibility"`` (default) flips whether Q observes P, which always
changes the answer (true belief <-> false belief or unknown); ``"drinks"`` replaces all three drinks
by other drinks (an unknown answer stays unknown). The wrong answer is always the belief Q would
hold with the visibility flipped.
"""

from __future__ import annotations

import random

from ..errors import TaskError
from .base import TaskData
from .build import Example, build_task_data
from .registry import register_task
from .words import fitted_pool

CHARACTERS: tuple[str, ...] = ("Bob", "Carla", "Alice", "David", "Emma", "Frank", "Grace", "Henry", "Jack",
                               "Kate", "Liam", "Mia", "Noah", "Sara", "Paul", "Anna")
CONTAINERS: tuple[str, ...] = ("bottle", "cup", "glass", "jar", "mug", "flask", "bowl", "jug", "pot", "kettle")
DRINKS: tuple[str, ...] = ("beer", "tea", "coffee", "milk", "juice", "wine", "water", "soda", "cider", "rum",
                           "gin", "punch")
PLACES: tuple[str, ...] = ("restaurant", "bar", "cafe", "kitchen", "bakery", "diner")
CASES = ("true_belief", "false_belief", "unknown")
CORRUPTIONS = ("visibility", "drinks")
SPLITS = ("train", "test")
TEMPLATE_WORDS: tuple[str, ...] = (
    "and", "are", "working", "in", "a", "busy", ".", "grabs", "an", "opaque", "fills", "it", "with", "Then",
    "another", "Later", ",", "empties", "the", "can", "cannot", "observe", "'", "s", "actions", "Question",
    ":", "What", "does", "believe", "contains", "?", "Answer", "unknown",
)


def _pool(items: tuple[str, ...], split: str | None) -> list[str]:
    if split is None:
        return list(items)
    if split not in SPLITS:
        raise TaskError(f"split must be 'train', 'test' or None, got {split!r}")
    return list(items)[0::2] if split == "train" else list(items)[1::2]


def vocabulary(*, split: str | None = None, **_) -> list[str]:
    """Every word a ``theory_of_mind`` prompt or answer can contain (for a word-level tokenizer)."""
    return (list(TEMPLATE_WORDS) + _pool(CHARACTERS, split) + _pool(CONTAINERS, split) + _pool(DRINKS, split)
            + _pool(PLACES, split))


class _Text:
    """Append-only text that records character offsets of named pieces."""

    def __init__(self) -> None:
        self.text, self.pos = "", {}

    def add(self, piece: str, name: str | None = None) -> None:
        if name is not None:
            self.pos[name] = len(self.text)
        self.text += piece


def _story(s: dict, q_sees: bool) -> tuple[str, dict[str, int]]:
    """Render story ``s`` with Q's visibility of P set to ``q_sees``."""
    t = _Text()
    c1, c2 = s["c1"], s["c2"]
    t.add(f"{c1} and {c2} are working in a busy {s['place']}. ")
    for i, (who, lead) in enumerate(((c1, ""), (c2, "Then "))):
        t.add(lead)
        t.add(who, "character_mention" if who == s["q"] else None)
        t.add(f" grabs {'an' if i == 0 else 'another'} opaque ")
        t.add(s["containers"][i], "container_mention" if s["containers"][i] == s["container"] else None)
        t.add(" and fills it with ")
        t.add(s["drinks"][i])
        t.add(". ")
    t.add(f"Later, {s['p']} empties the {s['container']} and fills it with ")
    t.add(s["new_drink"], "new_drink")
    t.add(". ")
    for who, other, sees in ((s["q"], s["p"], q_sees), (s["p"], s["q"], s["p_sees"])):
        t.add(f"{who} ")
        t.add("can" if sees else "cannot", "visibility" if who == s["q"] else None)
        t.add(f" observe {other}'s actions. ")
    t.add("Question: What does ")
    t.add(s["q"], "query_character")
    t.add(" believe the ")
    t.add(s["container"], "query_container")
    t.add(" contains? Answer:")
    return t.text, t.pos


def _belief(s: dict, q_sees: bool) -> tuple[str, str]:
    """(answer word, case) of Q's belief about the queried container."""
    if q_sees:
        return s["new_drink"], "true_belief"
    if s["own"]:
        return s["drinks"][s["q_index"]], "false_belief"
    return "unknown", "unknown"


def _example(rng: random.Random, cases: list[str], chars: list[str], conts: list[str], drinks: list[str],
             places: list[str], corruption: str) -> Example:
    case = rng.choice(cases)
    c1, c2 = rng.sample(chars, 2)
    q_index = rng.randint(0, 1)
    q, p = (c1, c2)[q_index], (c1, c2)[1 - q_index]
    own = rng.random() < 0.5 if case == "true_belief" else case == "false_belief"
    containers = rng.sample(conts, 2)
    ds = rng.sample(drinks, 6)
    s = {"c1": c1, "c2": c2, "q": q, "p": p, "q_index": q_index, "own": own, "place": rng.choice(places),
         "containers": containers, "container": containers[q_index if own else 1 - q_index],
         "drinks": ds[:2], "new_drink": ds[2], "p_sees": rng.random() < 0.5}
    q_sees = case == "true_belief"
    prompt, pos = _story(s, q_sees)
    answer, case = _belief(s, q_sees)  # the case follows from the story as rendered
    wrong, _ = _belief(s, not q_sees)
    if corruption == "visibility":
        cs, c_sees = s, not q_sees
    else:
        cs, c_sees = dict(s, drinks=ds[3:5], new_drink=ds[5]), q_sees
    c_prompt, c_pos = _story(cs, c_sees)
    c_answer, _ = _belief(cs, c_sees)
    return Example(prompt=prompt, answer=" " + answer, wrong_answer=" " + wrong, corrupted_prompt=c_prompt,
                   corrupted_answer=" " + c_answer, positions=pos, corrupted_positions=c_pos,
                   metadata={"case": case, "character": q, "other": p, "container": s["container"],
                             "own_container": own, "drinks": s["drinks"], "new_drink": s["new_drink"],
                             "q_observes": q_sees, "belief": answer, "actual": s["new_drink"],
                             "corrupted_prompt": c_prompt})


@register_task("theory_of_mind", vocabulary=vocabulary)
def theory_of_mind(tokenizer, n: int, *, seed: int = 0, cases: list[str] | tuple[str, ...] | str = CASES,
                   corruption: str = "visibility", split: str | None = None,
                   first_token: bool = False,
                   n_reference: int | None = None, padding_side: str = "right") -> TaskData:
    """``n`` belief-tracking stories (see the module docstring).

    ``cases`` is a subset of ``("true_belief", "false_belief", "unknown")`` (or one of them, or a
    comma-separated string); ``split`` ``"train"``/``"test"`` draws characters, containers, drinks
    and places from disjoint halves; ``first_token`` scores only the first token of answers. The drinks
    (answers) are narrowed to those the tokenizer keeps whole (``tasks.words``, ``options["word_pools"]``).

    ``n_reference`` mean-ablation prompts (default ``n``) come from a stream independent of the
    examples; ``padding_side`` is ``"right"`` or ``"left"``.
    """
    if isinstance(cases, str):
        cases = [c.strip() for c in cases.split(",") if c.strip()]
    cases = list(cases)
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        raise TaskError(f"theory_of_mind: cases must be a non-empty subset of {CASES}, got {cases!r}")
    if corruption not in CORRUPTIONS:
        raise TaskError(f"theory_of_mind: corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    pools = [_pool(x, split) for x in (CHARACTERS, CONTAINERS, DRINKS, PLACES)]
    pools[2] = fitted_pool(tokenizer, pools[2], task="theory_of_mind", kind="drinks", need=6, context="Answer:",
                           first_token=first_token, hint="Use split=None for the full list.")
    rng = random.Random(seed)
    examples = [_example(rng, cases, *pools, corruption) for _ in range(n)]
    if n_reference is not None and n_reference < 1:
        raise TaskError(f"theory_of_mind: n_reference must be >= 1, got {n_reference}")
    rng = random.Random(f"reference:{seed}")  # an independent stream: clean data does not depend on it
    reference = [_example(rng, cases, *pools, corruption).prompt for _ in range(n_reference or n)]
    return build_task_data("theory_of_mind", tokenizer, examples, reference, first_token=first_token, padding_side=padding_side,
                           options={"cases": cases, "corruption": corruption, "split": split,
                                    "first_token": first_token, "n_reference": n_reference,
                                    "padding_side": padding_side, "seed": seed,
                                    "word_pools": {"drinks": len(pools[2])}})
