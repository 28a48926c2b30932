"""Robustness statistics by hand: drops, bootstrap CI, severity, Gini, 80% carriers, compression, slopes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from circuit_distill.analysis.robustness import (
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
from circuit_distill.discovery.sweep import SweepResult
from circuit_distill.errors import CircuitDistillError, ConfigError
from circuit_distill.model.components import Component

H = Component.make_head
M = Component.make_mlp


def _sweep(clean: float, ablated: dict) -> SweepResult:
    return SweepResult({"logit_diff": clean}, {c: {"logit_diff": v} for c, v in ablated.items()}, "mean", 0.0, 0.0)


def test_drops_clamp_retained_percent():
    sw = _sweep(2.0, {H(0, 0): 1.0, H(0, 1): 3.0, H(1, 0): -2.0, M(0): 2.0, M(1): 0.5})
    d = drops(sw)
    # retained 50% -> 50; 150% (ablation helps) -> 0; -100% (sign flip) -> 100; 100% -> 0; 25% -> 75
    assert d == {H(0, 0): 50.0, H(0, 1): 0.0, H(1, 0): 100.0, M(0): 0.0, M(1): 75.0}
    assert drop_from_retained(float("nan")) == 100.0
    with pytest.raises(CircuitDistillError, match="undefined"):
        drops(_sweep(0.0, {H(0, 0): 1.0}))
    with pytest.raises(CircuitDistillError, match="not in the sweep"):
        drops(sw, "accuracy")


def test_severity_by_hand():
    # weights: 0 -> 0, 20 -> 0, 60 -> 0.5, 100 -> 1, 150 (clipped at 100) -> 1
    assert severity([0, 20, 60, 100, 150]) == pytest.approx((0 + 0 + 0.5 + 1 + 1) / 5)
    assert severity([60], alpha=2) == pytest.approx(0.25)
    assert severity([]) == 0.0
    with pytest.raises(ConfigError):
        severity([1.0], threshold=50, limit=50)


def test_gini_by_hand():
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75)  # sum|xi-xj| = 6; 6 / (2 * 16 * 0.25)
    assert gini([5, 5, 5]) == pytest.approx(0.0)
    assert gini([1, 2, 3]) == pytest.approx(8 / (2 * 9 * 2))  # pairs: 1,2,1 twice -> 8
    assert gini([0, 0]) == 0.0
    x = np.random.default_rng(0).random(37)
    brute = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
    assert gini(x) == pytest.approx(brute)
    with pytest.raises(ConfigError):
        gini([-1, 2])


def test_n_carrying_80_percent():
    assert n_carrying([50, 30, 20]) == 2  # 50 + 30 = 80 exactly
    assert n_carrying([50, 29, 21]) == 3
    assert n_carrying({H(0, 0): 90.0, H(0, 1): 10.0}) == 1
    assert n_carrying([0, 0]) == 0
    assert n_carrying([1, 1, 1, 1, 1], share=0.5) == 3


def test_bootstrap_ci_contains_mean_and_is_seeded():
    x = np.random.default_rng(1).exponential(10, size=60)
    lo, hi = bootstrap_ci(x, n_boot=4000, seed=42)
    assert lo < x.mean() < hi
    assert (lo, hi) == bootstrap_ci(x, n_boot=4000, seed=42)
    assert (lo, hi) != bootstrap_ci(x, n_boot=4000, seed=43)
    lo99, hi99 = bootstrap_ci(x, n_boot=4000, seed=42, level=0.99)
    assert lo99 <= lo and hi <= hi99
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)


def test_compression_and_brittleness():
    c = compression(124, 82)
    assert c == pytest.approx(42 / 124)
    assert brittleness_slope(12.24, 3.06, c) == pytest.approx((12.24 - 3.06) / c)
    assert math.isnan(brittleness_slope(1.0, 0.0, 0.0))
    with pytest.raises(ConfigError):
        compression(0, 1)


def test_robustness_summary():
    d = {H(0, h): float(v) for h, v in enumerate([0, 10, 30, 100])} | {M(0): 60.0}
    r = robustness(d, n_boot=2000)
    assert isinstance(r, Robustness)
    assert r.n == 5 and r.mean_drop == pytest.approx(40.0) and r.median_drop == 30.0
    assert r.ci_low <= r.mean_drop <= r.ci_high
    assert r.max_drop == 100.0 and r.worst_5pct_mean == 100.0
    assert r.n_over_20 == 3 and r.n_over_50 == 2
    assert r.severity == pytest.approx((0 + 0 + 10 / 80 + 1 + 0.5) / 5)
    assert r.gini == pytest.approx(gini([0, 10, 30, 100, 60]))
    assert r.n_carry_80 == n_carrying([0, 10, 30, 100, 60])
    assert r.by_kind["head"]["n"] == 4 and r.by_kind["mlp"]["mean_drop"] == 60.0
    assert set(r.to_dict()) >= {"mean_drop", "ci_low", "ci_high", "severity", "gini"}
