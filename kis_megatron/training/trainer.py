"""The Trainer: one training run, built in the order the data flows (see Trainer).

The loop: the infusion blender hands each data-parallel rank its slice of the global batch
(``kis_megatron.infusion.stream``), the model returns the mean loss of each micro-batch, gradients
accumulate to the global batch, are clipped, and AdamW steps. Validation loss and retention
probes run every ``eval.interval`` steps, checkpoints every ``checkpoint.interval`` steps;
everything is logged to the run directory (``kis_megatron.run_dir``) and TensorBoard.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from kis_megatron.config import Config, ConfigError, config_yaml
from kis_megatron.infusion.stream import (TrainStream, build_train_stream, build_validation_windows,
                                          realised_infusion_value)
from kis_megatron.errors import KisError, StorageError, os_error_in
from kis_megatron.interop.hf import load_init
from kis_megatron.eval.probing import ProbeRunner
from kis_megatron.model.llama import ModelDims, Transformer, model_sizes
from kis_megatron import plan
from kis_megatron.parallel.data_parallel import all_reduce_grads, no_grad_sync
from kis_megatron.parallel.dims import ParallelDims, any_rank, from_rank0, init_distributed
from kis_megatron.parallel.parallelize import parallelize
from kis_megatron.parallel.pipeline import check_microbatches
from kis_megatron.parallel.tensor_parallel import check_tp, clip_grad_norm_
from kis_megatron.run_dir import CONFIG_FILE, RunDir, RunLock
from kis_megatron.training.checkpoint import (CheckpointError, CheckpointManager, check_fits, damage,
                                               model_shapes, set_rng_state)
from kis_megatron.training.device import autocast_context, peak_tflops, resolve_device
from kis_megatron.training.logger import MetricsLogger
from kis_megatron.training.optim import build_optimizer, build_scheduler
from kis_megatron.training.profiling import StepProfiler


class TrainingDiverged(KisError):
    """The loss or gradient norm stopped being finite (more often than train.skip_nonfinite_steps)."""


def eval_summary(step: int, record: dict) -> str:
    """The console line of an evaluation: validation loss and retention (metrics.jsonl has all)."""
    shown = [f"{k} {v:.4g}" for k, v in record.items()
             if (k == "val_loss" or k.startswith("retention/")) and isinstance(v, (int, float))]
    return f"eval at step {step}: " + (", ".join(shown) if shown else "no validation set or probes")


class Trainer:
    """Built in the order the data flows, each step from its own config sections: the
    processes and the device (``parallel``, ``train``), the run directory (``log``,
    ``checkpoint``: a new run or a resume), the data (``data``, ``infusion``), the model and
    its parallel layout (``model``, ``parallel``; parallel/parallelize.py), the optimizer (``train``), the resumed
    state (``checkpoint``) and the probes (``eval``)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = RunDir(cfg.log.dir)
        self.launch_dir = os.getcwd()  # run.json records it: tools resolve relative paths from it
        self._setup_processes()
        self.lock: Optional[RunLock] = None  # rank 0's hold on the run directory
        try:
            resume_from = self._open_run_dir()
            self._build_data()
            self._build_model()
            self._build_optimizer()
            self.step = 0
            self.nonfinite_steps = 0  # steps skipped so far because the loss or gradients were not finite
            if resume_from is not None:
                self._load(resume_from)
            self.probes = (ProbeRunner(cfg.eval, cfg.data.tokenizer, self.device, facts=cfg.infusion.facts)
                           if cfg.eval.probes else None)
            if self.dims.world_size > 1:  # every rank has checked the run dir before any writes
                dist.barrier()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let go of the run directory (fit does, at its end)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---------------------------------------------------------------- build steps

    def _setup_processes(self) -> None:
        """The parallel layout, this rank's device and process groups, and the gradient
        accumulation they imply; the checks a rank can make alone come before any process
        waits on a peer."""
        cfg, t = self.cfg, self.cfg.train
        self.dims = ParallelDims.from_env(cfg.parallel)
        check_tp(ModelDims.from_config(cfg.model), self.dims.tp)
        self.dp_rank, self.dp_size = self.dims.dp_rank, self.dims.dp
        self.is_main = self.dims.is_main
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        if self.device.type == "cuda" and self.dims.world_size > 1:
            # More ranks than GPUs share them round-robin (NCCL may refuse; a test setup only).
            self.device = torch.device("cuda", self.dims.local_rank % torch.cuda.device_count())
        init_distributed(self.dims, self.device, cfg.parallel.timeout_s)
        if t.global_batch % (t.micro_batch * self.dp_size):
            raise ConfigError(f"train.global_batch={t.global_batch} must be a multiple of "
                              f"micro_batch * dp = {t.micro_batch * self.dp_size}")
        self.accum = t.global_batch // (t.micro_batch * self.dp_size)
        check_microbatches(self.accum, cfg.parallel)
        unfit = plan.warn_if_unfit(cfg, self.dims.world_size, self.device)  # before anything is built
        if unfit and self.is_main:
            print(unfit, file=sys.stderr, flush=True)
        self.tp_group = self.dims.tp_group

    def _open_run_dir(self) -> Optional[Path]:
        """The checkpoint to resume from (None: a new run), refused before anything is built
        or written when another process holds the run directory, or it holds another run, or
        the checkpoint another model."""
        cfg = self.cfg
        mine = None
        if self.is_main:
            try:
                self.lock = self.run_dir.lock()
            except KisError as e:
                mine = e
        shared = from_rank0(str(mine) if mine is not None else None)
        if mine is not None:
            raise mine
        if shared is not None:
            raise ConfigError(shared)
        self.ckpt = CheckpointManager(self.run_dir.checkpoints_dir, keep=cfg.checkpoint.keep,
                                      tp_group=self.tp_group)
        # restarted: resume=auto found no checkpoint, so the run starts afresh
        resume_from, self.restarted = self.run_dir.resume_decision(cfg, self._resume_path())
        if resume_from is not None:
            check_fits(resume_from, model_shapes(cfg.model))
        if self.lock is not None:
            self.lock.announce()
        return resume_from

    def _build_data(self) -> None:
        """This rank's slice of the blended stream, and the validation windows."""
        cfg, t = self.cfg, self.cfg.train
        self.stream: TrainStream = build_train_stream(
            cfg.data, cfg.infusion, vocab_size=cfg.model.vocab_size, seed=t.seed,
            global_batch=t.global_batch, steps=t.steps, dp_rank=self.dp_rank, dp_size=self.dp_size)
        self.infusion_value = realised_infusion_value(cfg.infusion, self.stream.describe())
        self.val_windows = build_validation_windows(cfg.data, cfg.model.vocab_size,
                                                    cfg.eval.val_batches * t.micro_batch)

    def _build_model(self) -> None:
        """This rank's part of the model (its pipeline stage's layers, cut tp ways), with the
        values the full model has, on the device, made ready to train in parallelize.py's
        order (recompute, compile, then DDP or the pipeline schedule)."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        init = cfg.model.init_from
        part = parallelize(cfg, self.dims, self.device, self.accum,
                           lambda: autocast_context(self.device, cfg.train.dtype),
                           load_weights=(lambda model: load_init(model, init)) if init else None)
        self.model: Transformer = part.model
        self.train_module, self.pipeline = part.train_module, part.pipeline
        self.model_sizes = model_sizes(cfg.model, cfg.data.seq_len)  # of the whole model
        if self.pipeline is not None and cfg.model.tie_embeddings and not self.pipeline.layout.has_first:
            self.ckpt.optim_aliases = {"output.weight": "tok_embeddings.weight"}  # the embedding's state
        # What evaluation calls: model(tokens) -> logits, model(tokens, targets) -> mean loss.
        self.forward = self.pipeline or self.model

    def _build_optimizer(self) -> None:
        zero_group = self.dims.dp_group if self.cfg.parallel.zero1 else None
        self.optimizer = build_optimizer(self.model, self.cfg.train, self.device, zero_group=zero_group)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train)

    # ---------------------------------------------------------------- resume

    def _resume_path(self) -> Optional[Path]:
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return None
        if mode == "auto":
            path, skipped = self.ckpt.resumable()
            for bad, reason in skipped if self.is_main else ():
                print(f"warning: checkpoint {bad} is damaged ({reason}); falling back to {path}",
                      file=sys.stderr, flush=True)
            return path
        path = Path(mode)
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume: {path} is not a checkpoint directory")
        reason = from_rank0(damage(path) if self.dims.rank == 0 else None)
        if reason is not None:
            raise CheckpointError(f"checkpoint.resume: {path} cannot be loaded: {reason}")
        return path

    def _load(self, path: Path) -> None:
        extra = self.ckpt.load(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the loaded optimizer state may be another rank's (ZeRO, stages)
        self.stream.load_state_dict(extra["data"])
        set_rng_state(extra["rng"])
        self.step = extra["step"]
        self.nonfinite_steps = extra.get("nonfinite_steps", 0)
        self.resumed_from = path

    def _save(self) -> None:
        extra = {"scheduler": self.scheduler.state_dict(), "data": self.stream.state_dict(),
                 "nonfinite_steps": self.nonfinite_steps}
        self.ckpt.save(self.step, self.model, self.optimizer, extra,
                       files={CONFIG_FILE: config_yaml(self.cfg)})  # a resume's settings to compare

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def validation_loss(self) -> Optional[float]:
        if self.val_windows is None:
            return None
        self.model.eval()
        losses = []
        mb = self.cfg.train.micro_batch
        for i in range(0, len(self.val_windows), mb):
            tokens = self.val_windows[i:i + mb].to(self.device)
            with autocast_context(self.device, self.cfg.train.dtype):
                losses.append(self.forward(tokens[:, :-1], tokens[:, 1:]).float().item())
        self.model.train()
        return sum(losses) / len(losses)

    def evaluate(self) -> dict:
        record = {"step": self.step}
        val = self.validation_loss()
        if val is not None:
            record["val_loss"] = val
        if self.probes is not None:
            self.model.eval()
            record.update(self.probes.run(self.forward))
            self.model.train()
        return record

    # ---------------------------------------------------------------- training

    def forward_backward(self) -> tuple[torch.Tensor, dict]:
        """Gradients of the global batch's mean loss, averaged over data-parallel ranks;
        returns (that loss, data stats)."""
        batch = self.stream.next_batch()
        tokens = torch.from_numpy(batch.tokens).to(self.device, non_blocking=True)
        if self.pipeline is not None:
            loss = self.pipeline.train_step(tokens)
            if self.dims.dp > 1:
                all_reduce_grads(self.model, self.dims.dp_group)
            return _mean_over_ranks(loss), batch.stats
        mb = self.cfg.train.micro_batch
        total = torch.zeros((), device=self.device)
        for i in range(self.accum):
            chunk = tokens[i * mb:(i + 1) * mb]
            with no_grad_sync(self.train_module, last_micro_batch=i == self.accum - 1):
                with autocast_context(self.device, self.cfg.train.dtype):
                    loss = self.train_module(chunk[:, :-1], chunk[:, 1:])
                (loss / self.accum).backward()
            total += loss.detach().float()
        return _mean_over_ranks(total / self.accum), batch.stats

    def train_step(self) -> tuple[float, float, dict, bool]:
        """One optimizer step over the global batch; returns (loss, grad_norm, data stats,
        applied). When the loss or the gradient norm is not finite on any rank, no rank
        applies the update (applied is False): the gradients are dropped and the weights and
        optimizer state stay as they were; the step still counts (its batch is consumed and
        the lr schedule moves on), so a skipped step does not shift the data or the schedule."""
        loss, stats = self.forward_backward()
        clip = self.cfg.train.grad_clip or math.inf
        if self.tp_group is None and self.pipeline is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        else:
            grad_norm = clip_grad_norm_(self.model.parameters(), clip, self.tp_group,
                                        self.dims.pp_group).item()
        loss = loss.item()
        applied = not any_rank(not (math.isfinite(loss) and math.isfinite(grad_norm)), self.device)
        if applied:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, grad_norm, stats, applied

    def _utilisation(self, tokens_per_s: float) -> dict:
        """Achieved model TFLOP/s per device and, on a GPU whose peak is known, MFU."""
        world = self.dims.world_size
        tflops = self.model_sizes["flops_per_token"] * tokens_per_s / world / 1e12
        out = {"tflops_per_device": tflops}
        peak = peak_tflops(self.device, self.cfg.train.dtype)
        if peak:
            out["mfu"] = tflops / peak
        return out

    def write_run_info(self, status: str, error: Optional[str] = None) -> None:
        if not self.is_main:
            return
        inf = self.cfg.infusion
        info = {
            "run_id": self.run_dir.path.name,
            **self.model_sizes,
            "tokens_per_step": self.cfg.train.global_batch * self.cfg.data.seq_len,
            "total_steps": self.cfg.train.steps,
            "infusion": {"kind": inf.kind, "value": self.infusion_value,
                         "ratio": inf.ratio, **self.stream.describe()},
            "status": status,
            "nonfinite_steps": self.nonfinite_steps,
            "launch_dir": self.launch_dir,  # where relative paths in config.yaml start
        }
        if error is not None:  # why a failed run failed (the law tools list it)
            info["error"] = error
        self.run_dir.write_info(info)

    def fit(self) -> dict:
        """Train to ``train.steps`` (or ``train.stop_after``); returns the last evaluation."""
        cfg = self.cfg
        if self.step >= cfg.train.steps and self.run_dir.status() == "finished":
            if self.is_main:  # nothing to do, and a finished measurement stays as it is
                print(f"{self.run_dir.path}: the run finished at step {self.step} already",
                      file=sys.stderr, flush=True)
            self.close()
            return {}
        log: Optional[MetricsLogger] = None
        last_eval: dict = {}
        profiler = StepProfiler(cfg.train.profile, self.run_dir.path, self.dims.rank, self.device)
        try:
            log = self._start_log()
            while self.step < cfg.train.steps:
                profiler.before_step(self.step + 1)
                t0 = time.perf_counter()
                loss, grad_norm, stats, applied = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self._log_step(log, loss, grad_norm, stats, applied, time.perf_counter() - t0)
                wrote = profiler.after_step(self.step, cfg.train.steps)
                if wrote:
                    log.message(wrote)
                done = self.step == cfg.train.steps
                stopping = self.step == cfg.train.stop_after
                if (cfg.eval.interval and self.step % cfg.eval.interval == 0) or done:
                    last_eval = self.evaluate()
                    log.log(last_eval)
                    log.message(eval_summary(self.step, last_eval))
                if (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0) or \
                        ((done or stopping) and cfg.checkpoint.save_final):
                    self._save()
                if stopping and not done:
                    log.message(f"stopping after step {self.step} (train.stop_after); "
                                "continue with checkpoint.resume=auto")
                    break
            log.close()  # every metrics line is on disk before run.json says finished
            self.write_run_info("finished" if self.step == cfg.train.steps else "stopped")
        except KeyboardInterrupt:
            self.write_run_info("interrupted")
            raise
        except Exception as e:  # the run is not a measurement: the law tools leave it out
            refused = None if isinstance(e, KisError) else os_error_in(e)
            if refused is not None:  # a full disk, a path gone: one line, at the boundary
                e = StorageError.from_os_error(refused, f"at step {self.step}:")
            reason = str(e) if isinstance(e, KisError) else f"{type(e).__name__}: {e}"
            try:
                self.write_run_info("failed", reason)
            except OSError:  # the same disk may refuse run.json too; the error still says why
                pass
            if refused is not None:
                raise e from None
            raise
        finally:
            profiler.close()
            if log is not None:
                log.close()
            self.close()  # the run directory is let go only after its last write
        return last_eval

    def _start_log(self) -> MetricsLogger:
        """The run directory's config.yaml and run.json, and the logger, with the notes a
        (re)started run begins with."""
        cfg = self.cfg
        if self.is_main:
            self.run_dir.write_config(cfg)
        self.write_run_info("running")
        log = MetricsLogger(self.run_dir.path, cfg.log, cfg.train.steps, self.step, enabled=self.is_main)
        if self.step:
            log.message(f"resumed from {self.resumed_from} at step {self.step}")
        elif self.restarted:
            log.message(f"no complete checkpoint in {self.ckpt.dir}: the run starts afresh "
                        "(its partial metrics and TensorBoard events are reset)")
        for note in self.stream.notes():
            log.message(note)
        return log

    def _log_step(self, log: MetricsLogger, loss: float, grad_norm: float, stats: dict,
                  applied: bool, seconds: float) -> None:
        """The metrics line of a step (every log.interval steps, the last one and any step
        not applied), the stream's notes and the progress bar; a step not applied counts
        towards train.skip_nonfinite_steps."""
        cfg = self.cfg
        tps = cfg.train.global_batch * cfg.data.seq_len / seconds
        lr = self.scheduler.get_last_lr()[0]
        for note in self.stream.notes():
            log.message(note)
        if not applied or self.step % cfg.log.interval == 0 or self.step == cfg.train.steps:
            log.log({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     **stats, "tokens_per_s": tps, **self._utilisation(tps),
                     **({} if applied else {"skipped": True})})
        if not applied:
            self._nonfinite(loss, grad_norm, log)
        log.progress(self.step, loss, tps, lr)

    def _nonfinite(self, loss: float, grad_norm: float, log: MetricsLogger) -> None:
        """A step that was not applied: skip it within train.skip_nonfinite_steps, else stop."""
        self.nonfinite_steps += 1
        allowed = self.cfg.train.skip_nonfinite_steps
        bad = [f"{name} is {value}" for name, value in (("the loss", loss), ("the gradient norm", grad_norm))
               if not math.isfinite(value)] or ["another rank's loss or gradient norm is not finite"]
        what = f"step {self.step}: {' and '.join(bad)}"
        if self.nonfinite_steps > allowed:
            raise TrainingDiverged(
                f"the run diverged at {what}; its update was not applied and no checkpoint of "
                f"it is written. Lower train.lr (or raise train.warmup_steps), or let such steps "
                f"be skipped with train.skip_nonfinite_steps (now {allowed})")
        log.message(f"warning: {what}; the update is skipped ({self.nonfinite_steps} of "
                    f"train.skip_nonfinite_steps={allowed})")


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The loss reported is the global-batch mean: average the data-parallel ranks' means."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG)
    return x
