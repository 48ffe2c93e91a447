"""From the plain model to this rank's part of a parallel one: every step, in the order it runs.

    1. pipeline stage        prune the layers (and embedding, head) other stages own
    2. tensor parallelism    apply_tp, with sequence parallelism when parallel.sp
       (1 and 2 on the meta device: nothing is allocated that this rank will not keep)
    3. weights               allocated, and set to the values the full model has (the same
                             seed gives every layout the same model), or loaded (model.init_from)
    4. recomputation         train.recompute, on the blocks (after tp: it wraps their forward)
    5. torch.compile         train.compile, per block (after recomputation: one traced region)
    6. data parallelism      DDP; with a pipeline, the schedule over the stages instead (its
                             gradients are all-reduced over dp by the trainer)

The order matters and is stated only here (torchtitan's ``parallelize_llama`` likewise): tensor
parallelism swaps the linears that recomputation and compile wrap, and DDP must see the final
parameters. ``build_model`` is steps 1-3 alone, for tools and tests that want a model of one
layout without a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from kis_megatron.config import Config, ModelConfig
from kis_megatron.model.llama import Transformer, on_meta_device
from kis_megatron.parallel.data_parallel import apply_ddp
from kis_megatron.parallel.dims import ParallelDims
from kis_megatron.parallel.pipeline import Pipeline, PipelineLayout, tied_embedding_group
from kis_megatron.parallel.recompute import apply_recompute
from kis_megatron.parallel.tensor_parallel import apply_tp


@dataclass
class Parallelized:
    model: Transformer  # this rank's part: its parameters are what the optimizer steps
    train_module: nn.Module  # what a training micro-batch runs through (DDP, or the model)
    pipeline: Optional[Pipeline]  # the schedule when parallel.pp > 1


def parallelize(cfg: Config, dims: ParallelDims, device: torch.device, accum: int,
                autocast: Callable, load_weights: Optional[Callable[[Transformer], None]] = None
                ) -> Parallelized:
    """Steps 1-6 (module docstring) for this rank; ``load_weights`` (step 3) replaces the
    initial weights in place, on the CPU, before the model moves to ``device``."""
    layout = PipelineLayout(cfg.model.n_layers, cfg.parallel, dims.pp_rank) if dims.pp > 1 else None

    def cut(model: Transformer) -> None:
        if layout is not None:
            layout.prune(model)  # 1
        apply_tp(model, dims.tp_group, sequence_parallel=cfg.parallel.sp)  # 2

    cutting = layout is not None or dims.tp_group is not None
    model = build_model(cfg.model, seed=cfg.train.seed, device="cpu", parallelize=cut if cutting else None)
    if load_weights is not None:
        load_weights(model)  # 3
    model.to(device)
    apply_recompute(model, cfg.train.recompute)  # 4
    if cfg.train.compile:
        compile_blocks(model)  # 5
    if layout is None:  # 6
        return Parallelized(model, apply_ddp(model, dims, device), None)
    tied = tied_embedding_group(dims) if cfg.model.tie_embeddings else None
    pipeline = Pipeline(model, layout, dims.pp_group, accum, device, autocast, tied_group=tied)
    return Parallelized(model, model, pipeline)


def compile_blocks(model: Transformer) -> None:
    """torch.compile each transformer block in place (parameter names are unchanged, so
    checkpoints and the optimizer do not notice). Per block rather than the whole model:
    the blocks are identical, so one compilation serves all, and a pipeline stage compiles
    only the blocks it owns."""
    for block in model.layers.values():
        block.compile()


# ---------------------------------------------------------------------------- meta-device build


def build_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu",
                parallelize: Optional[Callable[[Transformer], None]] = None) -> Transformer:
    """The model initialised from ``seed`` alone, so every layout (and a resumed or
    tensor-parallel run) starts from the same weights.

    ``parallelize`` cuts the model in place to this rank's part (a pipeline stage's
    layers, tensor-parallel slices) before any weight exists: the model is laid out on the
    meta device, cut, and only what remains is allocated and initialised, to the values the
    full model would have, one full parameter at a time."""
    generator = torch.Generator().manual_seed(seed)
    if parallelize is None:
        return Transformer(cfg, generator=generator).to(device)
    with on_meta_device():
        model = Transformer(cfg)
    order = [(name, p.shape) for name, p in model.named_parameters()]
    parallelize(model)
    _allocate(model)
    model.set_rope_tables()
    _init_as_full(model, generator, order)
    return model.to(device)


def local_slice(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` that ``param`` holds: all of it, or its tensor-parallel slice
    (a sharded parameter carries ``_tp_shard_dim`` and ``_tp_shard_rank``)."""
    dim = getattr(param, "_tp_shard_dim", None)
    if dim is None:
        return full
    size = param.shape[dim]
    return full.narrow(dim, param._tp_shard_rank * size, size)


@torch.no_grad()
def _init_as_full(model: Transformer, generator: torch.Generator, order: list[tuple[str, torch.Size]]) -> None:
    """Transformer.reset_parameters for a model cut to a part: walking the full model's
    (name, shape) ``order``, the numbers of the parameters (or parts) it lacks are drawn into
    scratch, so what it keeps gets exactly the values of the full model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, shape in order:
        p = params.get(name)
        if p is None and name == "tok_embeddings.weight" and model.cfg.tie_embeddings:
            p = params.get("output.weight")  # a last stage's copy of the tied embedding
        std = model.init_std(name)
        if std is None:
            if p is not None:
                p.fill_(1.0)
            continue
        whole = p is not None and getattr(p, "_tp_shard_dim", None) is None
        target = p if whole else torch.empty(shape)
        target.normal_(0.0, std, generator=generator)
        if p is not None and not whole:
            p.copy_(local_slice(p, target))


def _allocate(model: nn.Module) -> None:
    """Give every meta parameter CPU storage, keeping ties and attributes (``to_empty`` makes
    a new Parameter per module, which would untie a tied head and drop ``_tp_shard_dim``)."""
    new: dict[nn.Parameter, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            if p not in new:
                new[p] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                new[p].__dict__.update(p.__dict__)
            module._parameters[name] = new[p]
