"""Errors that say what was wrong and how to fix it."""


class CircuitDistillError(Exception):
    """Base class of every error raised on purpose by circuit-distill."""


class UnsupportedModelError(CircuitDistillError):
    """The model family has no architecture spec."""


class SelfCheckError(CircuitDistillError):
    """The load-time self-check of an architecture spec failed."""


class ComponentError(CircuitDistillError, ValueError):
    """A component name or address is malformed or out of range."""


class TaskError(CircuitDistillError, ValueError):
    """Task data could not be built (bad options, multi-token answers, malformed input)."""


class ConfigError(CircuitDistillError, ValueError):
    """A configuration key or value is invalid."""


class FastSweepUnsupported(CircuitDistillError):
    """The fast (layer-replay) ablation sweep cannot reproduce this model's logits; use ``fast=False``."""


class PositionError(TaskError, ConfigError):
    """A named token position that the task does not have (a task error and a configuration error)."""


class ModelLoadError(CircuitDistillError):
    """A model could not be found or read (no such directory, hub unreachable, corrupt weights)."""
