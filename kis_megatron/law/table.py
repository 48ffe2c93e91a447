"""The tidy measurement table that the law tools read and write.

One row per measurement: a metric (e.g. ``retention/domain``) of one run of one model size
(``model_params``) and token budget (``tokens``) at one infusion amount (``infusion``).
The five columns ``model_params, tokens, infusion, metric, value`` are all that fitting
needs, so tables written by other frameworks work too; ``run_id``, ``step``, ``exposures``
(mean exposures per domain fact), ``infusion_kind`` (which knob the study varied) and
``seed`` are provenance; ``n_probes`` (how many probes an accuracy was scored on) lets the
joint fit model each measurement's binomial noise; ``exposures`` with ``domain_tokens`` (the
run's domain tokens, over the whole run) are the exposure accounting of the exposure forms
(forms.py, exposure.py).

``tokens`` is the run's token budget, not the tokens seen so far in a noisy count: runs of
one budget must carry the same value, because collapse curves are grouped by
(model_params, tokens).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass

import numpy as np

from kis_megatron.errors import KisError
from kis_megatron.utils import atomic_write_bytes, atomic_write_text

REQUIRED_COLUMNS = ("model_params", "tokens", "infusion", "metric", "value")
COLUMNS = REQUIRED_COLUMNS + ("run_id", "step", "exposures", "infusion_kind", "seed", "n_probes",
                              "domain_tokens")
_NUMERIC = {"model_params", "tokens", "infusion", "value", "step", "exposures", "seed", "n_probes",
            "domain_tokens"}


class LawInputError(KisError, ValueError):
    """Input a user can fix (bad table, bad run directory, bad option); the CLIs print it
    as ``error: ...`` and exit 2."""


@dataclass
class Curve:
    """All measurements of one metric for one (model size, token budget): the retention
    curve whose collapse point is detected.  Repeated infusion values are seeds."""

    model_params: float
    tokens: float
    infusion: np.ndarray  # (n,) > 0
    value: np.ndarray  # (n,)
    n_probes: np.ndarray | None = None  # (n,) probes behind each value, when known
    exposures: np.ndarray | None = None  # (n,) mean exposures per domain fact, when logged
    domain_tokens: np.ndarray | None = None  # (n,) domain tokens each run trained on, when logged
    seeds: np.ndarray | None = None  # (n,) each run's training seed, when known

    def exposures_at(self, infusion: float) -> float | None:
        """Mean exposures per fact at ``infusion``, interpolated in log-log between the
        measured levels (None when not logged or outside the levels)."""
        if self.exposures is None or not self.infusion[0] <= infusion <= self.infusion[-1]:
            return None
        x, inv = np.unique(np.log10(self.infusion), return_inverse=True)
        e = np.bincount(inv, weights=np.log10(self.exposures)) / np.bincount(inv)
        return float(10 ** np.interp(np.log10(infusion), x, e))

    @property
    def label(self) -> str:
        return f"N={self.model_params:.4g}, D={self.tokens:.4g}"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        v = float(v)  # numpy scalars would print as np.float64(...)
        if math.isnan(v):
            return "nan"
        return repr(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v)


def write_table(rows: list[dict], path: str) -> None:
    """Write rows to ``path`` atomically: CSV, or Parquet when the name ends in .parquet
    (needs pyarrow).  Extra keys beyond COLUMNS are appended as further columns."""
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    columns = list(COLUMNS) + extra
    if path.endswith(".parquet"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise LawInputError(
                f"writing {path} needs pyarrow (pip install pyarrow); or give a .csv name"
            ) from None
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        return
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    atomic_write_text(path, buf.getvalue())


def _parse(column: str, text: str, where: str):
    if column not in _NUMERIC:
        return text
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise LawInputError(f"{where}: column {column!r} has non-numeric value {text!r}") from None


def read_table(path: str) -> list[dict]:
    """Read a measurement table (CSV, or Parquet with pyarrow) into a list of row dicts;
    numeric columns become floats (None when empty).  Checks that the required columns
    exist; the values are checked by :func:`select_curves`."""
    if not os.path.isfile(path):
        raise LawInputError(f"table {path} does not exist")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LawInputError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
        data = pq.read_table(path).to_pydict()
        columns = list(data)
        n = len(data[columns[0]]) if columns else 0
        raw = [{c: data[c][i] for c in columns} for i in range(n)]
        rows = [
            {c: (None if v is None else float(v)) if c in _NUMERIC else v for c, v in r.items()}
            for r in raw
        ]
    else:
        raw_bytes = open(path, "rb").read()
        try:
            text = raw_bytes.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw_bytes[:e.start].count(b"\n") + 1
            raise LawInputError(f"{path} line {line}: not UTF-8 text (byte {raw_bytes[e.start]:#04x}); "
                                "save the table as UTF-8 CSV") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        try:
            columns = list(reader.fieldnames or [])
            for i, r in enumerate(reader, start=2):
                rows.append({c: _parse(c, r.get(c), f"{path} line {i}") for c in columns})
        except csv.Error as e:
            raise LawInputError(f"{path} line {reader.line_num}: not a valid CSV table ({e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise LawInputError(
            f"table {path} lacks column(s) {', '.join(missing)}; a law table needs "
            f"{', '.join(REQUIRED_COLUMNS)} (one row per measurement)"
        )
    return rows


def kind_of(row: dict) -> str:
    """The row's infusion kind; tables without the column are 'unspecified'."""
    return str(row.get("infusion_kind") or "unspecified")


def _row_ids(idx) -> str:
    shown = ", ".join(str(i + 1) for i in idx[:5])
    return shown + (f" and {len(idx) - 5} more" if len(idx) > 5 else "")


def _column(rows: list[dict], name: str) -> np.ndarray:
    return np.array([np.nan if r.get(name) is None else r[name] for r in rows], dtype=float)


def _positive(v: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(v) & (v > 0)))


def select_curves(
    rows: list[dict], metric: str, infusion_kind: str | None = None, min_sizes: int = 2
) -> tuple[list[Curve], str]:
    """Pick the rows of ``metric`` (and of ``infusion_kind`` when given), validate them and
    group them into one :class:`Curve` per (model_params, tokens), sorted by size then
    budget.  Returns the curves and the infusion kind.  Raises LawInputError naming what
    to fix: unknown metric, mixed infusion kinds, NaN or non-positive values, fewer than
    ``min_sizes`` model sizes, or a curve with fewer than four infusion levels."""
    if not rows:
        raise LawInputError("the table has no rows")
    metrics = sorted({str(r.get("metric")) for r in rows})
    if metric not in metrics:
        raise LawInputError(
            f"metric {metric!r} is not in the table; it has: {', '.join(metrics)} "
            "(choose one with --metric)"
        )
    where = [i for i, r in enumerate(rows) if r.get("metric") == metric]
    kinds = sorted({kind_of(rows[i]) for i in where})
    if infusion_kind is not None:
        where = [i for i in where if kind_of(rows[i]) == infusion_kind]
        if not where:
            raise LawInputError(
                f"no {metric} rows have infusion_kind {infusion_kind!r}; the table has: "
                f"{', '.join(kinds)}"
            )
        kind = infusion_kind
    elif len(kinds) > 1:
        raise LawInputError(
            f"the {metric} rows mix infusion kinds ({', '.join(kinds)}); one law needs one "
            "knob: choose with --infusion-kind"
        )
    else:
        kind = kinds[0]

    sel = [rows[i] for i in where]
    # Row numbers in messages count data rows of the whole table from 1 (CSV line - 1).
    where = np.array(where)
    for col in ("model_params", "tokens", "infusion", "value"):
        vals = np.array([np.nan if r.get(col) is None else r[col] for r in sel], dtype=float)
        bad = np.flatnonzero(~np.isfinite(vals))
        if bad.size:
            raise LawInputError(
                f"column {col!r} is empty, NaN or infinite in {bad.size} {metric} row(s) "
                f"(table row(s) {_row_ids(where[bad])}); remove or fix them"
            )
        if col == "value":
            bad = np.flatnonzero((vals < 0) | (vals > 1))
            if bad.size:
                raise LawInputError(
                    f"{metric} is fitted as an accuracy, a fraction in [0, 1], but is "
                    f"{vals[bad[0]]:g} in {bad.size} row(s) (table row(s) {_row_ids(where[bad])})"
                    + ("; percentages? divide them by 100" if np.all(vals <= 100) else ""))
        else:
            bad = np.flatnonzero(vals <= 0)
            if bad.size:
                raise LawInputError(
                    f"column {col!r} must be > 0 (it is fitted on a log scale) but is "
                    f"{vals[bad[0]]:g} in {bad.size} {metric} row(s) (table row(s) "
                    f"{_row_ids(where[bad])})"
                )

    groups: dict[tuple[float, float], list[dict]] = {}
    for r in sel:
        groups.setdefault((float(r["model_params"]), float(r["tokens"])), []).append(r)
    sizes = sorted({n for n, _ in groups})
    if len(sizes) < min_sizes:
        raise LawInputError(
            f"the {metric} rows hold one model size only (N={sizes[0]:g}); a law in N needs "
            "at least two sizes (three for the held-out check)"
        )
    curves = []
    for (n, d), rs in sorted(groups.items()):
        x = np.array([r["infusion"] for r in rs], dtype=float)
        y = np.array([r["value"] for r in rs], dtype=float)
        k = np.array([np.nan if r.get("n_probes") is None else r["n_probes"] for r in rs], dtype=float)
        e = _column(rs, "exposures")
        t = _column(rs, "domain_tokens")
        sd = _column(rs, "seed")
        order = np.argsort(x, kind="stable")
        known = bool(np.all(np.isfinite(k) & (k >= 1)))
        c = Curve(n, d, x[order], y[order], k[order] if known else None,
                  e[order] if _positive(e) else None, t[order] if _positive(t) else None,
                  sd[order] if bool(np.all(np.isfinite(sd))) else None)
        if np.unique(c.infusion).size < 4:
            raise LawInputError(
                f"{c.label} has {np.unique(c.infusion).size} distinct infusion level(s); "
                "a collapse curve needs at least 4 (if runs of one budget carry different "
                "'tokens' values, write the budget, not the tokens counted)"
            )
        curves.append(c)
    return curves, kind
