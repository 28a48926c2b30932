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
from .circuits import KINDS, SEARCH_METHODS, Circuit, faithfulness, find_circuit
from .patching import (
    DIRECTIONS,
    AttributionResult,
    PatchingResult,
    PathPatchingResult,
    activation_patching,
    attribution_patching,
    patched_metric,
    path_patching,
)

__all__ = [
    "DIRECTIONS", "AttributionResult", "PatchingResult", "PathPatchingResult", "activation_patching",
    "attribution_patching", "patched_metric", "path_patching", "KINDS", "SEARCH_METHODS", "Circuit",
    "faithfulness", "find_circuit",
    "ABLATION_METHODS", "AblationValues", "LayerReplay", "SweepResult", "ablate", "ablated_logits",
    "ablation_sweep", "ablation_values", "mean_activations",
]
