"""Simulated ladders with a known law, to test the law tools where the truth is known.

A ladder is a set of retention curves, one per model size N (and token budget D), whose
collapse points follow CP = a * N^b * D^c exactly.  Each curve is the step the detector
fits (plateau, chance floor, width in decades of infusion), and each run's retention is a
multiple-choice accuracy over ``min(level, probe_cap)`` probes (one probe per fact when the
infusion is a number of facts), drawn from the binomial, optionally with run-to-run noise on
the logit scale (``seed_sd``, as between training seeds).  The defaults mirror the tiny CPU
ladder (examples/tiny_ladder): its four sizes, a 5.6x larger held-out size, levels of
domain facts, plateaus near 1 and falls 0.08-0.2 decades wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, logit

from kis_megatron.law.table import Curve


@dataclass(frozen=True)
class LadderSpec:
    sizes: tuple[float, ...] = (57504.0, 155968.0, 295392.0, 524928.0)
    heldout: float = 1_030_000.0
    tokens: tuple[float, ...] = (614400.0,)
    b: float = 0.3
    c: float = 0.0
    cp_smallest: float = 80.0  # CP of the smallest size at the first budget (sets a)
    levels: tuple[float, ...] = (32, 64, 128, 256, 512, 1024)
    plateau: tuple[float, float] = (0.9, 1.0)
    width: tuple[float, float] = (0.08, 0.2)
    chance: float = 0.2
    probe_cap: int = 256
    seeds: int = 1
    seed_sd: float = 0.0
    metric: str = "retention/domain"

    @property
    def a(self) -> float:
        return self.cp_smallest / (self.sizes[0] ** self.b * self.tokens[0] ** self.c)

    def true_cp(self, n, d=None) -> np.ndarray:
        d = self.tokens[0] if d is None else d
        return self.a * np.asarray(n, dtype=float) ** self.b * np.asarray(d, dtype=float) ** self.c


@dataclass
class TrueCurve:
    """One curve's ground truth; ``measure`` draws runs of it."""

    model_params: float
    tokens: float
    cp: float
    plateau: float
    width: float
    spec: LadderSpec = field(repr=False)

    def retention(self, level) -> np.ndarray:
        x = np.log10(np.asarray(level, dtype=float))
        s = self.spec
        return s.chance + (self.plateau - s.chance) * expit(-(x - math.log10(self.cp)) / self.width)

    def measure(self, levels, rng: np.random.Generator, seeds: int | None = None) -> list[dict]:
        """Table rows of ``seeds`` runs at each level."""
        s = self.spec
        rows = []
        for level in np.atleast_1d(levels):
            n_probes = int(min(level, s.probe_cap)) if s.probe_cap else 256
            p0 = float(np.clip(self.retention(level), 1e-6, 1 - 1e-6))
            for seed in range(s.seeds if seeds is None else seeds):
                p = float(expit(logit(p0) + s.seed_sd * rng.standard_normal())) if s.seed_sd else p0
                rows.append({
                    "model_params": self.model_params, "tokens": self.tokens,
                    "infusion": float(level), "metric": s.metric,
                    "value": rng.binomial(n_probes, p) / n_probes, "seed": seed, "n_probes": n_probes,
                    "run_id": f"n{self.model_params:g}-d{self.tokens:g}-x{level:g}-s{seed}",
                })
        return rows


def draw_truth(spec: LadderSpec, rng: np.random.Generator, sizes=None) -> list[TrueCurve]:
    """One ladder's true curves (plateau and width drawn per curve)."""
    curves = []
    for d in spec.tokens:
        for n in (spec.sizes if sizes is None else sizes):
            curves.append(TrueCurve(float(n), float(d), float(spec.true_cp(n, d)),
                                    float(rng.uniform(*spec.plateau)),
                                    float(rng.uniform(*spec.width)), spec))
    return curves


def simulate_rows(spec: LadderSpec, rng: np.random.Generator) -> tuple[list[dict], list[TrueCurve]]:
    """Rows of a whole ladder on the spec's fixed levels, and its true curves."""
    truth = draw_truth(spec, rng)
    rows = [r for t in truth for r in t.measure(spec.levels, rng)]
    return rows, truth


def rows_to_curve(rows: list[dict]) -> Curve:
    r0 = rows[0]
    x = np.array([r["infusion"] for r in rows], dtype=float)
    y = np.array([r["value"] for r in rows], dtype=float)
    k = np.array([r["n_probes"] for r in rows], dtype=float)
    order = np.argsort(x, kind="stable")
    return Curve(r0["model_params"], r0["tokens"], x[order], y[order], k[order])
