"""Activation recomputation (``train.recompute``), applied to the model from outside.

- ``none``: every activation the backward needs is kept from the forward.
- ``full``: each transformer block keeps only its input; its forward runs again inside the
  backward (Chen et al. 2016, arXiv 1604.06174). Activation memory per layer drops to one
  (B, T, dim) tensor, for ~1/3 more compute (one more forward of the blocks).
- ``selective``: only the attention core, softmax(q k^T) v, is recomputed (Korthikanti et
  al. 2022, arXiv 2205.05198, Megatron's ``--recompute-activations``). It pays where the
  core keeps the (T x T) attention scores: SDPA's math kernel. SDPA's flash and
  memory-efficient kernels (CUDA, and the CPU flash kernel) keep only the output and the
  softmax statistics, so there selective recomputation saves little (measured in
  ``benchmarks/RESULTS.md``).

Both use ``torch.utils.checkpoint`` (non-reentrant), by replacing the ``forward`` of the
block (or of its ``attn.core``) on the instance: module structure and parameter names are
unchanged, so checkpoints, tensor/pipeline parallelism and the optimizer do not notice.
Applied in parallelize.py's order: after tensor parallelism, before ``compile_blocks``
(torch.compile traces the checkpoint as one region) and data parallelism. Nothing is recomputed without autograd
(evaluation). The model has no dropout, so the RNG state is not saved and restored.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")


def _recompute_in_backward(module: nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def recomputed(*args):
        if not torch.is_grad_enabled():
            return forward(*args)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False)

    module.forward = recomputed
    module._kis_recompute = True


def apply_recompute(model: nn.Module, mode: str) -> nn.Module:
    """Make ``model``'s blocks (``model.layers``, a pipeline stage's included) recompute
    their activations in backward as ``mode`` says; returns the model."""
    if mode not in MODES:
        raise ValueError(f"train.recompute={mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return model
    for block in model.layers.values():
        target = block if mode == "full" else block.attn.core
        if not getattr(target, "_kis_recompute", False):
            _recompute_in_backward(target)
    return model
