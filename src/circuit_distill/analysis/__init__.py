"""Analysis stage: teacher/student circuit comparison (influence, similarity tables, the
influence-weighted alignment score; across tokenizers at named positions, with control pairs), robustness to single-component ablation, and the HTML report.
The matcher it uses (``match_components``, ``Pair``) lives in ``circuit_distill.matching``; the
similarity measures in ``circuit_distill.similarity``; attention patterns in ``circuit_distill.model.attention``."""

from .alignment import (
    align,
    alignment_score,
    check_same_tokens,
    influence,
    layer_cka,
    similarity_table,
)
from .compare import Comparison, compare
from .controls import CONTROLS, control_comparisons, control_copy
from .named import (
    check_same_prompts,
    debiased_cka_table,
    named_attention,
    named_layer_cka,
    named_outputs,
    named_similarity_table,
    named_task_pair,
    shared_positions,
)
from .robustness import (
    Robustness,
    bootstrap_ci,
    brittleness_slope,
    compression,
    drop_from_retained,
    drops,
    gini,
    n_carrying,
    robustness,
    severity,
)

__all__ = [
    "CONTROLS", "check_same_prompts", "control_comparisons", "control_copy", "debiased_cka_table",
    "named_attention", "named_layer_cka", "named_outputs", "named_similarity_table", "named_task_pair",
    "shared_positions",
    "Comparison", "Robustness", "align", "alignment_score", "bootstrap_ci", "brittleness_slope",
    "check_same_tokens", "compare", "compression", "drop_from_retained", "drops", "gini", "influence",
    "layer_cka", "n_carrying", "robustness", "severity", "similarity_table",
]
