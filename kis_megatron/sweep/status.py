"""A sweep run's state, from its run directory (kis_megatron/run_dir.py)."""

from __future__ import annotations

from kis_megatron.run_dir import RunDir
from kis_megatron.sweep.grid import SweepRun


def run_info(run: SweepRun) -> dict:
    """The run's record ({} when it has none or it is unreadable)."""
    return RunDir(run.run_dir).info()


def run_status(run: SweepRun) -> str:
    """finished | failed (tried again) | partial | interrupted | new (RunDir.progress)."""
    return RunDir(run.run_dir).progress()
