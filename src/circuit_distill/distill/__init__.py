"""distill stage: its config, losses, objectives, trainable subsets, the teacher cache and the trainer."""

from .cache import TeacherCache, build_cache
from .config import DistillConfig
from .features import pair_cka
from .trainer import DistillResult, NonFiniteLossError, distill

__all__ = ["DistillConfig", "DistillResult", "NonFiniteLossError", "TeacherCache", "build_cache", "distill", "pair_cka"]
