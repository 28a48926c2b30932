"""circuit-distill: distil mechanisms, not just outputs."""

from importlib.metadata import PackageNotFoundError, version

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

try:
    __version__ = version("circuit-distill")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Component", "Example", "Model", "TaskData", "__version__", "capture", "intervene", "load_model", "parse_components",
    "evaluate", "make_task", "register_task", "tiny_model", "word_level_tokenizer",
]
