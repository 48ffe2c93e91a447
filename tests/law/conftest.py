"""Generators of synthetic law data with a known ground truth, shared by the law tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest


def true_retention(x, cp, width=0.12, plateau=0.9, chance=0.2, rise_at=None):
    """Ground-truth retention at infusion x: a step in log10 x that falls to chance,
    centred on cp (so with fraction 1/2, the collapse point is exactly cp); with
    ``rise_at`` an initial rise from chance centred there."""
    lx = np.log10(np.asarray(x, dtype=float))
    frac = 1.0 / (1.0 + np.exp((lx - math.log10(cp)) / width))
    if rise_at is not None:
        frac = frac / (1.0 + np.exp(-(lx - math.log10(rise_at)) / width))
    return chance + (plateau - chance) * frac


def law_rows(
    sizes=(1e6, 3e6, 1e7, 3e7, 1e8),
    levels=np.geomspace(0.03, 3.0, 9),
    a=3e-3,
    b=0.3,
    c=0.0,
    tokens=(1e9,),
    seeds=1,
    probes=400,
    seed=0,
    metric="retention/domain",
    kind="ratio",
    **curve,
):
    """Table rows from CP = a * N^b * (D / 1e9)^c.  Each measurement is a multiple-choice
    accuracy over ``probes`` probes (binomial noise, as the real evaluator's)."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in tokens:
        for n in sizes:
            cp = a * n**b * (d / 1e9) ** c
            for x in levels:
                for s in range(seeds):
                    p = float(true_retention(x, cp, **curve))
                    rows.append({
                        "model_params": n, "tokens": d, "infusion": float(x), "metric": metric,
                        "value": rng.binomial(probes, p) / probes, "run_id": f"n{n:g}-x{x:.4g}-s{s}",
                        "step": 1000, "exposures": None, "infusion_kind": kind, "seed": s,
                    })
    return rows


@pytest.fixture(name="true_retention")
def true_retention_fixture():
    return true_retention


@pytest.fixture
def make_rows():
    return law_rows


def write_run(
    root: Path,
    name: str,
    *,
    model_params: int,
    infusion: float,
    retention_domain,
    total_steps: int = 100,
    eval_every: int = 50,
    tokens_per_step: int = 4096,
    status: str = "finished",
    kind: str = "ratio",
    seed: int = 1234,
    write_jsonl: bool = True,
    write_tb: bool = False,
    extra_eval: dict | None = None,
) -> Path:
    """A run directory as the trainer writes it: run.json, config.yaml, metrics.jsonl
    and/or tb/ events.  ``retention_domain(step)`` gives the domain retention at an eval
    step; general retention is 0.5 + domain / 4, val_loss 3 - domain."""
    d = root / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({
        "run_id": name, "model_params": model_params, "flops_per_token": 6 * model_params,
        "tokens_per_step": tokens_per_step, "total_steps": total_steps,
        "infusion": {"kind": kind, "value": infusion, "ratio": infusion}, "status": status,
    }))
    (d / "config.yaml").write_text(f"model:\n  preset: tiny\ntrain:\n  steps: {total_steps}\n  seed: {seed}\n")
    records = []
    last = total_steps if status == "finished" else total_steps // 2
    for step in range(10, last + 1, 10):
        records.append({
            "step": step, "loss": 5.0 / step, "lr": 1e-3, "grad_norm": 1.0,
            "tokens_total": step * tokens_per_step - 7, "tokens_domain": int(step * tokens_per_step * 0.3),
            "target_domain_tokens": step * tokens_per_step * 0.3,
            "tokens_per_s": 1e4, "exposures/dom/mean": step / 10.0, "exposures/dom/min": 1,
            "exposures/dom/max": step / 5.0, "exposures/dom/cut_fraction": 0.0,
        })
        if step % eval_every == 0:
            r = float(retention_domain(step))
            records.append({
                "step": step, "val_loss": 3.0 - r, "retention/general": 0.5 + r / 4,
                "retention/domain": r, "retention_chance/domain": 0.2,
                "probes/general": 300, "probes/domain": 200, **(extra_eval or {}),
            })
    if write_jsonl:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if write_tb:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(str(d / "tb"))
        for r in records:
            for k, v in r.items():
                if k != "step" and v is not None:
                    w.add_scalar(k, v, r["step"])
        w.close()
    return d


@pytest.fixture
def make_run():
    return write_run
