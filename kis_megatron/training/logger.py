"""Where a run reports: ``metrics.jsonl``, TensorBoard under ``tb/``, and the console
(a tqdm bar with loss, tokens/s and ETA on a terminal; plain lines in CI logs)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from kis_megatron.config import LogConfig
from kis_megatron.errors import KisError
from kis_megatron.run_dir import RunDir
from kis_megatron.utils import atomic_write_text, read_jsonl


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class MetricsLogger:
    """Only rank 0 writes; every other rank's logger is silent."""

    def __init__(self, run_dir: Path, cfg: LogConfig, total_steps: int, start_step: int,
                 enabled: bool = True):
        self.run_dir, self.cfg, self.enabled = run_dir, cfg, enabled
        self.total_steps, self.start_step = total_steps, start_step
        self.metrics_path = RunDir(run_dir).metrics_path
        self._file = self._tb = self._bar = None
        self._t0 = time.time()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            self._reset()
        else:
            self._truncate_after(start_step)
        self._file = open(self.metrics_path, "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past the checkpoint we resume from
            self._tb = SummaryWriter(str(RunDir(run_dir).tb_dir), purge_step=start_step + 1 if start_step else None)
        mode = cfg.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _reset(self) -> None:
        """A run that starts at step 0 (also again, after a kill before its first
        checkpoint) starts its logs afresh rather than appending to a partial run's."""
        if self.metrics_path.exists():
            atomic_write_text(self.metrics_path, "")
        for events in (self.run_dir / "tb").glob("events.out.tfevents.*"):
            events.unlink()

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their old lines."""
        if not self.metrics_path.exists():
            return
        # A last line cut by a kill is dropped with the rest; damage elsewhere is an error.
        kept = [json.dumps(rec) for _, rec in read_jsonl(self.metrics_path, KisError, on_cut=lambda _: None)
                if isinstance(rec, dict) and rec.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in kept))

    def log(self, record: dict, prefix_tb: str = "") -> None:
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(prefix_tb + k, v, step)

    def progress(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        """Called after every optimizer step ``step`` (1-based count of completed steps)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")
        elif self.mode == "lines" and (step % self.cfg.interval == 0 or step == self.total_steps):
            done = step - self.start_step
            elapsed = time.time() - self._t0
            eta = elapsed / max(done, 1) * (self.total_steps - step)
            print(f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} "
                  f"tokens/s {tokens_per_s:,.0f} eta {_fmt_time(eta)}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:  # notes (resume, data repeats) are shown even without progress lines
            print(text, flush=True)

    def close(self) -> None:
        """Flush and close everything (again: nothing)."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        self._bar = self._tb = self._file = None


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
