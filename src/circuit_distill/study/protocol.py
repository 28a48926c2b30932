"""The distillation protocol the demo and the study share: the teacher, the seeds, the training budget and
the prompt sets (``ProtocolConfig``), so a demo cell and a study cell with the same settings train on the
same data with the same budget.

Tasks: ``entity_tracking`` (held-out sets at ``eval_boxes`` and the harder ``hard_boxes``) and
``theory_of_mind`` (training prompts from the ``train`` split of names, containers and drinks, every
held-out set from the ``test`` split: ``eval`` mixes the three cases, ``hard`` is false belief, the case
that needs the container -> drink binding, and one set per case for the per-case accuracy)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, option
from ..errors import ConfigError
from ..tasks import make_task
from ..tasks.theory_of_mind import CASES

TEACHER = "builtin:entity-tracking-teacher"
TASKS = ("entity_tracking", "theory_of_mind")
# the built-in pair of each task (the demo's defaults when its task is chosen)
PAIRS = {"entity_tracking": (TEACHER, "builtin:entity-tracking-student"),
         "theory_of_mind": ("builtin:tom-teacher", "builtin:tom-student")}


@dataclass
class ProtocolConfig(Config):
    """Settings every row of a demo or a study shares (same data, steps, learning rate for every row)."""

    task: str = option("entity_tracking", f"the task: {' or '.join(TASKS)} (see the module docstring)")
    teacher: str = option(TEACHER, "the teacher: a model directory, a builtin: name or a hub id")
    seeds: list[int] = option(help="seeds; each changes the batch order of every row alike",
                              factory=lambda: [0, 1, 2])
    steps: int = option(300, "distillation steps per run")
    batch_size: int = option(32, "prompts per step")
    lr: float = option(3e-3, "learning rate (AdamW), shared by every row")
    warmup: int = option(20, "linear warmup steps")
    lam: float = option(1.0, "weight of the alignment term")
    # the teacher was trained on 2-7 boxes; the student is distilled on 2-5 and also tested on 7
    # (more boxes than it is distilled on, where the teacher is still >= 0.98)
    train_boxes: str = option("2-5", "box counts of the training prompts")
    eval_boxes: int = option(5, "box count of the held-out evaluation set")
    hard_boxes: int = option(7, "box count of the harder held-out split")
    n_train: int = option(2000, "training prompts")
    n_eval: int = option(200, "prompts in each held-out set")
    n_discovery: int = option(200, "prompts for circuit discovery, matching and comparison")
    eval_every: int = option(50, "steps between evaluations (the accuracy curves)")
    circuit_top_k: int = option(4, "heads per circuit (top-k by mean-ablation effect)")
    data_seed: int = option(1234, "seed of every prompt set (each set has its own stream)")

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")

    def held_out(self) -> str:
        """What the ``eval`` and ``hard`` sets are, in words."""
        if self.task == "theory_of_mind":
            return "all three cases / false belief (test split)"
        return f"{self.eval_boxes} boxes / {self.hard_boxes} boxes"

    def make_data(self, tokenizer) -> dict:
        """Training prompts, held-out sets (``eval``, the harder ``hard``; for theory of mind also one per
        case, keyed by the case) and a discovery set.

        Every set is drawn from its own seed stream, so no prompt is shared between them."""
        s = self.data_seed
        if self.task == "theory_of_mind":
            tom = lambda n, seed, **kw: make_task("theory_of_mind", tokenizer, n, seed=seed, **kw)  # noqa: E731
            return {"train": tom(self.n_train, s, split="train"), "eval": tom(self.n_eval, s + 1, split="test"),
                    "hard": tom(self.n_eval, s + 2, split="test", cases=["false_belief"]),
                    "discovery": tom(self.n_discovery, s + 3, split="test"),
                    **{c: tom(self.n_eval, s + 4 + k, split="test", cases=[c]) for k, c in enumerate(CASES)}}
        return {
            "train": make_task("entity_tracking", tokenizer, self.n_train, seed=s, n_boxes=self.train_boxes),
            "eval": make_task("entity_tracking", tokenizer, self.n_eval, seed=s + 1, n_boxes=self.eval_boxes),
            "hard": make_task("entity_tracking", tokenizer, self.n_eval, seed=s + 2, n_boxes=self.hard_boxes),
            "discovery": make_task("entity_tracking", tokenizer, self.n_discovery, seed=s + 3,
                                   n_boxes=self.eval_boxes),
        }
