"""The layer every stage stands on: components, architecture specs, loading and hooks."""

from .arch import Arch, FamilySpec, HeadSlices, ParamSlice, register_family
from .components import Component, parse_components
from .hooks import Captured, capture, head_contributions, intervene
from .loading import Model, load_model, self_check, tiny_config, tiny_model
from .tokenizer import word_level_tokenizer

__all__ = [
    "Arch", "Captured", "Component", "FamilySpec", "HeadSlices", "Model", "ParamSlice", "capture",
    "head_contributions", "intervene", "load_model", "parse_components", "register_family", "self_check",
    "tiny_config", "tiny_model", "word_level_tokenizer",
]
