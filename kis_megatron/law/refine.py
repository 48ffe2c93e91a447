"""Adaptive infusion levels: where the next run of one retention curve tells the most about
its collapse point.

A fixed, log-spaced grid spends most runs on the plateau and the floor, and leaves the fall
between two levels, so the collapse point is placed by the grid rather than measured.
``next_level`` looks at what a curve has measured so far (its collapse point and interval
from ``collapse.detect_collapse``) and proposes one more level:

- a located collapse whose interval is wider than ``target_width`` decades: the geometric
  midpoint of the gap between adjacent measured levels that holds the collapse estimate
  (so the new run lands on the fall, where the curve is least known); when that gap is too
  small to split, the widest other gap that overlaps the interval;
- no fall in the measured range (a lower bound): a level ``extend`` times the largest;
- collapsed already at the smallest level, or falling from it with no plateau measured (an
  upper bound): the smallest over ``extend``;
- otherwise (interval narrow enough, or the gap is too small to split): ``None``.

It is a pure function of the measurements, so a sweep that re-reads its finished runs
proposes the same levels again: refinement resumes like any sweep.
"""

from __future__ import annotations

import math

import numpy as np

from kis_megatron.law.collapse import (AT_START, COLLAPSE, FLOOR_UNOBSERVED, NO_COLLAPSE,
                                      PLATEAU_UNOBSERVED, CollapsePoint)
from kis_megatron.law.table import Curve


def interval_width(point: CollapsePoint) -> float | None:
    """Width of a located collapse point's interval in decades (log10 hi / lo)."""
    if point.status != COLLAPSE or not point.ci:
        return None
    return float(math.log10(point.ci[1] / point.ci[0]))


def _snap(level: float, integer: bool) -> float:
    return float(round(level)) if integer else float(level)


def next_level(curve: Curve, point: CollapsePoint, *, target_width: float = 0.15,
               integer: bool = False, extend: float = 2.0,
               limits: tuple[float, float] = (0.0, math.inf)) -> float | None:
    """One more infusion level for ``curve`` (see the module docstring), or None when the
    curve is measured well enough or cannot be refined further.  ``integer`` rounds levels
    (a number of facts); ``limits`` bounds the levels a run can take (e.g. the facts a
    world holds)."""
    if target_width <= 0 or extend <= 1:
        raise ValueError("target_width must be > 0 and extend > 1")
    levels = np.unique(curve.infusion)
    lo_lim, hi_lim = limits

    def fresh(level: float) -> float | None:
        level = _snap(level, integer)
        if not lo_lim <= level <= hi_lim or level <= 0:
            return None
        if np.any(np.isclose(levels, level, rtol=1e-9, atol=0)):
            return None
        return level

    if point.status in (NO_COLLAPSE, FLOOR_UNOBSERVED):
        return fresh(min(levels[-1] * extend, hi_lim))
    if point.status in (AT_START, PLATEAU_UNOBSERVED):
        return fresh(max(levels[0] / extend, lo_lim))
    if point.status != COLLAPSE:
        return None
    width = interval_width(point)
    if width is not None and width <= target_width:
        return None
    ci_lo, ci_hi = (math.log10(v) for v in point.ci)
    xc = math.log10(point.collapse_infusion)
    x = np.log10(levels)
    gaps = [(x[i] <= xc <= x[i + 1], round(x[i + 1] - x[i], 9), i)
            for i in range(x.size - 1) if x[i + 1] > ci_lo and x[i] < ci_hi]
    # the estimate's own gap first, then the widest (rounded, so equal gaps of a log grid tie
    # and the lower one wins); a gap too small to split is skipped
    for _, _, i in sorted(gaps, key=lambda g: (not g[0], -g[1], g[2])):
        level = fresh(math.sqrt(levels[i] * levels[i + 1]))
        if level is not None and levels[i] < level < levels[i + 1]:
            return level
    # The interval lies outside the measured levels' gaps (it reaches past an end): extend.
    if ci_hi > x[-1]:
        return fresh(min(levels[-1] * extend, hi_lim))
    if ci_lo < x[0]:
        return fresh(max(levels[0] / extend, lo_lim))
    return None
