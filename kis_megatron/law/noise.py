"""The noise of a measured accuracy, for parametric bootstraps.

An accuracy over k probes is binomial around the model's true accuracy p when the training
run is fixed.  Between training runs (seeds, and runs at other infusion levels, which see
other data) the true accuracy itself moves, and it moves on the logit scale: a run is a
little better or worse at every fact, so a plateau near 1 or a floor near chance barely
moves while the middle of the fall moves most.  The model: logit(p_run) = logit(p) + s z,
z ~ N(0, 1), then binomial over the probes; its variance is about
p (1 - p) / k + (p (1 - p))^2 s^2.

s is estimated by moments from a fit's residuals, pooled over curves:
s^2 = sum((y - p)^2 - p (1 - p) / k) / sum((p (1 - p))^2), scaled by n / (n - P) for the P
fitted parameters, and at least 0 (never narrower than the probes alone).  Measured on the
tiny ladder (benchmarks/RESULTS.md), the run-to-run spread is far beyond the probes', which
is why a curve's collapse interval cannot come from its probes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit, logit


def clip_accuracy(p: np.ndarray, k: np.ndarray) -> np.ndarray:
    """p kept half a probe away from 0 and 1 (a fitted 1.0 would make the variance 0)."""
    return np.clip(p, 0.5 / k, 1.0 - 0.5 / k)


@dataclass(frozen=True)
class SpreadSums:
    """The sums behind the moment estimate of s (module docstring), to pool over curves."""

    excess: float = 0.0  # sum((y - p)^2 - p (1 - p) / k)
    weight: float = 0.0  # sum((p (1 - p))^2)
    n: int = 0
    params: int = 0

    @staticmethod
    def of(y: np.ndarray, p: np.ndarray, k: np.ndarray, params: int) -> "SpreadSums":
        p = clip_accuracy(p, k)
        v = p * (1.0 - p)
        return SpreadSums(float(np.sum((y - p) ** 2 - v / k)), float(np.sum(v**2)), int(y.size), params)

    def __add__(self, other: "SpreadSums") -> "SpreadSums":
        return SpreadSums(self.excess + other.excess, self.weight + other.weight,
                          self.n + other.n, self.params + other.params)


def run_spread(sums: SpreadSums) -> float:
    """s, the run-to-run spread on the logit scale (module docstring)."""
    if sums.weight <= 0 or sums.n <= sums.params:
        return 0.0
    return float(np.sqrt(max(sums.excess, 0.0) / sums.weight * sums.n / (sums.n - sums.params)))


def redraw(rng: np.random.Generator, p: np.ndarray, k: np.ndarray, spread: float) -> np.ndarray:
    """One replicate of the accuracies: each run's true accuracy moved by ``spread`` on the
    logit scale, then binomial over its ``k`` probes."""
    p = clip_accuracy(p, k)
    if spread > 0:
        p = expit(logit(p) + spread * rng.standard_normal(p.shape))
    return rng.binomial(np.round(k).astype(np.int64), p) / k
