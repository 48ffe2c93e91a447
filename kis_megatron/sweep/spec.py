"""The sections of a sweep file, parsed and checked: ``axes`` (named points, or values with a
name and override template), ``refine`` and ``validate``.  Parsing only: configs are resolved
and runs are built in grid.py; refinement and validation run in refine.py and validate.py.
The format is documented in the package docstring (``kis_megatron/sweep/__init__.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from kis_megatron.config import ConfigError


@dataclass(frozen=True)
class Point:
    """One point of an axis: a name (part of the run id) and the overrides it applies.
    ``value`` is set on value axes."""

    name: str
    overrides: dict
    value: float | int | None = None


@dataclass
class Axis:
    """An axis of the grid.  A value axis (``template`` set) can make a point for any value,
    which is how refinement and validation add levels."""

    name: str
    points: list[Point]
    template: ValueTemplate | None = None

    @property
    def is_value_axis(self) -> bool:
        return self.template is not None

    def point(self, value) -> Point:
        if self.template is None:
            raise ConfigError(f"axis '{self.name}' is a list of named points, not a value axis")
        return self.template.point(value)


@dataclass
class ValueTemplate:
    """How a value axis turns a value into a point: ``name`` and string overrides are
    ``str.format`` templates with ``value``; an override that is exactly ``"{value}"``
    becomes the number itself."""

    where: str  # "<sweep file>: axis '<name>'", for messages
    name: str
    overrides: dict
    integer: bool = False

    def typed(self, value):
        """The value as points carry it: an int on an integer axis (rounded), else as given."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self.where}: values must be finite numbers, got {value!r}")
        return int(round(value)) if self.integer else value

    def point(self, value) -> Point:
        value = self.typed(value)
        name = self._format(self.name, value, "name")  # a usable run id: checked in sweep.build_run
        overrides = {}
        for key, tmpl in self.overrides.items():
            if tmpl == "{value}":
                overrides[key] = value
            elif isinstance(tmpl, str):
                overrides[key] = self._format(tmpl, value, f"override {key}")
            else:
                overrides[key] = tmpl
        return Point(name, overrides, value)

    def _format(self, template: str, value, what: str) -> str:
        try:
            return template.format(value=value)
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            hint = " (an integer format such as :04d needs integer: true)" \
                if isinstance(value, float) and isinstance(e, ValueError) else ""
            raise ConfigError(f"{self.where}: {what} template {template!r} cannot format value "
                              f"{value!r}: {type(e).__name__}: {e}{hint}; templates use {{value}}, "
                              "literal braces are doubled") from None


def overrides_mapping(value, where: str) -> dict:
    """Overrides are a mapping of dotted keys to values (``{model.dim: 64}``)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of dotted keys to values, e.g. "
                          f"{{model.dim: 64}}, not a {type(value).__name__}: {value!r}")
    return value


def parse_axis(where: str, axis: str, spec) -> Axis:
    """An axis from its sweep-file form: a list of ``{name, overrides}`` points, or a value
    axis ``{values, name, overrides, integer}``.  ``where`` is the sweep file, for messages."""
    here = f"{where}: axis '{axis}'"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: axis '{axis}' must be a non-empty list")
        points = []
        for p in spec:
            if not isinstance(p, dict) or "name" not in p or set(p) - {"name", "overrides"}:
                raise ConfigError(f"{where}: axis '{axis}': each point is {{name: ..., overrides: {{...}}}}, got {p!r}")
            if isinstance(p["name"], bool) or not isinstance(p["name"], (str, int, float)):
                raise ConfigError(f"{where}: axis '{axis}': a point's name must be a string, got {p['name']!r}")
            overrides = overrides_mapping(p.get("overrides"), f"{where}: axis '{axis}', point {p['name']!r}: overrides")
            points.append(Point(str(p["name"]), overrides))
        return Axis(axis, points)
    if not isinstance(spec, dict):
        raise ConfigError(f"{here} must be a non-empty list of points or a mapping with 'values'")
    unknown = set(spec) - {"values", "name", "overrides", "integer"}
    if unknown:
        raise ConfigError(f"{here}: unknown keys {sorted(unknown)}; a value axis has values, name, "
                          "overrides, integer")
    values = spec.get("values")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{here}: a value axis needs a non-empty list 'values'")
    name = spec.get("name", f"{axis}{{value}}")
    overrides = overrides_mapping(spec.get("overrides"), f"{here}: overrides")
    integer = spec.get("integer", False)
    if not isinstance(name, str) or "{" not in name:
        raise ConfigError(f"{here}: 'name' must be a template string with {{value}}, got {name!r}")
    if not isinstance(integer, bool):
        raise ConfigError(f"{here}: 'integer' must be true or false, got {integer!r}")
    template = ValueTemplate(here, name, dict(overrides), integer)
    points, names = [], {}
    for v in values:
        p = template.point(v)
        if p.name in names:
            raise ConfigError(f"{here}: values {names[p.name]!r} and {v!r} both give the point name "
                              f"{p.name!r}; remove one or make the name template tell them apart")
        names[p.name] = v
        points.append(p)
    return Axis(axis, points, template)


def _number(where: str, key: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise ConfigError(f"{where}: '{key}' must be a {'positive ' if positive else ''}number, got {value!r}")
    return float(value)


@dataclass
class RefineSpec:
    """The ``refine:`` section (see sweep.py)."""

    axis: str
    metric: str = "retention/domain"
    chance: float | str | None = None  # a number, "auto" (the logged chance) or None (fitted)
    target_width: float = 0.15  # decades
    max_runs: int = 8
    limits: tuple[float, float] = (0.0, math.inf)
    seed_axis: str | None = None


def parse_refine(where: str, doc, axes: dict[str, Axis]) -> RefineSpec:
    here = f"{where}: refine"
    if not isinstance(doc, dict):
        raise ConfigError(f"{here} must be a mapping (axis, metric, chance, target_width, max_runs, limits, seed_axis)")
    unknown = set(doc) - {"axis", "metric", "chance", "target_width", "max_runs", "limits", "seed_axis"}
    if unknown:
        raise ConfigError(f"{here}: unknown keys {sorted(unknown)}; use axis, metric, chance, "
                          "target_width, max_runs, limits, seed_axis")
    axis = doc.get("axis")
    if axis not in axes or not axes[axis].is_value_axis:
        raise ConfigError(f"{here}: 'axis' must name a value axis (one written with values:), got {axis!r}")
    if any(p.value <= 0 for p in axes[axis].points):
        raise ConfigError(f"{here}: the values of axis '{axis}' must be > 0 (collapse is located on a log scale)")
    spec = RefineSpec(axis=axis)
    metric = doc.get("metric", spec.metric)
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{here}: 'metric' must be a metric name such as retention/domain")
    spec.metric = metric
    chance = doc.get("chance")
    if chance is not None and chance != "auto":
        chance = _number(here, "chance", chance)
    spec.chance = chance
    spec.target_width = _number(here, "target_width", doc.get("target_width", spec.target_width), positive=True)
    max_runs = doc.get("max_runs", spec.max_runs)
    if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 0:
        raise ConfigError(f"{here}: 'max_runs' must be an integer >= 0, got {max_runs!r}")
    spec.max_runs = max_runs
    if doc.get("limits") is not None:
        lim = doc["limits"]
        if not isinstance(lim, list) or len(lim) != 2:
            raise ConfigError(f"{here}: 'limits' must be [low, high], got {lim!r}")
        lo, hi = (_number(here, "limits", v) for v in lim)
        if not 0 <= lo < hi:
            raise ConfigError(f"{here}: 'limits' must satisfy 0 <= low < high, got {lim!r}")
        spec.limits = (lo, hi)
    seed_axis = doc.get("seed_axis")
    if seed_axis is not None and (seed_axis not in axes or seed_axis == axis):
        raise ConfigError(f"{here}: 'seed_axis' must name another axis of the sweep, got {seed_axis!r}")
    spec.seed_axis = seed_axis
    return spec


@dataclass
class ValidateSpec:
    """The ``validate:`` section (see sweep.py)."""

    model: Point
    out: Path
    model_axis: str = "model"
    axis: str = ""  # the infusion axis whose levels are generated (default: refine's axis)
    levels: int = 5
    spacing: float = 0.2  # decades
    refine_runs: int | None = None  # extra runs for the validation curve (None: refine's max_runs)
    seeds: list[int] | None = None  # train.seed of every validation level (a seed axis of its own)


def parse_validate(where: str, doc, axes: dict[str, Axis], refine: RefineSpec | None, out: Path) -> ValidateSpec:
    here = f"{where}: validate"
    if not isinstance(doc, dict):
        raise ConfigError(f"{here} must be a mapping (model, model_axis, axis, levels, spacing, "
                          "refine_runs, out)")
    unknown = set(doc) - {"model", "model_axis", "axis", "levels", "spacing", "refine_runs", "out", "seeds"}
    if unknown:
        raise ConfigError(f"{here}: unknown keys {sorted(unknown)}; use model, model_axis, axis, "
                          "levels, spacing, refine_runs, seeds, out")
    seeds = doc.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"{here}: 'seeds' must be a list of distinct integers >= 0 (train.seed of "
                              f"each validation run), got {seeds!r}")
        if refine is not None and refine.seed_axis is not None:
            raise ConfigError(f"{here}: 'seeds' and refine's seed_axis {refine.seed_axis!r} both set the "
                              "seeds; keep one")
    refine_runs = doc.get("refine_runs")
    if refine_runs is not None and (isinstance(refine_runs, bool) or not isinstance(refine_runs, int)
                                    or refine_runs < 0):
        raise ConfigError(f"{here}: 'refine_runs' must be an integer >= 0, got {refine_runs!r}")
    model = doc.get("model")
    if not isinstance(model, dict) or "name" not in model or set(model) - {"name", "overrides"}:
        raise ConfigError(f"{here}: 'model' is one point {{name: ..., overrides: {{...}}}}, got {model!r}")
    overrides = overrides_mapping(model.get("overrides"), f"{here}: model: overrides")
    model_axis = doc.get("model_axis", "model")
    if model_axis not in axes:
        raise ConfigError(f"{here}: 'model_axis' {model_axis!r} is not an axis of the sweep "
                          f"(axes: {', '.join(axes)})")
    axis = doc.get("axis", refine.axis if refine else None)
    if axis is None:
        raise ConfigError(f"{here}: say which axis holds the infusion levels: 'axis', or a refine: section")
    if axis not in axes or not axes[axis].is_value_axis or axis == model_axis:
        raise ConfigError(f"{here}: 'axis' must name a value axis other than the model axis, got {axis!r}")
    levels = doc.get("levels", 5)
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ConfigError(f"{here}: 'levels' must be an integer >= 1, got {levels!r}")
    spacing = _number(here, "spacing", doc.get("spacing", 0.2), positive=True)
    vout = Path(doc["out"]) if doc.get("out") is not None else Path(f"{out}_validate")
    a, b = vout.resolve(), out.resolve()
    if a == b or b in a.parents or a in b.parents:
        raise ConfigError(f"{here}: 'out' ({vout}) must be a directory apart from the ladder's out ({out}), "
                          "so that the ladder's runs and the validation runs never mix")
    point = Point(str(model["name"]), dict(overrides))
    return ValidateSpec(model=point, out=vout, model_axis=model_axis, axis=axis, levels=levels,
                        spacing=spacing, refine_runs=refine_runs, seeds=seeds)
