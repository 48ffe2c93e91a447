"""The forms of the law: how a collapse point depends on model size N (and token budget D).

At a fixed budget and share, the infused text holds R renderings of facts (R: the
renderings the budget holds), so F facts are each seen E = R / F times; a collapse point in
facts is the number of exposures per fact a model needs, E*(N, D) = R / CP.  The forms:

- ``power``, the paper's law:  CP = a N^b (D^c).  In exposures at one budget it is
  E* = R / (a N^b): the needed exposures fall as N^-b for ever.
- ``floor``:  E* = E_inf + A (N/N0)^-alpha ((D/D0)^-beta).  E_inf = 0 is the paper's law; with
  E_inf > 0 more parameters stop buying fewer exposures and the collapse point saturates at
  CP_max = R / E_inf.
- ``broken``, a smoothly broken power law:  log E* = log A - alpha1 u
  - (alpha2 - alpha1) s log10(1 + 10^((u - u_b) / s)) (- beta log10(D/D0)), u = log10(N/N0):
  slope -alpha1 below the break N_b = N0 10^u_b, -alpha2 above it, over a fixed smoothness
  s = 0.1 decades.  The break is kept inside the ladder's sizes: a break beyond them is not
  measured.

N0, D0 are the geometric means of the ladder's sizes and budgets (they only condition the
fit; the reported A is at N0, D0).

Exposure forms need the exposure scale of every curve: E = K * infusion^s, with s = -1 when
the knob is the number of facts at a fixed share (K = R; ``infusion_kind: domain_facts``).
K of a curve comes from the blender's exposure accounting in the table (the mean exposures
per fact of each run times its facts; ``exposure_scale``); K of a target model is its share
of domain tokens times its budget over the tokens one rendering takes (measured on the
ladder: ``domain_tokens / (exposures * facts)``).  Other knobs (a ratio, a number of domain
tokens) move the exposures of a fixed fact set and the retention of *general* knowledge;
their collapse is not a count of needed exposures, and only the power form is fitted.

Every form maps its parameters theta to x_c = log10 CP per curve with the gradient the joint
fit needs; theta may carry a leading replicate axis (R, k) so that bootstrap replicates are
evaluated at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

LN10 = math.log(10.0)
BREAK_SMOOTHNESS = 0.1  # decades of N over which the broken power law turns
FACTS_KINDS = ("domain_facts",)  # knobs whose exposures per fact are R / infusion


@dataclass(frozen=True)
class Covariates:
    """Per-curve inputs of a form: log10 N, log10 D, log10 K (the exposure scale; NaN when
    not known) and the exposure slope s (E = K * infusion^s)."""

    log_n: np.ndarray
    log_d: np.ndarray
    log_k: np.ndarray
    s: float = -1.0

    @staticmethod
    def of(n, d, k=None, s: float = -1.0) -> "Covariates":
        n = np.atleast_1d(np.asarray(n, dtype=float))
        d = np.broadcast_to(np.asarray(d if d is not None else np.nan, dtype=float), n.shape)
        k = np.broadcast_to(np.asarray(k if k is not None else np.nan, dtype=float), n.shape)
        return Covariates(np.log10(n), np.log10(d), np.log10(k), s)


class Form:
    """Base of the law's forms (see the module docstring)."""

    name = ""
    uses_exposures = True
    formula = ""

    def __init__(self, ladder: Covariates, use_tokens: bool):
        self.use_tokens = use_tokens
        self.n0 = float(np.mean(ladder.log_n))
        self.d0 = float(np.mean(ladder.log_d)) if use_tokens else 0.0
        self.n_range = (float(ladder.log_n.min()), float(ladder.log_n.max()))
        self._set_names()

    # -- per form --------------------------------------------------------------------------
    names: tuple[str, ...] = ()

    def _set_names(self) -> None:
        """The parameter names (and formula) for ``use_tokens``."""
        raise NotImplementedError

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def log_exposures(self, theta, cov: Covariates, grad: bool = False):
        """log10 E* per curve (theta (k,) -> (n,), or (R, k) -> (R, n)); with ``grad`` also
        d log10 E* / d theta, (n, k) (theta (k,) only)."""
        raise NotImplementedError

    def starts(self, cov: Covariates, xc: np.ndarray) -> list[np.ndarray]:
        """Starting parameters from the curves' own collapse points ``xc`` (log10)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def k_n(self) -> int:
        """Parameters of the shape in N (the D term's exponent excluded): the model sizes
        with a located collapse point the form needs."""
        return self.k - (1 if self.use_tokens else 0)

    def xc(self, theta, cov: Covariates, grad: bool = False):
        """log10 CP per curve: (log10 E* - log10 K) / s."""
        if grad:
            le, g = self.log_exposures(theta, cov, grad=True)
            return (le - cov.log_k) / cov.s, g / cov.s
        return (self.log_exposures(theta, cov) - cov.log_k) / cov.s

    def _u(self, cov: Covariates):
        return cov.log_n - self.n0, (cov.log_d - self.d0) if self.use_tokens else np.zeros_like(cov.log_n)

    def describe(self, theta) -> dict:
        """The form's parameters by name (reported values, e.g. A at N0 and N_b in parameters)."""
        return dict(zip(self.names, map(float, theta)))

    def state(self, theta) -> dict:
        """What law.json keeps to predict with this form again (lawfile.py)."""
        return {"form": self.name, "theta": [float(t) for t in theta], "use_tokens": self.use_tokens,
                "log10_n0": self.n0, "log10_d0": self.d0, "log10_n_range": list(self.n_range)}

    @staticmethod
    def from_state(state: dict) -> tuple["Form", np.ndarray]:
        """The form and parameters that ``state`` describes."""
        form = object.__new__(FORMS[state["form"]])
        form.use_tokens = bool(state["use_tokens"])
        form.n0, form.d0 = float(state["log10_n0"]), float(state["log10_d0"])
        form.n_range = tuple(float(v) for v in state["log10_n_range"])
        form._set_names()
        theta = np.asarray(state["theta"], dtype=float)
        if theta.shape != (form.k,):
            raise ValueError(f"{state['form']} takes {form.k} parameters, the state has {theta.size}")
        return form, theta


class PowerForm(Form):
    """CP = a N^b (D^c), the paper's law, in x_c = log10 a + b log10 N (+ c log10 D)."""

    name = "power"
    uses_exposures = False
    formula = "CP = a * N^b"

    def _set_names(self):
        self.names = ("log10_a", "b", "c") if self.use_tokens else ("log10_a", "b")
        if self.use_tokens:
            self.formula = "CP = a * N^b * D^c"

    def bounds(self):
        inf = np.full(self.k, np.inf)
        return -inf, inf

    def _rows(self, cov):
        cols = [np.ones_like(cov.log_n), cov.log_n] + ([cov.log_d] if self.use_tokens else [])
        return np.stack(cols, axis=1)

    def xc(self, theta, cov, grad=False):
        rows = self._rows(cov)
        x = np.asarray(theta) @ rows.T
        return (x, rows) if grad else x

    def log_exposures(self, theta, cov, grad=False):
        x = self.xc(theta, cov)
        return cov.log_k + cov.s * x

    def starts(self, cov, xc):
        coef, *_ = np.linalg.lstsq(self._rows(cov), xc, rcond=None)
        return [coef]

    def describe(self, theta):
        out = {"a": float(10 ** theta[0]), "b": float(theta[1])}
        if self.use_tokens:
            out["c"] = float(theta[2])
        return out


class FloorForm(Form):
    """E* = E_inf + A (N/N0)^-alpha ((D/D0)^-beta); parameters (E_inf, log10 A, alpha[, beta])."""

    name = "floor"
    formula = "E* = E_inf + A * N^-alpha"

    def _set_names(self):
        self.names = ("E_inf", "log10_A", "alpha") + (("beta",) if self.use_tokens else ())
        if self.use_tokens:
            self.formula = "E* = E_inf + A * N^-alpha * D^-beta"

    def bounds(self):
        # alpha >= 0: needed exposures do not grow with size; < 6 keeps the fall finite
        lo = [0.0, -np.inf, 0.0] + ([-3.0] if self.use_tokens else [])
        hi = [np.inf, np.inf, 6.0] + ([3.0] if self.use_tokens else [])
        return np.array(lo), np.array(hi)

    def log_exposures(self, theta, cov, grad=False):
        theta = np.asarray(theta, dtype=float)
        u, v = self._u(cov)
        e_inf, log_a, alpha = theta[..., 0:1], theta[..., 1:2], theta[..., 2:3]
        beta = theta[..., 3:4] if self.use_tokens else 0.0
        t = 10.0 ** (log_a - alpha * u - beta * v)
        total = e_inf + t
        le = np.log10(total)
        if not grad:
            return le
        t, total = t.ravel(), total.ravel()
        share = t / total
        cols = [1.0 / (total * LN10), share, -u * share] + ([-v * share] if self.use_tokens else [])
        return le, np.stack(cols, axis=1)

    def starts(self, cov, xc):
        le = cov.log_k + cov.s * xc  # the curves' own log10 E*
        u, v = self._u(cov)
        e_min = float(10 ** le.min())
        out = []
        for frac in (0.0, 0.5, 0.8, 0.95):
            e_inf = frac * e_min
            y = np.log10(np.maximum(10**le - e_inf, 1e-3 * e_min))
            cols = [np.ones_like(u), -u] + ([-v] if self.use_tokens else [])
            coef, *_ = np.linalg.lstsq(np.stack(cols, axis=1), y, rcond=None)
            out.append(np.array([e_inf, coef[0], coef[1]] + list(coef[2:])))
        return out

    def describe(self, theta):
        out = {"E_inf": float(theta[0]), "A": float(10 ** theta[1]), "alpha": float(theta[2]),
               "N0": float(10**self.n0)}
        if self.use_tokens:
            out.update(beta=float(theta[3]), D0=float(10**self.d0))
        return out


class BrokenForm(Form):
    """log10 E* = log10 A - alpha1 u - (alpha2 - alpha1) s log10(1 + 10^((u - u_b)/s))
    (- beta log10(D/D0)); parameters (log10 A, alpha1, alpha2, u_b[, beta])."""

    name = "broken"
    formula = "E* = A * N^-alpha1, bending to N^-alpha2 above N_b"

    def _set_names(self):
        self.names = ("log10_A", "alpha1", "alpha2", "u_b") + (("beta",) if self.use_tokens else ())

    def bounds(self):
        lo_u, hi_u = (r - self.n0 for r in self.n_range)
        # alpha1, alpha2 >= 0 as the floor's alpha: needed exposures do not grow with size
        lo = [-np.inf, 0.0, 0.0, lo_u] + ([-3.0] if self.use_tokens else [])
        hi = [np.inf, 6.0, 6.0, hi_u] + ([3.0] if self.use_tokens else [])
        return np.array(lo), np.array(hi)

    def log_exposures(self, theta, cov, grad=False):
        theta = np.asarray(theta, dtype=float)
        u, v = self._u(cov)
        log_a, a1, a2, ub = (theta[..., j:j + 1] for j in range(4))
        beta = theta[..., 4:5] if self.use_tokens else 0.0
        s = BREAK_SMOOTHNESS
        z = (u - ub) / s
        soft = np.logaddexp(0.0, z * LN10) / LN10  # log10(1 + 10^z), stable
        le = log_a - a1 * u - (a2 - a1) * s * soft - beta * v
        if not grad:
            return le
        z, soft = z.ravel(), soft.ravel()
        d_a = float(a2[0] - a1[0])
        sig = expit(z * LN10)
        cols = [np.ones_like(u), -u + s * soft, -s * soft, d_a * sig] + ([-v] if self.use_tokens else [])
        return le, np.stack(cols, axis=1)

    def starts(self, cov, xc):
        le = cov.log_k + cov.s * xc
        u, v = self._u(cov)
        lo_u, hi_u = (r - self.n0 for r in self.n_range)
        out = []
        for ub in np.linspace(lo_u, hi_u, 5)[1:-1]:
            below, above = u <= ub, u > ub
            a1 = _slope(u[below], le[below])
            a2 = _slope(u[above], le[above])
            log_a = float(np.mean(le + a1 * u))
            beta = [0.0] if self.use_tokens else []
            out.append(np.array([log_a, np.clip(a1, 0.01, 5.9), np.clip(a2, 0.01, 5.9), ub] + beta))
        return out

    def describe(self, theta):
        out = {"A": float(10 ** theta[0]), "alpha1": float(theta[1]), "alpha2": float(theta[2]),
               "N_b": float(10 ** (theta[3] + self.n0)), "N0": float(10**self.n0)}
        if self.use_tokens:
            out.update(beta=float(theta[4]), D0=float(10**self.d0))
        return out


def _slope(u: np.ndarray, y: np.ndarray) -> float:
    """-(slope of y on u), 0.5 when it cannot be told (fewer than two distinct u)."""
    if np.unique(u).size < 2:
        return 0.5
    return float(-np.polyfit(u, y, 1)[0])


FORMS = {f.name: f for f in (PowerForm, FloorForm, BrokenForm)}
FORM_NAMES = tuple(FORMS)
