"""Discovery stage: ablation (zero/mean/resample, fast sweeps), patching (activation, path,
attribution) and circuits (search, faithfulness, JSON io)."""

from .ablation import (
    ABLATION_METHODS,
    AblationValues,
    LayerReplay,
    SweepResult,
    ablate,
    ablated_logits,
    ablation_sweep,
    ablation_values,
    mean_activations,
)

__all__ = [
    "ABLATION_METHODS", "AblationValues", "LayerReplay", "SweepResult", "ablate", "ablated_logits",
    "ablation_sweep", "ablation_values", "mean_activations",
]
