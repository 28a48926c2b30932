"""How ``train_tiny`` trains a model on ``entity_tracking`` (METHOD.md §4).

Training sequences: one entity-tracking context followed by ``n_queries`` queries, with the loss on
every answer token only. A fraction ``easy_fraction`` of the queries uses an easier form, ``"Box T
eggnog"`` (the answer right after the label), the rest the task's form, ``"Box T contains the
eggnog"``; the easy form lets the binding mechanism form instead of sitting on the ~1/n plateau.
The first query of every sequence is token-for-token a ``make_task("entity_tracking")`` prompt, and
competence is measured with ``tasks.evaluate`` on fresh ``make_task`` prompts at each box count of
``target_boxes`` (during training) and ``report_boxes`` (at the end).
"""

from __future__ import annotations

import random

from ...errors import ConfigError
from ...model.tokenizer import word_level_tokenizer
from ...tasks import evaluate, make_task, task_vocabulary
from ...tasks.entity_tracking import LABELS, OBJECTS


def accuracy_at(model, boxes: int, n: int, seed: int) -> float:
    """Held-out accuracy of ``model`` on ``n`` fresh ``entity_tracking`` prompts with ``boxes`` boxes."""
    data = make_task("entity_tracking", model.tokenizer, n, seed=seed, n_boxes=boxes, n_reference=1)
    return evaluate(model, data)["accuracy"]


class EntityTrackingCurriculum:
    """``entity_tracking`` for ``train_tiny`` (see the module docstring)."""

    name = "entity_tracking"
    tied_embeddings = False

    def validate(self, cfg) -> None:
        pool = min(len(OBJECTS), len(LABELS))
        if not 2 <= cfg.min_boxes <= cfg.max_boxes:
            raise ConfigError(f"training boxes must satisfy 2 <= min_boxes <= max_boxes, got "
                              f"{cfg.min_boxes}..{cfg.max_boxes}")
        if cfg.max_boxes > pool:
            raise ConfigError(f"max_boxes={cfg.max_boxes} exceeds the task's pools "
                              f"({len(OBJECTS)} objects, {len(LABELS)} labels)")
        if not cfg.target_boxes or not all(2 <= b <= pool for b in cfg.target_boxes + cfg.report_boxes):
            raise ConfigError(f"target_boxes (at least one) and report_boxes must be box counts in 2..{pool}, got "
                              f"{cfg.target_boxes} and {cfg.report_boxes}")

    def tokenizer(self, cfg):
        """Word-level, over the ``entity_tracking`` vocabulary (shipped with the models)."""
        return word_level_tokenizer(task_vocabulary("entity_tracking"))

    def frozen_words(self, cfg) -> list[str]:
        return []

    def redrawn_words(self, cfg) -> list[str]:
        return []

    def rows(self, cfg, rng: random.Random, vocab: dict[str, int]) -> tuple[list[list[int]], list[list[int]]]:
        """``batch_size`` training sequences (token ids) and their targets (-100 but at answers)."""
        rows, targets = [], []
        batch_k = rng.randint(cfg.min_boxes, cfg.max_boxes)
        for _ in range(cfg.batch_size):
            k = batch_k if cfg.same_boxes_per_batch else rng.randint(cfg.min_boxes, cfg.max_boxes)
            objs = rng.sample(OBJECTS, k)
            labs = rng.sample(LABELS, k)
            words: list[str] = []
            for i, (o, lab) in enumerate(zip(objs, labs)):
                words += (["The"] if i == 0 else [",", "the"]) + [o, "is", "in", "Box", lab]
            words.append(".")
            tgt = [-100] * len(words)
            for _q in range(cfg.n_queries):
                j = rng.randrange(k)
                if rng.random() < cfg.easy_fraction:
                    q = ["Box", labs[j]]
                else:
                    q = ["Box", labs[j], "contains", "the"]
                words += q
                tgt += [-100] * len(q)
                tgt[-1] = vocab[objs[j]]
                words += [objs[j], "."]
                tgt += [-100, -100]
            rows.append([vocab[w] for w in words])
            targets.append(tgt)
        return rows, targets

    def target_keys(self, cfg) -> list[str]:
        return [str(b) for b in cfg.target_boxes]

    def report_keys(self, cfg) -> list[str]:
        return [str(b) for b in cfg.report_boxes]

    def accuracy(self, model, key: str, n: int, *, final: bool) -> float:
        """Accuracy at ``key`` boxes on ``n`` fresh prompts, seed 10000 + boxes (during training) or
        20000 + boxes (final)."""
        return accuracy_at(model, int(key), n, seed=(20_000 if final else 10_000) + int(key))

    def card_text(self, cfg) -> dict[str, str]:
        """The task-specific sentences of the training card."""
        return {
            "title": "Tiny entity-tracking model (trained by circuit-distill)",
            "vocabulary": "the `entity_tracking` vocabulary",
            "data": f"{cfg.min_boxes}-{cfg.max_boxes} boxes, {cfg.n_queries} queries per sequence, "
                    f"{cfg.easy_fraction:.0%} in the easy form `Box T object`, loss on the answers only",
            "target": "held-out accuracy at " + ", ".join(str(b) for b in cfg.target_boxes) + " boxes",
            "heldout": "`make_task('entity_tracking', n={n}, n_boxes=k)`, seed 20000+k",
            "key": "boxes",
            "chance": "Chance (a random object of the context) is 1/k at k boxes.",
        }
