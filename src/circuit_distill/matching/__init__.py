"""Matching stage: pair student circuit components with teacher circuit components.

- ``map``: ``ComponentMap``, the pairs with their distances, quality summary and JSON io;
- ``matchers``: ``match(...)`` by ablation effect (``ablation``, ``hungarian``), activation CKA or at
  random, through the ``MATCHERS`` table;
- ``similar``: the Distilled-Circuits matcher, ``match_components`` over a ``SimilarityTable``;
- ``io``: liberal readers of effects, circuits and activation files;
- ``pipeline``: ``discover_and_match``, both circuits and every matcher's map, each model swept once.
"""

from .io import (
    DEFAULT_METRIC,
    circuit_components,
    circuit_from_obj,
    effects_from_obj,
    load_acts,
    load_circuit,
    load_effects,
)
from .map import ComponentMap
from .matchers import MATCHERS, METHODS, Matcher, MatchProblem, match
from .pipeline import Discovery, MatchedCircuits, discover, discover_and_match
from .similar import DIRECTIONS, Pair, SimilarityTable, match_components

__all__ = [
    "DEFAULT_METRIC", "DIRECTIONS", "Discovery", "MatchedCircuits", "discover", "discover_and_match", "MATCHERS", "METHODS", "ComponentMap", "MatchProblem", "Matcher", "Pair",
    "SimilarityTable", "circuit_components", "circuit_from_obj", "effects_from_obj", "load_acts", "load_circuit",
    "load_effects", "match", "match_components",
]
