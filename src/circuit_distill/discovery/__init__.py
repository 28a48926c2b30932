"""Discovery stage: ablation values (zero/mean/resample), joint ablation, the layer-replay engine,
single-component sweeps, patching (activation, path, attribution) and circuits (search,
faithfulness, JSON io)."""

from .ablation import ablate, ablated_logits
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
from .progress import progress_bar
from .replay import FINAL_NORMS, LayerReplay, find_final_norm, replay_items, stacked_replacement
from .scoring import metric_means
from .sweep import SweepResult, ablation_sweep, sweep_components
from .values import ABLATION_METHODS, AblationValues, ablatable_components, ablation_values, mean_activations

__all__ = [
    "DIRECTIONS", "AttributionResult", "PatchingResult", "PathPatchingResult", "activation_patching",
    "attribution_patching", "patched_metric", "path_patching", "KINDS", "SEARCH_METHODS", "Circuit",
    "faithfulness", "find_circuit",
    "ABLATION_METHODS", "AblationValues", "LayerReplay", "SweepResult", "ablate", "ablated_logits",
    "ablation_sweep", "ablation_values", "mean_activations", "sweep_components",
    "FINAL_NORMS", "ablatable_components", "find_final_norm", "metric_means", "progress_bar", "replay_items",
    "stacked_replacement",
]
