"""AdamW and the learning-rate schedule.

The optimizer is apex's FusedAdam when apex is installed (detected at run time: it is not on
PyPI), else torch's AdamW with ``fused=True`` on CUDA and the default implementation on CPU.
Norm weights (1-D parameters) get no weight decay, as in Llama and Megatron. With
``parallel.zero1`` it is wrapped in torch's ZeroRedundancyOptimizer: each data-parallel rank
keeps the AdamW state of its share of the parameters, steps them, and broadcasts them.
"""

from __future__ import annotations

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


def apex_fused_adam():
    """apex.optimizers.FusedAdam when NVIDIA apex is importable with its CUDA extension."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except Exception:
        return None
    return FusedAdam


def _adamw(cfg: TrainConfig, device: torch.device) -> tuple[type, dict]:
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type == "cuda":
        fused_adam = apex_fused_adam()
        if fused_adam is not None:
            return fused_adam, {**kw, "adam_w_mode": True}
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
