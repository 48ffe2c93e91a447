"""Data parallelism: every rank holds the whole model (or, with tensor parallelism, its
tensor-parallel shard of it) and reads its own slice of each global
batch (the infusion blender splits it, keeping the exact ratio over the global batch);
gradients are averaged across ranks by DDP, overlapped with the backward pass.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
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


@torch.no_grad()
def all_reduce_grads(model: torch.nn.Module, group) -> None:
    """Average gradients over ``group`` in one flat all-reduce per dtype, after the pipeline
    schedule has run every micro-batch's backward. It gives up DDP's overlap of this
    communication with the last backward: DDP around each stage, which torch's schedules
    support, failed here with a reducer assertion (19 parameters, 38 gradient hooks, gloo,
    torch 2.13) when tried, and with ``static_graph=True`` ran but gave wrong gradients."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    size = dist.get_world_size(group)
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(reduced)
