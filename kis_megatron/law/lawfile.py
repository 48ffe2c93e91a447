"""law.json: the one reader and encoder of the file tools/fit_law.py writes (outputs.py builds
its content and writes it last), and the one predictor from it, so that a sweep placing
validation levels predicts exactly what fit_law predicted.

What it keeps to predict again: per fitted form its parameters and reference sizes
(``forms.<name>.state``, forms.Form.state), the selected form (``selected_form``), and the
exposure accounting (``exposure_accounting``: tokens per rendering, the ladder's domain share,
renderings per budget) that turns a target's budget and share into its renderings.  A
law.json of an earlier version (coefficient and exponent only) predicts with the power form.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kis_megatron.errors import KisError
from kis_megatron.law.exposure import ExposureAccounting
from kis_megatron.law.forms import Covariates, Form


LAW_FILE = "law.json"


class LawFileError(KisError, ValueError):
    """law.json is missing or is not one tools/fit_law.py wrote."""


@dataclass
class LawFile:
    path: Path
    doc: dict
    sha256: str

    @property
    def metric(self) -> str | None:
        return self.doc.get("metric")

    @property
    def selected(self) -> str:
        return self.doc.get("selected_form") or "power"

    def _state(self, form: str) -> dict:
        states = self.doc.get("forms")
        if isinstance(states, dict) and isinstance(states.get(form), dict) and "state" in states[form]:
            return states[form]["state"]
        if form != "power":
            raise LawFileError(f"{self.path} holds no fitted {form} form")
        c = self.doc.get("tokens_exponent")
        theta = [math.log10(self.doc["coefficient"]), self.doc["exponent"]] + ([c] if c is not None else [])
        return {"form": "power", "theta": theta, "use_tokens": c is not None,
                "log10_n0": 0.0, "log10_d0": 0.0, "log10_n_range": [0.0, 0.0]}

    def _accounting(self) -> ExposureAccounting | None:
        acc = self.doc.get("exposure_accounting")
        if not isinstance(acc, dict):
            return None
        return ExposureAccounting(
            slope=acc["exposure_slope"], scales=acc["renderings_per_curve"],
            spread=acc["renderings_spread"], tokens_per_rendering=acc["tokens_per_rendering"],
            share=acc["domain_share"], budgets=acc["budgets"],
            budget_scales=acc["renderings_per_budget"])

    def predict(self, n: float, d: float, share: float | None = None, form: str | None = None) -> float:
        """The collapse infusion ``form`` (default: the selected one) predicts for a model of
        ``n`` parameters trained on ``d`` tokens at domain ``share`` (default: the ladder's)."""
        law_form, theta = Form.from_state(self._state(form or self.selected))
        k, slope = None, -1.0
        if law_form.uses_exposures:
            acc = self._accounting()
            if acc is None:
                raise LawFileError(f"{self.path}: the {law_form.name} form needs exposure_accounting")
            k, slope = acc.scale_for(d, share), acc.slope
        cov = Covariates.of(n, d if law_form.use_tokens else None, k, slope)
        return float(10 ** law_form.xc(theta, cov)[0])


def law_bytes(doc: dict, outputs: list[str]) -> bytes:
    """law.json's bytes: ``doc`` listing ``outputs``, the other files of its directory (so a
    later fit into the same directory knows what it may replace)."""
    return (json.dumps({**doc, "outputs": sorted(outputs) + [LAW_FILE]}, indent=2) + "\n").encode()


def holds_law(out: str | Path) -> bool:
    return (Path(out) / LAW_FILE).is_file()


def earlier_outputs(out: str | Path) -> set[str]:
    """The files an earlier fit_law run wrote into ``out`` (from its law.json's list)."""
    try:
        doc = json.loads((Path(out) / LAW_FILE).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(doc, dict):
        return set()
    names = doc.get("outputs") or (["report.md", "table.csv"] + list(doc.get("plots") or []))
    return {n for n in names if isinstance(n, str) and Path(n).name == n}


def read_law(path: str | Path) -> LawFile:
    """law.json and the sha256 of its bytes; LawFileError when it is not a law."""
    path = Path(path)
    if not path.is_file():
        raise LawFileError(f"law file not found: {path} (write it with tools/fit_law.py --out DIR)")
    data = path.read_bytes()
    try:
        doc = json.loads(data)
        a, b, c = doc["coefficient"], doc["exponent"], doc.get("tokens_exponent")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b)) or a <= 0 \
                or not (c is None or isinstance(c, (int, float)) and math.isfinite(c)):
            raise ValueError("coefficient must be > 0, exponent and tokens_exponent finite numbers")
        law = LawFile(path, doc, hashlib.sha256(data).hexdigest())
        law.predict(1e6, 1e9)  # every state it names must predict
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, LawFileError) as e:
        raise LawFileError(f"{path} is not a law.json written by tools/fit_law.py "
                           f"({type(e).__name__}: {e})") from None
    if not np.isfinite(law.predict(1e6, 1e9)):
        raise LawFileError(f"{path}: its selected form predicts no finite collapse point")
    return law
