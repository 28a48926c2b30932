"""distill stage: losses, objectives, trainable subsets, the teacher cache and the trainer."""

from .cache import TeacherCache, build_cache
from .trainer import DistillResult, NonFiniteLossError, distill

__all__ = ["DistillResult", "NonFiniteLossError", "TeacherCache", "build_cache", "distill"]
