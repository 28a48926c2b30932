"""Task data with counterfactuals."""

from .base import Batch, TaskData

__all__ = ["Batch", "TaskData"]
