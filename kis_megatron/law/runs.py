"""Read run directories into the tidy measurement table (see table.py).

A run directory holds ``run.json`` (model_params, tokens_per_step, total_steps,
infusion {kind, value}, status), ``metrics.jsonl`` (training and evaluation lines),
``tb/`` (TensorBoard events with the same scalar tags) and ``config.yaml``.  Only these
logs are read, never the trainer, so runs of other frameworks that write the same files
work too.  TensorBoard events are the fallback when metrics.jsonl is missing.

What is left out, with a note naming the run (the CLIs print notes as warnings): a run that
failed (run.json status ``failed``, e.g. diverged: its values are not measurements) or whose
training loss went non-finite on a step that was not skipped; in the default final-only mode,
a run not ``finished``, and a finished run whose final evaluation (the one at
``total_steps``) is missing, e.g. because the last line of metrics.jsonl was cut: it is never
given an earlier evaluation's value.  A cut last line is reported with its file and line; an
invalid line elsewhere is an error naming them.

Each evaluation gives one row per metric.  ``tokens`` is the planned token count at the
evaluation step, tokens_per_step * step (at the final evaluation: the run's budget); the
cumulative ``tokens_total`` is used only when run.json lacks tokens_per_step, because it
excludes padding and so differs slightly between runs of one budget.
"""

from __future__ import annotations

import bisect
import glob as globlib
import math
import os

from kis_megatron.law.table import LawInputError
from kis_megatron.run_dir import RunDir, find_run_dirs_below, is_run_dir
from kis_megatron.utils import read_jsonl

# Keys of metrics lines that are bookkeeping or training quantities, not evaluation metrics
# (probes* are probe counts).
_NOT_METRICS = {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
_NOT_METRIC_PREFIXES = ("tokens_", "target_domain_tokens", "exposures/", "probes", "time/")


def _metric_value(key: str, value) -> float | None:
    """The value as a float if ``key`` is an evaluation metric, else None.  The trainer
    writes NaN as null and infinities as "inf"/"-inf"; they come back as NaN / inf so a
    fit on that metric fails loudly instead of silently missing a run."""
    if key in _NOT_METRICS or key.startswith(_NOT_METRIC_PREFIXES) or isinstance(value, bool):
        return None
    if value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return None


def _probe_count(key: str, record: dict) -> float | None:
    """How many probes an accuracy ``retention/<name>`` (or ``retention_heldout/<name>``) was
    scored on, from the evaluator's ``probes/<name>`` (``probes_heldout/<name>``) count; the
    joint fit uses it for the binomial noise of each measurement."""
    kind, _, name = key.partition("/")
    if kind not in ("retention", "retention_heldout") or not name:
        return None
    count = record.get(f"probes{kind[len('retention'):]}/{name}")
    return float(count) if isinstance(count, (int, float)) and count > 0 else None


def _exposures(train_record: dict) -> dict:
    """``exposures`` (mean exposures per domain fact) and per-source columns.  The trainer
    logs ``exposures/<source>/mean`` per domain source; with one source that is the
    ``exposures`` value, ``exposures/mean`` when a log has it directly."""
    per_source = {
        k: v for k, v in train_record.items()
        if k.startswith("exposures/") and k.endswith("/mean") and k.count("/") == 2
    }
    if "exposures/mean" in train_record:
        main = train_record["exposures/mean"]
    else:
        main = next(iter(per_source.values())) if len(per_source) == 1 else None
    out = {"exposures": main}
    if len(per_source) > 1:
        out.update(per_source)
    return out


def _is_eval(record: dict) -> bool:
    return any(k == "val_loss" or k.startswith(("retention", "exact_match")) for k in record)


def find_run_dirs(args: list[str], use_glob: bool = False) -> list[str]:
    """Run directories named by ``args``.  With ``use_glob`` each argument is a glob pattern
    (``**`` allowed).  An argument (or match) that is not itself a run directory (no
    run.json) is searched recursively for run directories below it."""
    found = []
    for arg in args:
        matches = sorted(globlib.glob(arg, recursive=True)) if use_glob else [arg]
        if use_glob and not matches:
            raise LawInputError(f"pattern {arg!r} matches nothing")
        for m in matches:
            if not os.path.isdir(m):
                if use_glob:
                    continue
                raise LawInputError(f"{m} is not a directory; pass run directories")
            if is_run_dir(m):
                found.append(m)
                continue
            below = find_run_dirs_below(m)
            if not below and not use_glob:
                raise LawInputError(f"{m} holds no run directory (no run.json in it or below)")
            found.extend(below)
    runs = sorted(set(os.path.normpath(p) for p in found))
    if not runs:
        raise LawInputError(f"no run directories (with run.json) found in {' '.join(args)}")
    return runs


def _read_jsonl(path: str) -> tuple[list[dict], str | None]:
    """The records of a JSONL log, and a note when its last line is cut (a killed writer
    leaves a last line without its newline that is not valid JSON)."""
    records, cut = [], []
    for i, rec in read_jsonl(path, LawInputError, "; fix or remove it", "the log",
                             on_cut=lambda i: cut.append(f"{path}:{i}: the line is cut (not valid JSON)")):
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)) \
                or isinstance(rec.get("step"), bool):
            raise LawInputError(f"{path}:{i}: not a JSON object with a numeric 'step'")
        records.append(rec)
    return records, (cut[0] if cut else None)


def _read_tensorboard(tb_dir: str) -> list[dict]:
    """One record per step, merging every scalar tag of every event file under tb_dir;
    for a step logged twice (a resumed run) the later wall time wins."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    events: dict[int, dict[str, tuple[float, float]]] = {}
    for root, _, files in sorted(os.walk(tb_dir)):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        acc = EventAccumulator(root, size_guidance={SCALARS: 0})  # 0: keep every event
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                slot = events.setdefault(int(e.step), {})
                if tag not in slot or e.wall_time >= slot[tag][0]:
                    slot[tag] = (e.wall_time, float(e.value))
    return [{"step": s, **{t: v for t, (_, v) in tags.items()}} for s, tags in sorted(events.items())]


def read_records(run_dir: str) -> tuple[dict[int, dict], dict[int, dict], str, str | None]:
    """Training and evaluation records of a run keyed by step (a step logged twice, as
    after a resume, keeps its last record), the source they came from, and a note when the
    last line of metrics.jsonl is cut."""
    rd = RunDir(run_dir)
    cut = None
    if rd.metrics_path.is_file():
        (records, cut), source = _read_jsonl(str(rd.metrics_path)), "metrics.jsonl"
    elif rd.tb_dir.is_dir():
        records, source = _read_tensorboard(str(rd.tb_dir)), "tensorboard"
    else:
        raise LawInputError(f"{run_dir} has neither metrics.jsonl nor tb/ events")
    train, evals = {}, {}
    for rec in records:
        step = int(rec["step"])
        if _is_eval(rec):
            evals[step] = rec
        if "loss" in rec or "tokens_total" in rec:
            train[step] = rec
    return train, evals, source, cut


def _diverged_at(train: dict[int, dict]) -> int | None:
    """The first step whose training loss is not finite (NaN is logged as null), unless the
    trainer skipped that step's update (train.skip_nonfinite_steps)."""
    for step in sorted(train):
        rec = train[step]
        if "loss" in rec and not rec.get("skipped") and not _finite(rec["loss"]):
            return step
    return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)




def read_run(run_dir: str, all_evals: bool = False) -> tuple[list[dict], str | None]:
    """Table rows of one run: its final evaluation (default; finished runs only) or every
    evaluation.  Returns (rows, note) where note says why a run gave no rows."""
    info = RunDir(run_dir).read_info(LawInputError)
    if info.get("status") == "failed":
        return [], f"{run_dir}: left out, the run failed: {info.get('error') or 'no reason recorded'}"
    if not all_evals and info.get("status") != "finished":
        return [], f"{run_dir}: skipped, status is {info.get('status')!r}, not 'finished'"
    train, evals, source, cut = read_records(run_dir)
    diverged = _diverged_at(train)
    if diverged is not None:
        return [], (f"{run_dir}: left out, its training loss is not finite at step {diverged} "
                    f"(the run diverged; {source})")
    if not evals:
        return [], f"{run_dir}: skipped, no evaluation lines in {source}" + (f"; {cut}" if cut else "")
    if all_evals:
        steps = sorted(evals)
    else:
        final = info.get("total_steps")
        if final is None and cut:  # no way to tell what the cut line held
            return [], f"{run_dir}: left out, {cut} and run.json has no total_steps"
        if final is not None and final not in evals:
            return [], (f"{run_dir}: left out, its final evaluation (step {final}) is missing from "
                        f"{source} (the last one is at step {max(evals)})" + (f"; {cut}" if cut else ""))
        steps = [max(evals) if final is None else final]
    inf = info["infusion"]
    seed = RunDir(run_dir).saved_seed(LawInputError)
    train_steps = sorted(train)
    rows = []
    for step in steps:
        i = bisect.bisect_right(train_steps, step)  # the last training line at or before step
        last_train = train[train_steps[i - 1]] if i else {}
        if info.get("tokens_per_step"):
            tokens = float(info["tokens_per_step"]) * step
        elif "tokens_total" in last_train:
            tokens = float(last_train["tokens_total"])
        else:
            raise LawInputError(
                f"{run_dir}: cannot tell the token budget: run.json has no tokens_per_step "
                "and no training line has tokens_total"
            )
        exposures = _exposures(last_train)
        domain_tokens = last_train.get("tokens_domain")
        if not _finite(domain_tokens):
            domain_tokens = None
        for key, raw in sorted(evals[step].items()):
            value = _metric_value(key, raw)
            if value is None:
                continue
            rows.append({
                "model_params": info["model_params"],
                "tokens": tokens,
                "infusion": float(inf["value"]),
                "metric": key,
                "value": value,
                "n_probes": _probe_count(key, evals[step]),
                "run_id": info.get("run_id") or os.path.basename(os.path.normpath(run_dir)),
                "step": step,
                **exposures,
                "domain_tokens": domain_tokens,
                "infusion_kind": inf.get("kind") or "unspecified",
                "seed": seed,
            })
    return rows, cut and f"{run_dir}: {cut}; the evaluations before it are kept"


def extract_runs(run_dirs: list[str], all_evals: bool = False) -> tuple[list[dict], list[str]]:
    """Rows of all runs, and notes on the runs that gave none.  Raises LawInputError when no
    run gives any row."""
    rows, notes = [], []
    for d in run_dirs:
        r, note = read_run(d, all_evals)
        rows.extend(r)
        if note:
            notes.append(note)
    if not rows:
        raise LawInputError(
            "no measurements: " + ("; ".join(notes) if notes else "the runs hold no evaluations")
        )
    return rows, notes
