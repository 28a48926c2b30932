"""circuit-distill: distil mechanisms, not just outputs."""

from importlib.metadata import PackageNotFoundError, version

from .model import (
    Component, Model, capture, intervene, load_model, parse_components, tiny_model, word_level_tokenizer,
)

try:
    __version__ = version("circuit-distill")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Component", "Model", "__version__", "capture", "intervene", "load_model", "parse_components",
    "tiny_model", "word_level_tokenizer",
]
