"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019, arXiv 1909.08053), applied to the
plain model from outside by :func:`apply_tp`.

Each block's attention splits by heads (query AND key/value heads: rank r owns a contiguous
run of both, which keeps grouped-query attention's head pairing) and its MLP by hidden
units: wq/wk/wv and w_gate/w_up are column-parallel (their output is this rank's heads or
units), wo and w_down row-parallel (they take that sharded input and all-reduce the
result), so a block costs one all-reduce forward and one backward per sublayer. The token
embedding and the LM head split by vocabulary rows; the loss runs over the vocabulary shards
through ``ops.linear_cross_entropy(..., group=)``, never gathering the logits.

Every layer is built from the full ``nn.Linear`` / ``nn.Embedding`` of the single-process
model by slicing this rank's part, so a tensor-parallel run starts from exactly the weights
of the single-process run with the same seed. Sharded parameters carry ``_tp_shard_dim``
(the dimension cut across ranks) so clipping and checkpoints know which ones are partial.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kis_megatron.config import ConfigError
from kis_megatron.model import ops

# ---------------------------------------------------------------------------- communication


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = x.size(dim) // _world(group)
    return x.narrow(dim, dist.get_rank(group) * size, size).contiguous()


class _CopyToTP(torch.autograd.Function):
    """forward: identity, backward: all-reduce."""

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
    """forward: all-reduce, backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """forward: all-gather along the last dim, backward: split along the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromTP.apply(x, group)


# ---------------------------------------------------------------------------- sharding helpers


def shard_of(full: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous slice of ``full`` along ``dim`` (a copy)."""
    return _split(full.detach(), dim, group).clone()


def full_of(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    """The whole tensor, all-gathered from every rank's ``shard`` along ``dim``."""
    return _all_gather(shard.detach(), dim, group)


def _sharded_param(full: torch.Tensor, dim: int, group) -> nn.Parameter:
    p = nn.Parameter(shard_of(full, dim, group))
    p._tp_shard_dim = dim
    return p


# ---------------------------------------------------------------------------- layers


class ColumnParallelLinear(nn.Module):
    """``y_r = x @ W_r.T`` with W split by output rows: the output stays sharded (it feeds a
    row-parallel layer, Megatron's ``gather_output=False``). No bias."""

    def __init__(self, linear: nn.Linear, group):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("ColumnParallelLinear: a Linear with bias is not supported")
        self.group = group
        self.weight = _sharded_param(linear.weight, 0, group)  # (out / tp, in)

    def forward(self, x):
        return F.linear(copy_to_tp(x, self.group), self.weight)


class RowParallelLinear(nn.Module):
    """``y = sum_r x_r @ W_r.T`` with W split by input columns and its input already sharded
    (Megatron's ``input_is_parallel=True``); the partial outputs are all-reduced. No bias."""

    def __init__(self, linear: nn.Linear, group):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("RowParallelLinear: a Linear with bias is not supported")
        self.group = group
        self.weight = _sharded_param(linear.weight, 1, group)  # (out, in / tp)

    def forward(self, x):
        return reduce_from_tp(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """Embedding split by vocabulary rows: each rank looks up the ids it owns (zeros for the
    others) and the partial rows are all-reduced."""

    def __init__(self, embedding: nn.Embedding, group, weight: Optional[nn.Parameter] = None):
        super().__init__()
        self.group = group
        self.weight = weight if weight is not None else _sharded_param(embedding.weight, 0, group)
        self.vocab_start = dist.get_rank(group) * self.weight.shape[0]

    def forward(self, ids):
        local = ids - self.vocab_start
        foreign = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(foreign, 0), self.weight)  # (B, T, dim)
        return reduce_from_tp(h.masked_fill(foreign[..., None], 0.0), self.group)


class VocabParallelLMHead(nn.Module):
    """The LM head split by vocabulary rows. ``forward`` gives the full logits (all-gathered,
    for probes and generation); ``cross_entropy`` the loss without gathering them."""

    def __init__(self, linear: nn.Linear, group, fused: bool, weight: Optional[nn.Parameter] = None):
        super().__init__()
        self.group, self.fused = group, fused
        self.weight = weight if weight is not None else _sharded_param(linear.weight, 0, group)

    def forward(self, h):
        return gather_from_tp(F.linear(copy_to_tp(h, self.group), self.weight), self.group)

    def cross_entropy(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The kernel's gradient for h is this rank's partial over its vocabulary shard; the
        # copy's backward all-reduce completes it.
        return ops.linear_cross_entropy(copy_to_tp(h, self.group), self.weight, targets,
                                        fused=self.fused, group=self.group)


# ---------------------------------------------------------------------------- apply


def check_tp(cfg, tp: int) -> None:
    """Refuse, with the key to change, a model whose sizes do not split across ``tp`` ranks.

    ``cfg``: the model's ``Dims`` or ``ModelConfig`` (needs vocab_size, n_heads,
    n_kv_heads; ffn_dim when known)."""
    if tp == 1:
        return
    n_kv = getattr(cfg, "n_kv_heads", None) or cfg.n_heads
    for key, value in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", n_kv),
                       ("model.vocab_size", cfg.vocab_size), ("model.ffn_dim", getattr(cfg, "ffn_dim", None))):
        if value and value % tp:
            raise ConfigError(f"{key}={value} is not divisible by parallel.tp={tp}: tensor "
                              f"parallelism splits it evenly across ranks (choose a multiple of "
                              f"{tp}, or a parallel.tp that divides it)")


def apply_tp(model: nn.Module, tp_group) -> nn.Module:
    """Shard the plain ``Transformer`` across ``tp_group`` in place and return it.

    Call before ``compile_blocks`` and data parallelism, after any weight loading (the
    shards are cut from the weights the model holds). A tied head keeps sharing the
    embedding's shard. With ``tp_group`` None (tp == 1) the model is returned unchanged."""
    if tp_group is None or _world(tp_group) == 1:
        return model
    check_tp(model.dims, _world(tp_group))
    tied = model.output.weight is model.tok_embeddings.weight
    for block in model.layers.values():
        attn, ffn = block.attn, block.ffn
        for name in ("wq", "wk", "wv"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name), tp_group))
        attn.wo = RowParallelLinear(attn.wo, tp_group)
        ffn.w_gate = ColumnParallelLinear(ffn.w_gate, tp_group)
        ffn.w_up = ColumnParallelLinear(ffn.w_up, tp_group)
        ffn.w_down = RowParallelLinear(ffn.w_down, tp_group)
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, tp_group)
    model.output = VocabParallelLMHead(model.output, tp_group, fused=model.cfg.kernels,
                                       weight=model.tok_embeddings.weight if tied else None)
    return model


# ---------------------------------------------------------------------------- clipping


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, tp_group) -> torch.Tensor:
    """Clip gradients by their global L2 norm and return that norm (as torch's
    ``clip_grad_norm_``), where a sharded parameter's squares are summed over ``tp_group``
    and a replicated one's (identical on every rank) are counted once."""
    grads = [(p.grad, getattr(p, "_tp_shard_dim", None) is not None)
             for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0][0].device
    dtype = torch.float32  # at least fp32 for bf16 grads; float64 grads keep float64
    for g, _ in grads:
        dtype = torch.promote_types(dtype, g.dtype)
    sharded = torch.zeros((), dtype=dtype, device=device)
    replicated = torch.zeros((), dtype=dtype, device=device)
    for g, is_shard in grads:
        sq = g.detach().to(dtype).pow(2).sum()
        if is_shard:
            sharded += sq
        else:
            replicated += sq
    if tp_group is not None:
        dist.all_reduce(sharded, group=tp_group)
    total = (sharded + replicated).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0) if math.isfinite(max_norm) else None
    if coef is not None:
        for g, _ in grads:
            g.mul_(coef.to(g.dtype))
    return total
