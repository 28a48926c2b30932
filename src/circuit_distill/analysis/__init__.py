"""Analysis stage: teacher/student circuit comparison (influence, similarity, matching, the
influence-weighted alignment score), robustness to single-component ablation, and the HTML report."""

from .alignment import (
    Pair,
    SimilarityTable,
    align,
    alignment_score,
    attention_patterns,
    check_same_tokens,
    component_outputs,
    influence,
    layer_cka,
    match_components,
    principal_subspace,
    rowwise_cosine,
    similarity_table,
    subspace_similarity,
)
from .compare import Comparison, compare
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
    "Comparison", "Pair", "Robustness", "SimilarityTable", "align", "alignment_score", "attention_patterns",
    "bootstrap_ci", "brittleness_slope", "check_same_tokens", "compare", "component_outputs", "compression",
    "drop_from_retained", "drops", "gini", "influence", "layer_cka", "match_components", "n_carrying",
    "principal_subspace", "robustness", "rowwise_cosine", "severity", "similarity_table", "subspace_similarity",
]
