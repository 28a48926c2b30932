"""Task data with counterfactuals: generators, the registry, the text-to-tensor builder, metrics."""

from .base import Batch, TaskData
from .build import Example, answer_token, build_task_data
from .metrics import METRICS, evaluate, final_logits, per_example, summarise
from .registry import make_task, register_task, task_names, task_vocabulary

__all__ = [
    "METRICS", "Batch", "Example", "TaskData", "answer_token", "build_task_data", "evaluate", "final_logits",
    "make_task", "per_example", "register_task", "summarise", "task_names", "task_vocabulary",
]
