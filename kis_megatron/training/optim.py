"""AdamW and the learning-rate schedule.

On CUDA the optimizer is apex's FusedAdam when apex is installed *and its CUDA extension
loads* (apex is not on PyPI; a pure-Python apex install imports fine, then FusedAdam raises
"requires cuda extensions" when constructed: the check imports that extension, ``amp_C``, and
asks ``multi_tensor_applier.available``), else torch's AdamW with ``fused=True``; the choice and why go to
Python logging once per process (INFO, shown only when logging is configured; a broken apex is a
WARNING, which Python prints by default). On CPU it is torch's AdamW with ``foreach=False`` (the per-parameter loop).
Norm weights (1-D parameters) get no weight decay, as in Llama and Megatron. With
``parallel.zero1`` it is wrapped in torch's ZeroRedundancyOptimizer: each data-parallel rank
keeps the AdamW state of its share of the parameters, steps them, and broadcasts them.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from kis_megatron.config import TrainConfig


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # .parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def apex_fused_adam() -> tuple[type | None, str]:
    """(apex.optimizers.FusedAdam, why) when NVIDIA apex is importable *with* the CUDA
    extension FusedAdam runs on (``amp_C``, its multi-tensor Adam); else (None, why not).
    Decided once per process, so the log line below is printed once."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except Exception as e:
        return None, f"apex is not installed ({type(e).__name__}: {e})"
    try:
        import amp_C  # type: ignore[import-not-found]  # noqa: F401
        from apex.multi_tensor_apply import multi_tensor_applier  # type: ignore[import-not-found]
    except Exception as e:
        return None, f"apex is installed but its CUDA extension did not load ({type(e).__name__}: {e})"
    if not getattr(multi_tensor_applier, "available", False):
        return None, "apex is installed but its multi-tensor CUDA kernels are not available"
    return FusedAdam, "apex FusedAdam (CUDA extension loaded)"


@functools.lru_cache(maxsize=None)
def _log_choice(message: str, warn: bool) -> None:
    (log.warning if warn else log.info)(message)


def _adamw(cfg: TrainConfig, device: torch.device) -> tuple[type, dict]:
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type == "cuda":
        fused_adam, why = apex_fused_adam()
        if fused_adam is not None:
            _log_choice(f"optimizer: {why}", warn=False)
            return fused_adam, {**kw, "adam_w_mode": True}
        # A broken apex is worth a warning (someone installed it to be used); no apex is normal.
        _log_choice(f"optimizer: torch AdamW(fused=True); {why}", warn="installed" in why)
        return torch.optim.AdamW, {**kw, "fused": True}
    return torch.optim.AdamW, {**kw, "foreach": False}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                    zero_group=None) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters; ZeRO-1 sharded over ``zero_group`` when given."""
    groups = _param_groups(model, cfg.weight_decay)
    cls, kw = _adamw(cfg, device)
    if zero_group is None:
        return cls(groups, **kw)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=zero_group, **kw)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: ZeRO's inner one, else ``optimizer``."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warmup, then
    cosine to ``min_lr`` at the last step, or WSD (warmup-stable-decay: constant, then a linear
    decay to ``min_lr`` over the last ``decay_frac`` of training), or constant."""
    floor = cfg.min_lr / cfg.lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - 1 - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(cfg.decay_frac * cfg.steps))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 + (floor - 1.0) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
