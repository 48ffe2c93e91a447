"""The collectives of tensor and sequence parallelism as autograd functions (Megatron-LM's
``mappings.py``): each forward collective is paired with its adjoint in backward.

Tensor parallelism (activations replicated across the group between layers):

    copy_to_tp       forward identity         backward all-reduce
    reduce_from_tp   forward all-reduce       backward identity
    gather_from_tp   forward all-gather (-1)  backward split (-1)

Sequence parallelism (Korthikanti et al. 2022, arXiv 2205.05198; activations split along the
sequence, dim 1, between layers):

    gather_seq          forward all-gather (1)      backward reduce-scatter (1)
    reduce_scatter_seq  forward reduce-scatter (1)  backward all-gather (1)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """The number of ranks in ``group``."""
    return dist.get_world_size(group)


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous slice of ``x`` along ``dim``."""
    size = x.size(dim) // group_size(group)
    return x.narrow(dim, dist.get_rank(group) * size, size).contiguous()


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's slice along ``dim``."""
    if dist.get_backend(group) == "gloo":  # gloo has no reduce-scatter: all-reduce, then slice
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return split(x, dim, group)
    parts = list(x.contiguous().chunk(group_size(group), dim=dim))
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, [p.contiguous() for p in parts], group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, -1, ctx.group), None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, 1, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, 1, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromTP.apply(x, group)


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceScatterSeq.apply(x, group)
