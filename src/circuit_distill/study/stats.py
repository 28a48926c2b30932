"""Paired bootstrap confidence intervals over seeds and evaluation prompts.

Two rows of a cell are paired twice: by seed (the same seed gives both the same batch order) and by
prompt (both are evaluated on the same held-out prompts). The gain of row A over row B is the mean of
``diff[s, p] = correct_A[s, p] - correct_B[s, p]`` over seeds ``s`` and prompts ``p``. One bootstrap
resample draws ``S`` seeds and ``P`` prompts with replacement, independently, and takes the mean of
``diff`` over the drawn rows and columns; the CI is the percentile interval of those means
(``numpy.quantile``, linear interpolation). A resample is a pair of count vectors (how often each seed
and each prompt was drawn), so its mean is ``seed_counts @ diff @ prompt_counts / (S * P)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError


@dataclass
class Gain:
    """A mean difference with its percentile-bootstrap CI, and how many seeds and prompts it pairs."""

    mean: float
    ci_low: float
    ci_high: float
    n_seeds: int
    n_prompts: int

    @property
    def excludes_zero(self) -> bool:
        """True if the CI lies wholly above or wholly below 0."""
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict:
        return asdict(self)


def draw_counts(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """``[n_boot, n]`` counts: how often each of ``n`` items is drawn in each of ``n_boot`` resamples of size ``n``."""
    idx = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n), dtype=np.float64)
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    return counts


def resampled_means(diff: np.ndarray, seed_counts: np.ndarray, prompt_counts: np.ndarray) -> np.ndarray:
    """``[n_boot]`` means of ``diff [seeds, prompts]`` over each resample's drawn seeds and prompts."""
    S, P = diff.shape
    return np.einsum("bs,sp,bp->b", seed_counts, diff, prompt_counts) / (S * P)


def paired_gain(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Gain:
    """Gain of ``a`` over ``b`` (each ``[seeds, prompts]``, 0/1 or any score), paired by seed and prompt, with
    a ``level`` percentile-bootstrap CI over seeds and prompts (``n_boot`` resamples, ``default_rng(seed)``)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ConfigError(f"paired_gain needs two [seeds, prompts] arrays of one shape, got {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = resampled_means(diff, draw_counts(rng, n_boot, diff.shape[0]), draw_counts(rng, n_boot, diff.shape[1]))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Gain(float(diff.mean()), float(lo), float(hi), int(diff.shape[0]), int(diff.shape[1]))
