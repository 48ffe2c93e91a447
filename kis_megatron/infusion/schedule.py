"""Infusion schedules and the exact sample plan that follows them.

A schedule gives one domain's infusion ratio r(s) at each optimizer step s (piecewise
constant). With ``B = global_batch`` samples per step, the domain's *target* after n
samples is t(n) = sum over the first n samples of the ratio of the step each belongs to;
in tokens, ``seq_len * t(n)``. The plan decides which source each sample comes from so
that the domain's sample count c(n) stays within one sample of t(n) after *every* sample
(hence after every step), for any number of domains with ratios summing below 1:

  -1 <= c_d(n) - t_d(n) <= 1 - alpha,   alpha = 1 / max(2, D).

How: the k-th sample of domain d is a unit job that may run in sample m once
t_d(m+1) >= k - 1 + alpha (it would not overshoot by more than 1 - alpha) and must run by
its deadline, the last m with t_d(m) <= k (later it would fall behind by more than 1).
Earliest-deadline-first over these jobs, with the general source filling idle samples,
meets every deadline: jobs whose windows fit in any ``l`` consecutive samples number fewer
than sum_d (t_d(b+1) - t_d(a) + alpha) <= l * max_s(sum_d r_d(s)) + 1 < l + 1, Hall's
condition for unit jobs, for which EDF is optimal. With one domain nothing competes and
the plan is Bresenham's rounding, c(n) = floor(t(n) + 1/2), computed in closed form.
Samples are thereby spread through each batch in proportion to the ratio, so every
data-parallel slice of it gets its share.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

from kis_megatron.data.errors import InfusionError

__all__ = ["Schedule", "RatioTargets", "NEVER"]

NEVER = 2**62  # "no deadline": the target never reaches the next unit
_HORIZON = 2**50  # sample counts stay far below 2**53, where floats stop being exact


def _check_ratio(r, where: str) -> float:
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(float(r)):
        raise InfusionError(f"{where}: a ratio must be a number in [0, 1), got {r!r}")
    r = float(r)
    if not 0.0 <= r < 1.0:
        raise InfusionError(f"{where}: ratio {r} is outside [0, 1); it is the fraction of "
                            "training tokens drawn from the domain")
    return r


def _frac_step(frac: float, total_steps: int) -> int:
    """First step s with s >= frac * total_steps, forgiving float noise (0.8 * 1000 = 800)."""
    x = frac * total_steps
    near = round(x)
    return int(near) if abs(x - near) <= 1e-9 * max(1.0, x) else math.ceil(x)


class Schedule:
    """One domain's infusion ratio as a piecewise-constant function of the step.

    Build with ``Schedule.constant(r)``, ``Schedule.window(r, start_frac, end_frac)``
    (ratio r for steps in [start_frac * total_steps, end_frac * total_steps), 0 elsewhere)
    or ``Schedule.piecewise({0: 0.1, 500: 0.3})`` (ratio changes at the given steps, the
    first of which must be 0). The last ratio continues past total_steps.
    """

    def __init__(self, kind: str, ratio: float | None = None, fracs=None, pieces=None):
        self.kind, self.ratio, self.fracs, self._pieces = kind, ratio, fracs, pieces

    @classmethod
    def constant(cls, ratio: float) -> "Schedule":
        """The same ratio at every step."""
        return cls("constant", ratio=_check_ratio(ratio, "constant schedule"))

    @classmethod
    def window(cls, ratio: float, start_frac: float, end_frac: float) -> "Schedule":
        """Ratio r only for steps in [start_frac * total_steps, end_frac * total_steps)."""
        r = _check_ratio(ratio, "window schedule")
        fr = []
        for f, what in ((start_frac, "start_frac"), (end_frac, "end_frac")):
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not math.isfinite(float(f)):
                raise InfusionError(f"window schedule: {what} must be a number in [0, 1], got {f!r}")
            fr.append(float(f))
        if not 0.0 <= fr[0] < fr[1] <= 1.0:
            raise InfusionError(
                f"window schedule: need 0 <= start_frac < end_frac <= 1, got start_frac="
                f"{fr[0]}, end_frac={fr[1]}"
            )
        return cls("window", ratio=r, fracs=tuple(fr))

    @classmethod
    def piecewise(cls, changes) -> "Schedule":
        """Ratios changing at given steps: a mapping or (step, ratio) pairs, steps
        strictly increasing from 0."""
        items = list(changes.items()) if isinstance(changes, Mapping) else list(changes)
        if not items:
            raise InfusionError("piecewise schedule: give at least one (step, ratio), e.g. {0: 0.1}")
        pieces, prev = [], -1
        for item in items:
            if not isinstance(item, Sequence) or len(item) != 2:
                raise InfusionError(f"piecewise schedule: expected (step, ratio) pairs, got {item!r}")
            step, r = item
            if isinstance(step, bool) or not isinstance(step, numbers.Integral):
                raise InfusionError(f"piecewise schedule: step {step!r} is not an integer")
            step = int(step)
            if step < 0:
                raise InfusionError(f"piecewise schedule: step {step} is negative")
            if step <= prev:
                raise InfusionError(
                    f"piecewise schedule: steps must be strictly increasing, got {step} after {prev}"
                )
            pieces.append((step, _check_ratio(r, f"piecewise schedule at step {step}")))
            prev = step
        if pieces[0][0] != 0:
            raise InfusionError(
                f"piecewise schedule: the first step must be 0, got {pieces[0][0]}; add 0: 0.0 "
                "for no infusion before it"
            )
        return cls("piecewise", pieces=tuple(pieces))

    def pieces(self, total_steps: int) -> tuple[tuple[int, float], ...]:
        """(first step, ratio) of each constant piece, starting at step 0."""
        if self.kind == "constant":
            return ((0, self.ratio),)
        if self.kind == "piecewise":
            return self._pieces
        start, end = (_frac_step(f, total_steps) for f in self.fracs)
        if start >= end:
            raise InfusionError(
                f"window schedule [{self.fracs[0]}, {self.fracs[1]}) of {total_steps} steps "
                "holds no step; widen the window or raise total_steps"
            )
        out = [(0, 0.0)] if start > 0 else []
        return tuple(out + [(start, self.ratio), (end, 0.0)])

    def describe(self) -> dict:
        """A JSON-able description (also part of the blender's state fingerprint)."""
        if self.kind == "constant":
            return {"kind": "constant", "ratio": self.ratio}
        if self.kind == "window":
            return {"kind": "window", "ratio": self.ratio, "start_frac": self.fracs[0],
                    "end_frac": self.fracs[1]}
        return {"kind": "piecewise", "pieces": [list(p) for p in self._pieces]}

    def __repr__(self) -> str:
        return f"Schedule({self.describe()})"


class RatioTargets:
    """Cumulative targets t_d(n) of D domains and the sample plan that tracks them.

    t_d is evaluated by one formula, t(n) = cum[p] + r[p] * (n - start[p]) on the piece p
    holding n, in scalar and vector form alike: the same n always gives bit-identical,
    non-decreasing values, so a plan recomputed on another rank or after a resume agrees.
    """

    def __init__(self, schedules: Sequence[Schedule], total_steps: int, global_batch: int):
        self.num_domains = len(schedules)
        self.global_batch = global_batch
        self.alpha = 1.0 / max(2, self.num_domains)
        self._starts, self._ratios, self._cums = [], [], []
        for sch in schedules:
            pieces = sch.pieces(total_steps)
            starts = [s * global_batch for s, _ in pieces]
            ratios = [r for _, r in pieces]
            cums = [0.0]
            for p in range(1, len(pieces)):
                cums.append(cums[-1] + ratios[p - 1] * float(starts[p] - starts[p - 1]))
            self._starts.append(starts)
            self._ratios.append(ratios)
            self._cums.append(cums)
        self._arrays = [(np.asarray(s, dtype=np.int64), np.asarray(r, dtype=np.float64),
                         np.asarray(c, dtype=np.float64))
                        for s, r, c in zip(self._starts, self._ratios, self._cums)]
        self._check_sum(schedules, total_steps)

    def _check_sum(self, schedules, total_steps: int) -> None:
        steps = sorted({s for st in self._starts for s in st})
        for n in steps:
            total = sum(self.ratio_at(d, n) for d in range(self.num_domains))
            if total >= 1.0:
                names = ", ".join(str(s.describe()) for s in schedules)
                raise InfusionError(
                    f"infusion ratios sum to {total:g} >= 1 at step {n // self.global_batch} "
                    f"({names}); the general source needs a positive share: lower the ratios"
                )

    def ratio_at(self, d: int, n: int) -> float:
        """Ratio of domain d for sample n (that of the step holding it)."""
        p = bisect.bisect_right(self._starts[d], n) - 1
        return self._ratios[d][p]

    def target(self, d: int, n: int) -> float:
        """t_d(n): domain d's target sample count after n samples (scalar)."""
        starts = self._starts[d]
        p = bisect.bisect_right(starts, n) - 1
        return self._cums[d][p] + self._ratios[d][p] * float(n - starts[p])

    def targets(self, d: int, n: np.ndarray) -> np.ndarray:
        """t_d(n) for an int64 array of sample counts (same values as ``target``)."""
        starts, ratios, cums = self._arrays[d]
        if len(starts) == 1:  # one piece: skip the search
            return cums[0] + ratios[0] * (n - starts[0]).astype(np.float64)
        p = np.searchsorted(starts, n, side="right") - 1
        return cums[p] + ratios[p] * (n - starts[p]).astype(np.float64)

    def deadline(self, d: int, k: int) -> int:
        """Last sample index m with t_d(m) <= k (NEVER when the target stays <= k)."""
        cums, starts, ratios = self._cums[d], self._starts[d], self._ratios[d]
        p = bisect.bisect_right(cums, k) - 1  # last piece starting at or below k
        last = p == len(starts) - 1  # else t(starts[p + 1]) = cums[p + 1] > k
        if ratios[p] == 0.0:
            return NEVER if last else starts[p + 1] - 1
        gap = (k - cums[p]) / ratios[p]
        if last and gap >= _HORIZON:
            return NEVER  # a tiny ratio: not within any run (and past exact float counts)
        n = starts[p] + int(gap) + 1  # first n with t(n) > k, give or take one
        if not last:
            n = min(n, starts[p + 1])
        while self.target(d, n) <= k:
            n += 1
        while n > 0 and self.target(d, n - 1) > k:
            n -= 1
        return n - 1

    def plan(self, n0: int, count: int, counts: Sequence[int]) -> np.ndarray:
        """Source of samples n0 .. n0+count-1 (0 = general, d + 1 = domain d).

        ``counts`` are the domains' sample counts after n0 samples (the planner's only
        state). Earliest-deadline-first as in the module docstring; raises RuntimeError if
        a deadline were ever missed, which the proof rules out.
        """
        out = np.zeros(count, dtype=np.int64)
        D = self.num_domains
        if D == 0 or count == 0:
            return out
        n = np.arange(n0, n0 + count + 1, dtype=np.int64)
        if D == 1:
            c = np.maximum(np.floor(self.targets(0, n) + 0.5), 0.0).astype(np.int64)
            if c[0] != counts[0]:
                raise RuntimeError(f"planner state {counts[0]} disagrees with the plan {c[0]}")
            out[c[1:] > c[:-1]] = 1
            return out
        t = [self.targets(d, n).tolist() for d in range(D)]
        c = [int(x) for x in counts]
        due = [self.deadline(d, c[d] + 1) for d in range(D)]
        alpha = self.alpha
        for i in range(count):
            best = -1
            for d in range(D):
                if t[d][i + 1] >= c[d] + alpha and (best < 0 or due[d] < due[best]):
                    best = d
            if best < 0:
                continue
            if due[best] < n0 + i:
                raise RuntimeError(f"infusion plan missed a deadline of domain {best} at sample {n0 + i}")
            out[i] = best + 1
            c[best] += 1
            due[best] = self.deadline(best, c[best] + 1)
        return out

    def max_count(self, d: int, n: int) -> int:
        """An upper bound on domain d's sample count after n samples (exact for D == 1)."""
        t = self.target(d, n)
        if self.num_domains == 1:
            return max(0, math.floor(t + 0.5))
        return max(0, math.floor(t + 1.0 - self.alpha))
