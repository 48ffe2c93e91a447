"""Data parallelism: every rank holds the whole model (or, with tensor parallelism, its
tensor-parallel shard of it) and reads its own slice of each global
batch (the infusion blender splits it, keeping the exact ratio over the global batch);
gradients are averaged across ranks by DDP, overlapped with the backward pass.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from kis_megatron.parallel.dims import ParallelDims


def apply_ddp(model: torch.nn.Module, dims: ParallelDims, device: torch.device) -> torch.nn.Module:
    """The module to run forward/backward through: DDP-wrapped when dp > 1, else ``model``.
    Parameters stay shared with ``model`` (checkpoints, clipping and evaluation use it)."""
    if dims.dp == 1:
        return model
    # Over the data-parallel group only: ranks of one tensor-parallel group hold different
    # shards, so their gradients must never be averaged together.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, process_group=dims.dp_group)


def no_grad_sync(module: torch.nn.Module, last_micro_batch: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(module, DistributedDataParallel) and not last_micro_batch:
        return module.no_sync()
    return contextlib.nullcontext()
