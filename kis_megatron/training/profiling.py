"""``train.profile``: a torch.profiler trace of a few training steps (and, on a GPU, a CUDA
memory snapshot of the same steps) written into the run directory, one file per rank:

    <log.dir>/profile/trace_rank<R>_steps<A>-<B>.json    open in Perfetto or chrome://tracing
    <log.dir>/profile/memory_rank<R>_steps<A>-<B>.pickle  drag into pytorch.org/memory_viz

Steps are counted from 1 (``train.profile.start=5, steps=3``: steps 5, 6, 7). Files are
written to a temporary name and renamed, so a run killed mid-export leaves no trace that
looks complete."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from kis_megatron.config import ProfileConfig
from kis_megatron.utils import atomic_export


class StepProfiler:
    def __init__(self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device):
        self.first = cfg.start
        self.last = cfg.start + cfg.steps - 1
        self.dir, self.rank, self.cuda = Path(run_dir) / "profile", rank, device.type == "cuda"
        self._prof: Optional[torch.profiler.profile] = None

    def before_step(self, step: int) -> None:
        """Start recording when ``step`` (the step about to run) opens the window."""
        if not self.first or step != self.first or self._prof is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self._prof.__enter__()

    def after_step(self, step: int, last_step: int) -> Optional[str]:
        """Stop and write the files after the window's last step (or the run's); returns what
        was written, for the log."""
        if self._prof is None or (step < self.last and step < last_step):
            return None
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        name = f"rank{self.rank}_steps{self.first}-{step}"
        trace = self.dir / f"trace_{name}.json"
        atomic_export(trace, prof.export_chrome_trace)
        written = [trace]
        if self.cuda:
            snapshot = self.dir / f"memory_{name}.pickle"
            atomic_export(snapshot, torch.cuda.memory._dump_snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snapshot)
        return "profile: wrote " + ", ".join(str(p) for p in written)

    def close(self) -> None:
        """A run that stops inside the window (an error, stop_after) drops the recording."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
            if self.cuda:
                torch.cuda.memory._record_memory_history(enabled=None)

