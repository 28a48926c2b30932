"""circuit-distill: distil mechanisms, not just outputs."""

from .model import (
    Component,
    Model,
    capture,
    intervene,
    load_model,
    parse_components,
    tiny_model,
    word_level_tokenizer,
)
from .tasks import Example, TaskData, evaluate, make_task, register_task
from .version import __version__

__all__ = [
    "Component", "Example", "Model", "TaskData", "__version__", "capture", "intervene", "load_model", "parse_components",
    "evaluate", "make_task", "register_task", "tiny_model", "word_level_tokenizer",
]
