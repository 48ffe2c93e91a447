"""How much to infuse into a target model: the answer users act on.

For a target (N, D, domain share s), the largest infusion whose predicted retention stays at
or above ``q`` of the plateau (default 0.9) with the stated one-sided confidence:

- the predicted collapse point x_c = log10 CP(N, D) of every credible form (select.py), per
  bootstrap replicate of its joint fit;
- the fall's shape of the ladder curve nearest the target (the largest size at the nearest
  budget; larger models fall more sharply, so the largest is the nearest shape): its width w
  and plateau P in the same replicate, the floor F the chance level.  Retention is at least
  q P where sigmoid >= (q P - F) / (P - F) = sigma_q, at
  x_q = x_c + w (ln((1 - sigma_q) / sigma_q) - ln((1 - f) / f));
- the recommendation is 10^x_q at the (1 - confidence) quantile of the replicates, the
  lowest over the credible forms (the model-form doubt counts against the user); its
  central value is the selected form's, its interval spans the credible forms.

In facts at that share; equivalently the exposures per fact a fact set must get (R / facts,
R = s D / t the renderings the target's budget holds, exposure.py), and the domain tokens
s D.  ``supported`` is false outside the support of the law (regime.py), in particular beyond
the largest fitted size once a validation has failed, and the reason says by how much the
law missed.
"""

from __future__ import annotations

import math

import numpy as np

from kis_megatron.law.select import Selection
from kis_megatron.law.table import LawInputError


def parse_recommend(text: str) -> tuple[float, float, float | None]:
    """'N,D[,share]' -> (N, D, share or None)."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise LawInputError(f"--recommend takes N,D[,share] as numbers (e.g. 7e9,1.4e11,0.1), got {text!r}") from None
    if len(vals) not in (2, 3) or not all(math.isfinite(v) and v > 0 for v in vals):
        raise LawInputError(f"--recommend takes N,D[,share], each > 0, got {text!r}")
    if len(vals) == 3 and not vals[2] <= 1.0:
        raise LawInputError(f"--recommend: the domain share is a fraction in (0, 1], got {vals[2]:g}")
    return vals[0], vals[1], (vals[2] if len(vals) == 3 else None)


def _offset(width, plateau, floor, q: float, fraction: float):
    """x_q - x_c for a step of ``width``, ``plateau`` and ``floor`` (module docstring)."""
    sigma = np.clip((q * plateau - floor) / np.maximum(plateau - floor, 1e-9), 1e-6, 1 - 1e-6)
    return width * (np.log((1 - sigma) / sigma) - math.log((1 - fraction) / fraction))


def _nearest_shape(law, n: float, d: float | None):
    """Index of the fitted curve whose fall stands in for the target's."""
    shapes = law.curve_shapes
    budgets = np.array([c.tokens for c in shapes.curves])
    d_near = budgets[np.argmin(np.abs(np.log(budgets / d)))] if d is not None else budgets.max()
    at = [i for i, c in enumerate(shapes.curves) if c.tokens == d_near]
    return max(at, key=lambda i: shapes.curves[i].model_params)


def recommend(selection: Selection, n: float, d: float, share: float | None, *, q: float = 0.9,
              fraction: float = 0.5, chance: float | None = None) -> dict:
    """The recommendation for one target (module docstring); ``supported`` is filled in by
    the caller, which knows the validation."""
    if not 0.0 < q < 1.0:
        raise LawInputError(f"--retain must be in (0, 1), got {q:g}")
    law = selection.law
    conf = law.confidence
    one_sided = 1.0 - conf
    per_form = {}
    reps_all = selection.log10_replicates(n, d, share)
    for name, (xc, reps) in reps_all.items():
        f_law = selection.fits[name].law
        shapes = f_law.curve_shapes
        i = _nearest_shape(f_law, n, d)
        floor = chance if chance is not None else shapes.floor[i]
        boot_floor = chance if chance is not None else shapes.boot_floor[:, i]
        x_q = xc + float(_offset(shapes.width[i], shapes.plateau[i], floor, q, fraction))
        xq_reps = reps + _offset(shapes.boot_width[:, i], shapes.boot_plateau[:, i], boot_floor, q, fraction)
        alpha = (1.0 - conf) / 2
        lo2, hi2 = np.quantile(xq_reps, [alpha, 1 - alpha])
        per_form[name] = {"facts": 10**x_q, "lower": float(10 ** np.quantile(xq_reps, one_sided)),
                          "interval": [float(10**lo2), float(10**hi2)],
                          "shape_of": shapes.curves[i].model_params, "width": float(shapes.width[i])}
    facts = min(f["lower"] for f in per_form.values())
    k = selection.scale(d, share)
    acc = selection.accounting
    s = share if share is not None else (acc.share if acc is not None else None)
    out = {
        "target": {"model_params": n, "tokens": d, "share": s},
        "q": q, "confidence": conf,
        "facts": math.floor(facts),
        "facts_central": per_form[selection.selected]["facts"],
        "interval": [min(f["interval"][0] for f in per_form.values()),
                     max(f["interval"][1] for f in per_form.values())],
        "form": selection.selected,
        "per_form": per_form,
        "renderings": k,
        "exposures_per_fact": (k / math.floor(facts)) if k is not None and facts >= 1 else None,
        "domain_tokens": (s * d) if s is not None else None,
        "tokens_per_rendering": acc.tokens_per_rendering if acc is not None else None,
    }
    return out
