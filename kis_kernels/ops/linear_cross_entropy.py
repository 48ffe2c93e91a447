"""Fused output projection + cross-entropy that never materialises the (N x V) logits.

    loss = mean over tokens with target != ignore_index of
           logsumexp(hidden[i] @ weight.T) - (hidden[i] @ weight.T)[target[i]]

(0.0 with zero gradients when every target is ignored.) Tokens are processed in chunks:
for each chunk the logits (C x V) are computed with one matmul, a Triton kernel reduces
each row to its max, sum of exponentials and target logit (an online softmax over vocab
blocks), a second kernel overwrites the chunk *in place* with the gradient of the summed
loss (softmax - one_hot), and two more matmuls turn it into this chunk's rows of
grad_hidden and its contribution to grad_weight (the Liger-Kernel scheme). Backward then
only scales the stored gradients by grad_output / n_valid. Peak extra memory is one
logits chunk, sized by default to about the size of ``hidden`` (at least ~4M elements).

Vocabulary parallelism (``group``): ``weight`` is this rank's contiguous shard of the
vocabulary (rank r owns rows [r * V_local, (r + 1) * V_local)) and targets are global
ids. Per chunk, the row max is all-reduced (MAX), then the rescaled sums of exponentials
and the target logits (zero on ranks that do not own the target) are all-reduced (SUM),
so every rank sees the same log-sum-exp and the loss is identical on every rank.
grad_weight is the gradient of this rank's shard; grad_hidden is only this rank's
partial sum over its vocabulary shard: the caller must all-reduce it over ``group``, as
Megatron pairs a column-parallel output layer with the backward all-reduce of its input
(``copy_to_tensor_model_parallel_region``). Backward needs no communication.

Layers: Triton kernels -> launchers ``linear_cross_entropy_forward`` /
``linear_cross_entropy_backward`` -> :class:`LinearCrossEntropyFunction` ->
:func:`linear_cross_entropy`. References: :func:`linear_cross_entropy_reference`
(chunked, plain PyTorch, what CPU training runs; like the Triton path it computes the
gradients chunk by chunk during forward) and :func:`linear_cross_entropy_naive`
(full logits, ``F.cross_entropy``; for tests).
"""

from __future__ import annotations  # kernel annotations stay strings: triton loads lazily

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kis_kernels._triton import cdiv, lazy_jit, next_power_of_2
from kis_kernels.dispatch import use_triton

tl = None  # triton.language, bound by lazy_jit at the first launch (see kis_kernels/_triton.py)

_MAX_BLOCK_V = 4096  # vocabulary columns per loop step of the row kernels


@lazy_jit
def _ce_stats_kernel(
    LOGITS, stride_l, TARGET, ROW_MAX, ROW_SUMEXP, ROW_TARGET,
    n_cols, vocab_start, ignore_index,
    BLOCK_V: tl.constexpr,
):
    # Online softmax over the row: running max m and sum d of exp(x - m).
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_l
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    target = tl.load(TARGET + row)
    local = target - vocab_start
    owned = (target != ignore_index) & (local >= 0) & (local < n_cols)
    t = tl.load(row_ptr + local, mask=owned, other=0.0).to(tl.float32)
    tl.store(ROW_MAX + row, m)
    tl.store(ROW_SUMEXP + row, d)
    tl.store(ROW_TARGET + row, t)


@lazy_jit
def _ce_grad_kernel(
    LOGITS, stride_l, TARGET, LSE,
    n_cols, vocab_start, ignore_index,
    BLOCK_V: tl.constexpr,
):
    # In place: logits -> d(sum of losses)/d logits = softmax - one_hot(target), 0 if ignored.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_l
    target = tl.load(TARGET + row)
    lse = tl.load(LSE + row)
    local = target - vocab_start
    keep = (target != ignore_index).to(tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - (cols == local).to(tl.float32)) * keep
        tl.store(row_ptr + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def _shard(group):
    """(rank, world size) of the vocabulary-parallel group; (0, 1) without one."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _global_lse(row_max, row_sumexp, row_target, group):
    """Combine per-shard softmax statistics into the log-sum-exp over the whole vocabulary.

    Returns (lse, target logit) per row; without a group they are this shard's own.
    """
    if group is not None and _shard(group)[1] > 1:
        import torch.distributed as dist

        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        both = torch.stack((row_sumexp * torch.exp(row_max - global_max), row_target))
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        row_max, (row_sumexp, row_target) = global_max, both
    return row_max + torch.log(row_sumexp), row_target


_MIN_CHUNK_ELEMENTS = 2**22  # logits chunks below this only add launches and small matmuls


def default_chunk_rows(n_rows: int, hidden_size: int, vocab_local: int) -> int:
    """Rows per chunk: the logits chunk holds about as many elements as ``hidden`` (Liger's
    rule), but at least ~4M elements, so small problems are not cut into tiny matmuls."""
    rows = next_power_of_2(cdiv(n_rows, cdiv(vocab_local, hidden_size)))
    rows = max(rows, _MIN_CHUNK_ELEMENTS // vocab_local)
    return max(1, min(n_rows, rows))


def linear_cross_entropy_launch_config(vocab_local: int) -> dict:
    """BLOCK_V and num_warps of both row kernels for a (shard of the) vocabulary of
    ``vocab_local`` columns: up to 4096 columns per loop step. A pure function (see
    ``kis_kernels.aot``)."""
    block_v = min(next_power_of_2(vocab_local), _MAX_BLOCK_V)
    return {"BLOCK_V": block_v, "num_warps": 8 if block_v >= 2048 else 4}


def linear_cross_entropy_forward(
    hidden, weight, target, ignore_index=-100, group=None, chunk_size=None,
    need_grad_hidden=True, need_grad_weight=True,
):
    """Launch the chunked forward on 2-D ``hidden`` (N, H), ``weight`` (V_local, H),
    1-D int64 ``target`` (N,).

    Returns (loss, grad_hidden, grad_weight, n_valid): the mean loss (fp32), the
    gradients of the *summed* loss (None when not requested; grad_weight in float32 or
    wider, see :func:`accumulate_grad_weight`) and the number of non-ignored targets (a
    0-dim tensor, no host sync).
    """
    n_rows, hidden_size = hidden.shape
    vocab_local = weight.shape[0]
    rank, _ = _shard(group)
    vocab_start = rank * vocab_local
    device = hidden.device
    chunk = chunk_size or default_chunk_rows(n_rows, hidden_size, vocab_local)
    launch = linear_cross_entropy_launch_config(vocab_local)
    need_grads = need_grad_hidden or need_grad_weight

    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = (torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
                   if need_grad_weight else None)
    loss_rows = torch.zeros(n_rows, dtype=torch.float32, device=device)
    logits_buf = torch.empty((min(chunk, n_rows), vocab_local), dtype=hidden.dtype, device=device)
    stats_buf = torch.empty((3, min(chunk, n_rows)), dtype=torch.float32, device=device)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        rows = end - start
        h = hidden[start:end]
        t = target[start:end]
        logits = torch.mm(h, weight.t(), out=logits_buf[:rows])
        row_max, row_sumexp, row_target = stats_buf[:, :rows]
        _ce_stats_kernel[(rows,)](
            logits, logits.stride(0), t, row_max, row_sumexp, row_target,
            vocab_local, vocab_start, ignore_index, **launch,
        )
        lse, tgt = _global_lse(row_max, row_sumexp, row_target, group)
        loss_rows[start:end] = torch.where(t != ignore_index, lse - tgt, 0.0)
        if not need_grads:
            continue
        _ce_grad_kernel[(rows,)](
            logits, logits.stride(0), t, lse,
            vocab_local, vocab_start, ignore_index, **launch,
        )
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            accumulate_grad_weight(grad_weight, logits, h)
    n_valid = (target != ignore_index).sum()
    loss = loss_rows.sum() / n_valid.clamp(min=1)
    return loss, grad_hidden, grad_weight, n_valid


def accumulate_grad_weight(acc: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """acc += grad_logits.T @ h, with ``acc`` in float32 (or wider) whatever the inputs' dtype.

    With bf16 inputs the chunk's product is rounded to bf16 once (the matmul itself adds in
    fp32) and summed into the fp32 accumulator, so the error does not grow with the number of
    chunks, as it does when the running sum itself is bf16 (about 1% at 32 chunks). The
    price is an fp32 copy of the weight's gradient while the step runs."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), h)
    else:
        acc.add_(torch.mm(grad_logits.t(), h))


def linear_cross_entropy_backward(grad_output, grad_hidden, grad_weight, n_valid, inplace=True):
    """Scale the stored gradients of the summed loss by grad_output / n_valid: in place by
    default (no second V x H buffer at the step's peak; the stored gradients are then spent,
    so a second backward must be refused), else into new tensors."""
    scale = grad_output / n_valid.clamp(min=1)

    def scaled(g):
        if g is None:
            return None
        return g.mul_(scale.to(g.dtype)) if inplace else g * scale.to(g.dtype)

    return scaled(grad_hidden), scaled(grad_weight)


def _without_autocast(forward):
    """The ops choose their own precisions (matmuls in the inputs' dtype, softmax in float32);
    an enclosing autocast must not re-cast the matmuls inside (it would make the logits'
    dtype differ from the float32 buffers they are combined with). Callers that want the
    LM head in bf16 under autocast pass bf16 inputs."""
    @functools.wraps(forward)
    def wrapper(ctx, hidden, *args):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return forward(ctx, hidden, *args)
    return wrapper


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton path: gradients are computed in forward."""

    @staticmethod
    @_without_autocast
    def forward(ctx, hidden, weight, target, ignore_index, group, chunk_size, need_h, need_w):
        loss, grad_hidden, grad_weight, n_valid = linear_cross_entropy_forward(
            hidden, weight, target, ignore_index, group, chunk_size, need_h, need_w
        )
        ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        _once(ctx)
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        dh, dw = linear_cross_entropy_backward(grad_output, grad_hidden, grad_weight, n_valid)
        return dh, dw.to(ctx.weight_dtype) if dw is not None else None, None, None, None, None, None, None


def _once(ctx) -> None:
    """The stored gradients are scaled in place: a second backward through the same graph
    (retain_graph=True) would scale them twice, so it is refused."""
    if getattr(ctx, "backward_done", False):
        raise RuntimeError("linear_cross_entropy: backward ran twice through one forward; "
                           "the fused loss does not support retain_graph=True")
    ctx.backward_done = True


class _ChunkedReferenceFunction(torch.autograd.Function):
    """Plain-PyTorch chunked path, the Liger scheme without Triton: per logits chunk one
    exp pass gives the loss and (when gradients are needed) the chunk's gradient, turned at
    once into its rows of grad_hidden and its part of grad_weight. Backward only scales them,
    so training costs the same three matmuls as unfused cross-entropy, with one chunk of
    logits alive instead of all of them. Without gradients (evaluation) nothing is stored."""

    @staticmethod
    @_without_autocast
    def forward(ctx, hidden, weight, target, ignore_index, group, chunk_size, need_h, need_w):
        n_rows, hidden_size = hidden.shape
        vocab_local = weight.shape[0]
        vocab_start = _shard(group)[0] * vocab_local
        compute = torch.promote_types(hidden.dtype, torch.float32)
        chunk = chunk_size or default_chunk_rows(n_rows, hidden_size, vocab_local)
        w = weight.to(compute)
        loss_rows = torch.zeros(n_rows, dtype=compute, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=compute) if need_h else None
        grad_weight = torch.zeros_like(w) if need_w else None
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            t = target[start:end]
            h = hidden[start:end].to(compute)
            logits = h @ w.t()  # (C, V_local)
            local = t - vocab_start
            valid = t != ignore_index
            owned = valid & (local >= 0) & (local < vocab_local)
            idx = local.clamp(0, vocab_local - 1)[:, None]
            picked = logits.gather(1, idx).squeeze(1)
            row_target = torch.where(owned, picked, 0.0)
            # One exp pass over the chunk: exp(logits - row max) gives the sum of exponentials
            # and, divided by it, the softmax (the exp dominates this loop on CPU).
            row_max = logits.amax(dim=1)
            logits.sub_(row_max[:, None]).exp_()
            row_sumexp = logits.sum(dim=1)
            # Across vocab shards the max and the sum are reduced; the softmax then divides by
            # the whole row's sum taken at this shard's max.
            chunk_lse, tgt = _global_lse(row_max, row_sumexp, row_target, group)
            row_total = row_sumexp if _shard(group)[1] == 1 else (chunk_lse - row_max).exp()
            loss_rows[start:end] = torch.where(valid, chunk_lse - tgt, 0.0)
            if need_h or need_w:
                # d(sum of losses)/d logits = softmax - one_hot(target), zero for ignored rows
                logits.mul_((valid.to(compute) / row_total)[:, None])
                logits.scatter_add_(1, idx, -owned.to(compute)[:, None])
                if need_h:
                    grad_hidden[start:end] = logits @ w
                if need_w:
                    grad_weight.addmm_(logits.t(), h)
        n_valid = (target != ignore_index).sum()
        ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss_rows.sum() / n_valid.clamp(min=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        # Out of place: the reference keeps supporting retain_graph (and gradcheck).
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        dh, dw = linear_cross_entropy_backward(grad_output, grad_hidden, grad_weight, n_valid, inplace=False)
        h_dtype, w_dtype = ctx.dtypes
        return (dh.to(h_dtype) if dh is not None else None, dw.to(w_dtype) if dw is not None else None,
                None, None, None, None, None, None)


def _flatten_checked(hidden, weight, target, ignore_index, group):
    """Validate the arguments; return hidden (N, H) and target (N,) int64."""
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: weight has shape {tuple(weight.shape)}, expected "
            f"(vocab, {hidden.shape[-1] if hidden.dim() else '?'}) for hidden {tuple(hidden.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: target has shape {tuple(target.shape)}, expected "
            f"{tuple(hidden.shape[:-1])} (hidden's shape without its last dimension)"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: target must hold integer token ids, got {target.dtype}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1).to(torch.int64).contiguous()
    vocab = weight.shape[0] * _shard(group)[1]
    # The kernels mask ids they do not own, so an id outside the vocabulary would give a
    # silently wrong loss instead of an error. Checked where it costs nothing (CPU); on a GPU
    # the check would stall the host every step, and the trainer's tokens were checked
    # against the vocabulary when the shards were read (infusion/stream.py).
    if target.device.type == "cpu":
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            first = int(target[bad][0])
            raise ValueError(
                f"linear_cross_entropy: target id {first} is outside the vocabulary [0, {vocab}) "
                f"and is not ignore_index={ignore_index}"
            )
    return hidden, target


def linear_cross_entropy_reference(hidden, weight, target, ignore_index=-100, group=None, *, chunk_size=None):
    """Chunked plain-PyTorch version of :func:`linear_cross_entropy` (same contract):
    never holds more than one logits chunk, computes in float32 or wider."""
    hidden2, target2 = _flatten_checked(hidden, weight, target, ignore_index, group)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    return _ChunkedReferenceFunction.apply(hidden2, weight, target2, ignore_index, group, chunk_size,
                                           need_h, need_w)


def linear_cross_entropy_naive(hidden, weight, target, ignore_index=-100):
    """Full-logits reference (single process): ``F.cross_entropy`` on hidden @ weight.T,
    summed and divided by max(n_valid, 1). Holds all N x V logits: for tests only."""
    hidden2, target2 = _flatten_checked(hidden, weight, target, ignore_index, None)
    compute = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden2 @ weight.t()).to(compute)
    total = F.cross_entropy(logits, target2, ignore_index=ignore_index, reduction="sum")
    return total / (target2 != ignore_index).sum().clamp(min=1)


def linear_cross_entropy(hidden, weight, target, ignore_index=-100, group=None, *, chunk_size=None):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``target``, without the logits.

    hidden: (N, H) (or (..., H)); weight: (V, H), no bias; target: (N,) (or (...)) int64
    ids, where ``ignore_index`` marks tokens left out of the mean (all ignored: loss 0.0,
    zero gradients). ``group``: vocabulary-parallel process group, see the module doc:
    the loss is identical on every rank, grad_weight is this rank's shard's gradient, and
    the gradient reaching ``hidden`` is this rank's partial, which the caller must
    all-reduce over ``group``. ``chunk_size``: tokens per chunk (default: logits chunk
    about the size of ``hidden``, at least ~4M elements). Returns a 0-dim float32 (float64 for float64 inputs
    on the reference path) tensor. Runs Triton or the chunked reference as
    :mod:`kis_kernels.dispatch` decides.
    """
    if use_triton(hidden, weight, target):
        hidden2, target2 = _flatten_checked(hidden, weight, target, ignore_index, group)
        grad_on = torch.is_grad_enabled()
        return LinearCrossEntropyFunction.apply(
            hidden2, weight, target2, ignore_index, group, chunk_size,
            grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        )
    return linear_cross_entropy_reference(hidden, weight, target, ignore_index, group, chunk_size=chunk_size)
