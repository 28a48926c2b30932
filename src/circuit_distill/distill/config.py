"""``DistillConfig``: everything one distillation run needs, loaded with ``circuit_distill.config.load_config``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Config, option
from ..errors import ConfigError
from .objectives import get_objective
from .trainable import SUBSETS

POSITIONS_HELP = ("'all' (every non-padding token), 'last', the name of a task position, or names comma-separated "
                  "(one row per prompt and position)")
MATCHINGS = ("ablation", "hungarian", "random")  # the matchers the distill command can run
# allowed values of the interchange-intervention options (see distill.iit)
IIT_COUNTERPARTS = ("corrupted", "other", "same_answer", "self")
IIT_BASES = ("counterpart", "train")
IIT_CHOICES = {"iit_counterpart": IIT_COUNTERPARTS, "iit_base": IIT_BASES, "iit_pairs": ("one", "all"),
               "iit_loss": ("kl", "ce")}


@dataclass
class DistillConfig(Config):
    """Everything one distillation run needs (see METHOD.md §1, §4); ``config_help(DistillConfig)`` lists the keys."""

    override_example = "lr=1e-3 or task_options.seq_len=16"

    teacher: str | None = option(None, "teacher model: hub id, local directory or builtin:NAME")
    student: str | None = option(None, "student model (another tokenizer: gold labels, alignment at named positions, no KD)")
    dtype: str = option("float32", "weights of both models as loaded: float32 | bfloat16 | float16")
    task: str | None = option(None, "task name (circuit_distill.tasks.task_names())")
    task_options: dict = option(help="keyword options of the task, e.g. {seq_len: 16}", factory=dict)
    n_train: int = option(512, "training prompts")
    n_eval: int = option(256, "held-out prompts (evaluation and pair CKA)")
    seed: int = option(0, "seed of the data, the batch order, the trainable subset and random pairs")
    objective: str = option("ce+align_cka", "named objective (distill.objectives), e.g. ce, kd, ce+align_cka")
    lam: float = option(1.0, "weight of the alignment term: CE + KD + lam * mean(1 - CKA)")
    temperature: float = option(1.0, "softmax temperature of KD and of the IIT KL")
    positions: str = option("all", f"rows the alignment compares: {POSITIONS_HELP}")
    debiased: bool = option(False, "debiased CKA estimator instead of the biased one")
    align_targets: str = option("paired", "teacher rows each student row aligns with: 'paired' (the same prompt) | "
                                "'shuffled' (another prompt of the batch, same length: the shuffled-example control)")
    labels: str = option("teacher", "CE labels: 'teacher' (teacher argmax) | 'gold'")
    matching: str = option("ablation", f"matcher of the distill command: {' | '.join(MATCHINGS)}")
    component_map: str | None = option(None, "JSON component map to use instead of discovery + matching")
    circuit_size: int = option(8, "heads per circuit the distill command discovers (top-k by ablation)")
    trainable: str = option("matched_heads", f"trained subset: {' | '.join(SUBSETS)}")
    train_kv: bool = option(False, "matched_heads also trains the mapped heads' key/value groups")
    steps: int = option(300, "optimizer steps")
    batch_size: int = option(32, "examples per micro-batch (over all processes)")
    lr: float = option(1e-3, "AdamW learning rate, in (0, 1]")
    warmup: int = option(0, "linear warmup steps (0 = off)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    mixed_precision: str = option("no", "accelerate mixed precision: no | fp16 | bf16")
    eval_every: int = option(50, "evaluate the eval sets every N steps (0 = only at the end)")
    eval_batch_size: int = option(128, "batch size of evaluation, of the teacher cache and of the pair CKA")
    checkpoint_every: int = option(0, "write out_dir/checkpoint.pt every N steps (0 = off)")
    out_dir: str | None = option(None, "output directory (metrics.jsonl, manifest.json, student/); None = no files")
    use_cache: bool = option(True, "precompute the teacher's outputs once (out_dir/teacher_cache)")
    iit_counterpart: str = option("corrupted", "IIT: the prompt each training prompt is interchanged with: "
                                  "corrupted | other | same_answer | self")
    iit_base: str = option("counterpart", "IIT base prompt: counterpart (the training prompt is the source) | train")
    iit_positions: str = option("all", "where IIT intervenes: 'all' or task position names, comma-separated")
    iit_pairs: str = option("one", "pairs IIT intervenes on per step: one (seeded choice) | all (jointly)")
    iit_loss: str = option("kl", "IIT loss: kl (T^2 KL at temperature) | ce (on the teacher's intervened argmax)")
    iit_lam: float = option(1.0, "weight of the IIT term: CE + KD + lam * align + iit_lam * IIT")

    def validate(self) -> None:
        """Check values (already coerced to their types); raise ``ConfigError`` saying what to change."""
        if self.labels not in ("teacher", "gold"):
            raise ConfigError(f"labels must be 'teacher' (teacher argmax) or 'gold', got {self.labels!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.align_targets not in ("paired", "shuffled"):
            raise ConfigError(f"align_targets must be 'paired' or 'shuffled', got {self.align_targets!r}")
        if self.align_targets == "shuffled" and self.batch_size < 2:
            raise ConfigError("align_targets='shuffled' needs batch_size >= 2 (another prompt of the batch)")
        if self.trainable not in SUBSETS:
            raise ConfigError(f"trainable must be one of {', '.join(SUBSETS)}, got {self.trainable!r}")
        if self.matching not in MATCHINGS:
            raise ConfigError(f"matching must be one of {', '.join(MATCHINGS)}, got {self.matching!r}")
        for k in ("steps", "batch_size", "grad_accum", "n_train", "n_eval", "eval_batch_size", "circuit_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("warmup", "eval_every", "checkpoint_every"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0 (0 = off), got {getattr(self, k)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if not 0 < self.lr <= 1:  # (NaN fails every comparison)
            raise ConfigError(f"lr must be in (0, 1] (AdamW moves each trained weight by about lr per step; "
                              f"typical: 1e-4 to 1e-2), got {self.lr}")
        for k in ("temperature", "lam", "weight_decay"):
            v = getattr(self, k)
            if not (math.isfinite(v) and (v > 0 if k == "temperature" else v >= 0)):
                raise ConfigError(f"{k} must be a finite number {'> 0' if k == 'temperature' else '>= 0'}, got {v}")
        if not self.positions:
            raise ConfigError(f"positions must be {POSITIONS_HELP}")
        self.objective = get_objective(self.objective).name
        for key, allowed in IIT_CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")

    def check_train_size(self, n: int) -> None:
        """``ConfigError`` if a batch (``batch_size``) is larger than the ``n`` training examples: it would
        repeat examples within the batch."""
        if self.batch_size > n:
            raise ConfigError(f"batch_size={self.batch_size} is larger than the {n} training examples (each batch "
                              f"would repeat examples ~{self.batch_size / max(n, 1):.0f} times); lower batch_size "
                              "to at most n_train, or raise n_train")
