"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019, arXiv 1909.08053), applied to the
plain model from outside by :func:`apply_tp`.

Each block's attention splits by heads (query AND key/value heads: rank r owns a contiguous
run of both, which keeps grouped-query attention's head pairing) and its MLP by hidden
units: wq/wk/wv and w_gate/w_up are column-parallel (their output is this rank's heads or
units), wo and w_down row-parallel (they take that sharded input and all-reduce the
result), so a block costs one all-reduce forward and one backward per sublayer. The token
embedding and the LM head split by vocabulary rows; the loss runs over the vocabulary shards
through ``ops.linear_cross_entropy(..., group=)``, never gathering the logits.

Sequence parallelism (``parallel.sp``, Korthikanti et al. 2022) splits the rest, the norms
and the residual stream, along the sequence: each all-reduce becomes a reduce-scatter (after
the row-parallel layer) and an all-gather (after the next norm), the same bytes on the wire,
and the activations outside attention and MLP take 1/tp of the memory.

Every layer is built from the full ``nn.Linear`` / ``nn.Embedding`` of the single-process
model by slicing this rank's part, so a tensor-parallel run starts from exactly the weights
of the single-process run with the same seed (``apply_tp`` also works on a model laid out on
the meta device, whose weights ``build_model`` then fills slice by slice). Sharded parameters
carry ``_tp_shard_dim`` (the dimension cut across ranks) and ``_tp_shard_rank`` so clipping,
initialisation and checkpoints know which part they hold.
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
from kis_megatron.parallel.comm import (all_gather, copy_to_tp, gather_from_tp, gather_seq, group_size,
                                        reduce_from_tp, reduce_scatter_seq, split)

# ---------------------------------------------------------------------------- sharding helpers


def shard_of(full: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous slice of ``full`` along ``dim`` (a copy)."""
    return split(full.detach(), dim, group).clone()


def full_of(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    """The whole tensor, all-gathered from every rank's ``shard`` along ``dim``."""
    return all_gather(shard.detach(), dim, group)


def _sharded_param(full: torch.Tensor, dim: int, group) -> nn.Parameter:
    p = nn.Parameter(shard_of(full, dim, group))
    p._tp_shard_dim, p._tp_shard_rank = dim, dist.get_rank(group)
    return p


# ---------------------------------------------------------------------------- layers


class ColumnParallelLinear(nn.Module):
    """``y_r = x @ W_r.T`` with W split by output rows: the output stays sharded (it feeds a
    row-parallel layer, Megatron's ``gather_output=False``). No bias. With sequence
    parallelism the input arrives all-gathered by the norm before it, whose backward already
    sums the ranks' input gradients, so there is no copy here."""

    def __init__(self, linear: nn.Linear, group, sequence_parallel: bool = False):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("ColumnParallelLinear: a Linear with bias is not supported")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _sharded_param(linear.weight, 0, group)  # (out / tp, in)

    def forward(self, x):
        if not self.sequence_parallel:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """``y = sum_r x_r @ W_r.T`` with W split by input columns and its input already sharded
    (Megatron's ``input_is_parallel=True``); the partial outputs are all-reduced. No bias."""

    def __init__(self, linear: nn.Linear, group, sequence_parallel: bool = False):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("RowParallelLinear: a Linear with bias is not supported")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _sharded_param(linear.weight, 1, group)  # (out, in / tp)

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.sequence_parallel:  # each rank keeps the summed rows of its sequence slice
            return reduce_scatter_seq(y, self.group)
        return reduce_from_tp(y, self.group)


class VocabParallelEmbedding(nn.Module):
    """Embedding split by vocabulary rows: each rank looks up the ids it owns (zeros for the
    others) and the partial rows are all-reduced."""

    def __init__(self, embedding: nn.Embedding, group, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _sharded_param(embedding.weight, 0, group)
        self.vocab_start = dist.get_rank(group) * self.weight.shape[0]

    def forward(self, ids):
        local = ids - self.vocab_start
        foreign = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(foreign, 0), self.weight)  # (B, T, dim)
        h = h.masked_fill(foreign[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter_seq(h, self.group)
        return reduce_from_tp(h, self.group)


class VocabParallelLMHead(nn.Module):
    """The LM head split by vocabulary rows. ``forward`` gives the full logits (all-gathered,
    for probes and generation); ``loss`` the loss without gathering them (LMHead.loss)."""

    def __init__(self, linear: nn.Linear, group, fused: bool, weight: Optional[nn.Parameter] = None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.fused, self.sequence_parallel = group, fused, sequence_parallel
        self.weight = weight if weight is not None else _sharded_param(linear.weight, 0, group)

    def _input(self, h):
        # The gradient reaching h is this rank's partial over its vocabulary shard: the copy's
        # backward all-reduce completes it (with sequence parallelism, the final norm's
        # gather does, by its reduce-scatter).
        return h if self.sequence_parallel else copy_to_tp(h, self.group)

    def forward(self, h):
        return gather_from_tp(F.linear(self._input(h), self.weight), self.group)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ops.linear_cross_entropy(self._input(h), self.weight, targets,
                                        fused=self.fused, group=self.group)


class SequenceParallelNorm(nn.Module):
    """RMSNorm over this rank's slice of the sequence, then the all-gather that hands the
    next tensor-parallel layer the full sequence. Each rank's weight gradient covers only its
    slice, so the weight enters through ``copy_to_tp``, whose backward sums them."""

    def __init__(self, norm: nn.Module, group):
        super().__init__()
        self.group, self.eps, self.fused = group, norm.eps, norm.fused
        self.weight = norm.weight  # same Parameter and name as the plain model's

    def forward(self, x):
        y = ops.rms_norm(x, copy_to_tp(self.weight, self.group), self.eps, fused=self.fused)
        return gather_seq(y, self.group)


# ---------------------------------------------------------------------------- apply


def check_tp(cfg, tp: int) -> None:
    """Refuse, with the key to change, a model whose sizes do not split across ``tp`` ranks.

    ``cfg``: the model's ``ModelDims`` or ``ModelConfig`` (needs vocab_size, n_heads,
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


def apply_tp(model: nn.Module, tp_group, sequence_parallel: bool = False) -> nn.Module:
    """Shard the plain ``Transformer`` (or a pipeline stage's part of it) across ``tp_group``
    in place and return it.

    Call before ``compile_blocks`` and data parallelism. On a model with weights the shards
    are cut from them; on a model laid out on the meta device (the trainer's way, through
    ``build_model(parallelize=)``) the weights come later, each parameter filled with its
    part of the full tensor (initialisation, or ``interop.hf.load_init``). A tied head keeps sharing the
    embedding's shard. ``sequence_parallel``: the residual stream between layers is split
    along the sequence (the model pads a sequence to a multiple of tp). With ``tp_group``
    None (tp == 1) the model is returned unchanged."""
    if tp_group is None or group_size(tp_group) == 1:
        return model
    tp, sp = group_size(tp_group), sequence_parallel
    check_tp(model.dims, tp)
    emb, head = model.tok_embeddings, model.output
    tied = emb is not None and head is not None and head.weight is emb.weight
    for block in model.layers.values():
        for module in (block.attn, block.ffn):
            for name in COLUMN:
                if hasattr(module, name):
                    setattr(module, name, ColumnParallelLinear(getattr(module, name), tp_group, sp))
            for name in ROW:
                if hasattr(module, name):
                    setattr(module, name, RowParallelLinear(getattr(module, name), tp_group, sp))
        if sp:
            block.attn_norm = SequenceParallelNorm(block.attn_norm, tp_group)
            block.ffn_norm = SequenceParallelNorm(block.ffn_norm, tp_group)
    if emb is not None:
        model.tok_embeddings = VocabParallelEmbedding(emb, tp_group, sp)
    if head is not None:
        model.output = VocabParallelLMHead(head, tp_group, fused=model.cfg.kernels, sequence_parallel=sp,
                                           weight=model.tok_embeddings.weight if tied else None)
    if sp:
        if model.norm is not None:
            model.norm = SequenceParallelNorm(model.norm, tp_group)
        _pad_sequences(model, tp)
    return model


def seq_multiple(model: nn.Module) -> int:
    """The multiple a sequence is padded to (tp under sequence parallelism, else 1)."""
    return getattr(model, "_kis_seq_multiple", 1)


def _pad_sequences(model: nn.Module, multiple: int) -> None:
    """Sequence parallelism splits every sequence ``multiple`` ways: pad the tokens (and the
    targets, with -100) to a multiple, and cut the logits back. Causal attention: padding
    after a sequence never reaches its real positions. Replaces ``forward`` on the instance,
    as recompute does: parameter names are unchanged."""
    forward = model.forward

    def padded(tokens: torch.Tensor, targets: Optional[torch.Tensor] = None):
        T = tokens.size(1)
        pad = -T % multiple
        if T > model.cfg.max_seq_len or not pad:
            return forward(tokens, targets)  # the model's own check names the limit
        tokens = F.pad(tokens, (0, pad))
        if targets is not None:
            return forward(tokens, F.pad(targets, (0, pad), value=-100))
        return forward(tokens)[:, :T]

    model.forward = padded
    model._kis_seq_multiple = multiple


# The rule of which weight is cut along which dimension, stated once (the planner counts by it).
COLUMN = ("wq", "wk", "wv", "w_gate", "w_up")  # cut by output rows: each rank a slice of heads / hidden
ROW = ("wo", "w_down")  # cut by input columns; their outputs are summed across ranks


def tp_shard_dim(name: str) -> Optional[int]:
    """The dimension ``apply_tp`` cuts parameter ``name`` along (None: replicated, the norms)."""
    parts = name.split(".")
    if parts[0] in ("tok_embeddings", "output"):
        return 0
    if len(parts) >= 2 and parts[-2] in COLUMN:
        return 0
    if len(parts) >= 2 and parts[-2] in ROW:
        return 1
    return None


# ---------------------------------------------------------------------------- clipping


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, tp_group,
                    pp_group=None) -> torch.Tensor:
    """Clip gradients by their global L2 norm and return that norm (as torch's
    ``clip_grad_norm_``), where a sharded parameter's squares are summed over ``tp_group``,
    a replicated one's (identical on every rank) are counted once, and the stages of
    ``pp_group`` (each holding different parameters) add theirs."""
    params = [p for p in parameters if p.grad is not None]
    grads = [(p.grad, getattr(p, "_tp_shard_dim", None) is not None) for p in params]
    # A pipeline's second copy of a tied embedding holds the same gradient as the first.
    counted = [(g, s) for (g, s), p in zip(grads, params) if not getattr(p, "_tied_copy", False)]
    if not grads and pp_group is None:
        return torch.zeros(())
    device = grads[0][0].device if grads else torch.device("cpu")
    dtype = torch.float32  # at least fp32 for bf16 grads; float64 grads keep float64
    for g, _ in grads:
        dtype = torch.promote_types(dtype, g.dtype)
    sharded = torch.zeros((), dtype=dtype, device=device)
    replicated = torch.zeros((), dtype=dtype, device=device)
    for g, is_shard in counted:
        sq = g.detach().to(dtype).pow(2).sum()
        if is_shard:
            sharded += sq
        else:
            replicated += sq
    if tp_group is not None:
        dist.all_reduce(sharded, group=tp_group)
    total = sharded + replicated
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    total = total.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0) if math.isfinite(max_norm) else None
    if coef is not None:
        for g, _ in grads:
            g.mul_(coef.to(g.dtype))
    return total
