"""Robustness of a model to single-component ablation (Distilled Circuits, METHOD.md section 2).

- drop ``m = 100 - clamp(retained %, 0, 100)`` with ``retained % = 100 * metric_ablated / metric_clean``
  (an ablation that helps gives 0, one that flips the sign of the metric gives 100);
- mean drop with a seeded 95% percentile-bootstrap CI;
- severity tail ``S = mean_i max(0, (min(L, m_i) - T) / (L - T)) ** alpha`` (L=100, T=20, alpha=1);
- Gini coefficient of the drops; how many components carry 80% of the total influence;
- compression ``C = (P_t - P_s) / P_t`` and brittleness slope ``(student - teacher) / C``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import CircuitDistillError, ConfigError
from ..model.components import Component


def drops(sweep, metric: str = "logit_diff") -> dict[Component, float]:
    """Per-component drop ``m = 100 - clamp(100 * ablated / clean, 0, 100)`` from a ``SweepResult``."""
    if metric not in sweep.clean:
        raise CircuitDistillError(f"metric {metric!r} not in the sweep; it has {', '.join(sweep.clean)}")
    clean = float(sweep.clean[metric])
    if not math.isfinite(clean) or abs(clean) < 1e-12:
        raise CircuitDistillError(f"clean {metric} is {clean}: retained % = 100 * ablated / clean is undefined")
    return {c: drop_from_retained(100.0 * float(v[metric]) / clean) for c, v in sweep.ablated.items()}


def drop_from_retained(retained: float) -> float:
    """``100 - clamp(retained, 0, 100)``; a NaN retained % (undefined metric) counts as a full drop."""
    if math.isnan(retained):
        return 100.0
    return 100.0 - min(100.0, max(0.0, retained))


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 10_000, level: float = 0.95, seed: int = 42,
                 stat=np.mean) -> tuple[float, float]:
    """Percentile-bootstrap CI of ``stat`` of ``values`` (``n_boot`` resamples, ``numpy.default_rng(seed)``)."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ConfigError("bootstrap_ci needs at least one value")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    stats = stat(x[idx], axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return float(lo), float(hi)


def severity(values: Sequence[float], *, threshold: float = 20.0, limit: float = 100.0, alpha: float = 1.0) -> float:
    """Severity tail ``mean_i max(0, (min(limit, m_i) - threshold) / (limit - threshold)) ** alpha``."""
    if limit <= threshold:
        raise ConfigError(f"severity: limit ({limit}) must exceed threshold ({threshold})")
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return 0.0
    w = np.maximum(0.0, (np.minimum(limit, x) - threshold) / (limit - threshold)) ** alpha
    return float(w.mean())


def gini(values: Sequence[float]) -> float:
    """Gini coefficient ``sum_ij |x_i - x_j| / (2 n^2 mean)`` of non-negative values (0 if all are 0)."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return 0.0
    if (x < 0).any():
        raise ConfigError("gini needs non-negative values")
    total = x.sum()
    if total <= 0:
        return 0.0
    x = np.sort(x)
    n = x.size
    # sum_ij |x_i - x_j| = 2 sum_i (2i - n - 1) x_(i) for sorted x, i = 1..n
    i = np.arange(1, n + 1)
    return float(2 * ((2 * i - n - 1) * x).sum() / (2 * n * total))


def n_carrying(values: Mapping[Component, float] | Sequence[float], share: float = 0.8) -> int:
    """Fewest components whose largest values add up to at least ``share`` of the total (0 if it is 0)."""
    x = np.sort(np.asarray(list(values.values()) if isinstance(values, Mapping) else list(values),
                           dtype=np.float64))[::-1]
    total = x.sum()
    if x.size == 0 or total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(x), share * total - 1e-12 * total) + 1)


def compression(params_teacher: int, params_student: int) -> float:
    """``C = (P_t - P_s) / P_t``."""
    if params_teacher <= 0:
        raise ConfigError(f"teacher parameter count must be > 0, got {params_teacher}")
    return (params_teacher - params_student) / params_teacher


def brittleness_slope(student: float, teacher: float, compression_ratio: float) -> float:
    """``(student - teacher) / C``: change of a robustness statistic per unit of compression
    (NaN when ``C`` is 0: a student as large as the teacher has no slope)."""
    if compression_ratio == 0:
        return float("nan")
    return (student - teacher) / compression_ratio


@dataclass
class Robustness:
    """Summary of one model's single-component drops (percentage points)."""

    n: int
    mean_drop: float
    ci_low: float
    ci_high: float
    median_drop: float
    worst_5pct_mean: float
    max_drop: float
    severity: float
    gini: float
    n_over_20: int
    n_over_50: int
    n_carry_80: int
    by_kind: dict

    def to_dict(self) -> dict:
        return asdict(self)


def robustness(drop: Mapping[Component, float], influence: Mapping[Component, float] | None = None, *,
               n_boot: int = 10_000, seed: int = 42, level: float = 0.95) -> Robustness:
    """Summarise per-component ``drop`` values (see ``drops``); ``n_carry_80`` counts the components
    carrying 80% of the total ``influence`` (of the drops when ``influence`` is None)."""
    if not drop:
        raise ConfigError("robustness needs at least one component's drop")
    x = np.asarray(list(drop.values()), dtype=np.float64)
    lo, hi = bootstrap_ci(x, n_boot=n_boot, seed=seed, level=level)
    k = max(1, int(math.ceil(0.05 * x.size)))
    by_kind = {}
    for kind in sorted({c.kind for c in drop}):
        v = [m for c, m in drop.items() if c.kind == kind]
        by_kind[kind] = {"n": len(v), "mean_drop": float(np.mean(v)), "severity": severity(v),
                         "n_over_20": int(sum(m > 20 for m in v))}
    return Robustness(
        n=int(x.size), mean_drop=float(x.mean()), ci_low=lo, ci_high=hi, median_drop=float(np.median(x)),
        worst_5pct_mean=float(np.sort(x)[::-1][:k].mean()), max_drop=float(x.max()), severity=severity(x),
        gini=gini(x), n_over_20=int((x > 20).sum()), n_over_50=int((x > 50).sum()),
        n_carry_80=n_carrying(influence if influence is not None else drop), by_kind=by_kind,
    )
