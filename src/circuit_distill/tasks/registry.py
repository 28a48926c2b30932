"""The task registry: ``make_task(name, tokenizer, n, seed=..., **options)``.

A generator is a function ``(tokenizer, n, *, seed, **options) -> TaskData`` registered under a
name with ``@register_task("name")``. Generators live one per module in this package and are
imported lazily, so importing circuit_distill stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from ..errors import TaskError
from .base import TaskData

TASKS: dict[str, Callable[..., TaskData]] = {}
VOCABULARIES: dict[str, Callable[..., list[str]]] = {}
# built-in task name -> module that registers it (imported on first use)
BUILTIN_MODULES = {
    "entity_tracking": "entity_tracking",
    "theory_of_mind": "theory_of_mind",
    "ioi": "ioi",
    "numerals": "numerals",
    "greater_than": "greater_than",
    "induction": "induction",
    "jsonl": "jsonl",
}


def register_task(name: str, vocabulary: Callable[..., list[str]] | None = None):
    """Decorator: register a generator ``fn(tokenizer, n, *, seed, **options) -> TaskData``.

    ``vocabulary(**options) -> list[str]`` lists every word the task can produce (prompts and
    answers), so a word-level tokenizer covering it can be built (``task_vocabulary``).
    """

    def deco(fn):
        TASKS[name] = fn
        if vocabulary is not None:
            VOCABULARIES[name] = vocabulary
        return fn

    return deco


def task_vocabulary(name: str, **options) -> list[str]:
    """Every word task ``name`` can produce with ``options`` (for a word-level tokenizer)."""
    _load(name)
    if name not in VOCABULARIES:
        raise TaskError(f"task {name!r} does not declare a vocabulary")
    return VOCABULARIES[name](**options)


def _load(name: str) -> Callable[..., TaskData]:
    if name not in TASKS and name in BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{BUILTIN_MODULES[name]}")
    if name not in TASKS:
        known = sorted(set(TASKS) | set(BUILTIN_MODULES))
        raise TaskError(f"unknown task {name!r}; available: {', '.join(known)} (or register your own "
                        "with circuit_distill.tasks.register_task)")
    return TASKS[name]


def task_names() -> list[str]:
    return sorted(set(TASKS) | set(BUILTIN_MODULES))


def make_task(name: str, tokenizer, n: int, *, seed: int = 0, **options) -> TaskData:
    """Generate ``n`` examples of task ``name`` for ``tokenizer`` (same seed, same data).

    ``options`` are the generator's own keyword arguments; an unknown option is a ``TaskError``
    naming the options the task takes.
    """
    if n < 1:
        raise TaskError(f"n must be >= 1, got {n}")
    fn = _load(name)
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "seed"]
        bad = sorted(set(options) - set(allowed))
        if bad:
            raise TaskError(f"task {name!r} has no option(s) {', '.join(bad)}; its options: {', '.join(allowed)}")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # accept a Model too
    return fn(tokenizer, n, seed=seed, **options)
