"""Pipeline parallelism: the layers split into stages on the ranks of a pipeline group,
micro-batches streamed through them by torch.distributed.pipelining's schedules (1F1B, and
interleaved 1F1B when each rank holds ``parallel.vpp`` virtual stages).

There are ``pp * vpp`` stages in layer order; stage ``s`` lives on pipeline rank ``s % pp``
as that rank's chunk ``s // pp`` (Megatron's interleaved assignment). The first stage also
embeds the tokens, the last applies the final norm; the LM head and loss run in the
schedule's loss function on the last stage. Layers split evenly, the first stages taking one
more when it does not divide, unless ``parallel.pp_layers`` lists the layers of each stage.

Each rank keeps ONE ``Transformer`` holding only what its chunks own, under the same
parameter names as the full model (layers stay keyed by global index), so the optimizer,
clipping and checkpoints see a model like any other and a checkpoint reshards to any layout.
``build_model(..., parallelize=...)`` with ``layout.prune`` allocates only that part, with the
values the full model of the same seed would have, so every layout starts from the same
weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from kis_megatron.config import ConfigError, ParallelConfig
from kis_megatron.parallel.tensor_parallel import seq_multiple


def stage_layer_ids(n_layers: int, n_stages: int, layers_per_stage: Optional[list[int]] = None) -> list[list[int]]:
    """Global layer indices of each stage, in stage order."""
    counts = list(layers_per_stage or [])
    if not counts:
        base, extra = divmod(n_layers, n_stages)
        counts = [base + (s < extra) for s in range(n_stages)]
    if len(counts) != n_stages or sum(counts) != n_layers or min(counts) < 1:
        raise ConfigError(f"parallel.pp_layers={counts}: need {n_stages} stages of >= 1 layer "
                          f"summing to model.n_layers={n_layers}")
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


class PipelineLayout:
    """Which stages (and so which layers) one pipeline rank owns."""

    def __init__(self, n_layers: int, par: ParallelConfig, pp_rank: int):
        self.pp, self.vpp, self.pp_rank = par.pp, par.vpp, pp_rank
        self.n_stages = par.pp * par.vpp
        self.all_layers = stage_layer_ids(n_layers, self.n_stages, par.pp_layers)
        self.stages = [c * par.pp + pp_rank for c in range(par.vpp)]  # this rank's, in order

    def owner(self, stage: int) -> int:
        return stage % self.pp

    @property
    def has_first(self) -> bool:
        return 0 in self.stages

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stages

    def owned_layers(self) -> set[int]:
        return {i for s in self.stages for i in self.all_layers[s]}

    def prune(self, model: nn.Module) -> None:
        """Drop, in place, every part of the full model this rank's stages do not own (on
        the meta device, before any weight is allocated: see ``parallelize.build_model``)."""
        keep = {str(i) for i in self.owned_layers()}
        for key in [k for k in model.layers if k not in keep]:
            del model.layers[key]
        if not self.has_first:
            model.tok_embeddings = None
        if not self.has_last:
            model.norm = None
            model.output = None


def check_microbatches(n_microbatches: int, par: ParallelConfig) -> None:
    """1F1B needs at least one micro-batch per stage to fill the pipeline; the interleaved
    schedule also a whole number of rounds of pp micro-batches (Megatron's rule)."""
    if par.pp == 1:
        return
    how = ("micro-batches per step = train.global_batch / (train.micro_batch * dp) = "
           f"{n_microbatches}")
    if n_microbatches < par.pp:
        raise ConfigError(f"{how} must be >= parallel.pp={par.pp} to fill the pipeline "
                          "(raise train.global_batch or lower train.micro_batch)")
    if par.vpp > 1 and n_microbatches % par.pp:
        raise ConfigError(f"{how} must be a multiple of parallel.pp={par.pp} with parallel.vpp > 1")


class PipelineChunk(nn.Module):
    """One stage's forward: embed (first stage), its layers, final norm (last stage). Holds
    references to the model's own submodules, so parameters are shared, not copied."""

    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.embed = model.tok_embeddings if first else None
        self.layers = nn.ModuleList([model.layers[str(i)] for i in layer_ids])
        self.norm = model.norm if last else None
        self._model = (model,)  # for the rotary tables; a tuple keeps it out of the submodules

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        x = self._model[0].run_layers(x, self.layers)
        return self.norm(x) if self.norm is not None else x


def tied_embedding_group(dims):
    """The group of the two ranks, first and last stage of one pipeline, that hold the same
    (tensor-parallel shard of a) tied embedding; None on the other ranks. Every rank must
    call this, in the same order (``new_group`` is collective)."""
    mine = None
    for dp in range(dims.dp):
        for tp in range(dims.tp):
            base = dp * dims.pp * dims.tp + tp
            ranks = [base, base + (dims.pp - 1) * dims.tp]
            group = dist.new_group(ranks)
            if dims.rank in ranks:
                mine = group
    return mine


class Pipeline:
    """Runs training steps and forward-only evaluation through this rank's stages.

    Build after tensor parallelism and compilation have been applied to the pruned model.

    Tied embeddings (Megatron's scheme): the last stage keeps its own copy of the embedding
    as its head, equal at the start (both cut from the same full model); after each backward
    the two copies' gradients are summed over ``tied_group``, so they stay equal. The copy
    is marked ``_tied_copy`` so the gradient norm counts it once."""

    def __init__(self, model: nn.Module, layout: PipelineLayout, group, n_microbatches: int,
                 device: torch.device, autocast, tied_group=None):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        self.model, self.layout, self.group, self.device = model, layout, group, device
        self.n_microbatches, self.autocast = n_microbatches, autocast
        self.tied_group = tied_group
        self.tied_weight = None
        if tied_group is not None:
            self.tied_weight = model.tok_embeddings.weight if layout.has_first else model.output.weight
            if not layout.has_first:
                self.tied_weight._tied_copy = True
        self.chunks = [PipelineChunk(model, layout.all_layers[s], s == 0, s == layout.n_stages - 1)
                       for s in layout.stages]
        stages = [PipelineStage(chunk, s, layout.n_stages, device, group=group)
                  for chunk, s in zip(self.chunks, layout.stages)]
        # Each micro-batch's loss is divided here, so gradients sum to the global-batch mean
        # as in the non-pipelined loop (the schedule's own scaling is off).
        loss_fn = self._loss
        if layout.vpp == 1:
            self.schedule = Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)

    def _loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model.head(h, targets) / self.n_microbatches

    def train_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Forward and backward of ``tokens`` (this data-parallel rank's micro-batches,
        stacked); returns the mean loss on every rank of the pipeline."""
        losses: list[torch.Tensor] = []
        inputs = (tokens[:, :-1].contiguous(),) if self.layout.has_first else ()
        target = tokens[:, 1:].contiguous() if self.layout.has_last else None
        with self.autocast():
            self.schedule.step(*inputs, target=target, losses=losses, return_outputs=False)
        if self.tied_weight is not None and self.tied_weight.grad is not None:
            dist.all_reduce(self.tied_weight.grad, group=self.tied_group)
        total = torch.stack([l.detach().float() for l in losses]).sum() if losses else \
            torch.zeros((), device=self.device)
        return self._from_last_stage(total)

    def _from_last_stage(self, x: torch.Tensor) -> torch.Tensor:
        last = dist.get_global_rank(self.group, self.layout.owner(self.layout.n_stages - 1))
        x = x.contiguous()
        dist.broadcast(x, src=last, group=self.group)
        return x

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Forward only, stage after stage (no schedule: evaluation is small): logits, or the
        mean loss with ``targets``, on every rank of the pipeline, as ``model(tokens, targets)``."""
        model, layout = self.model, self.layout
        T = tokens.size(1)
        pad = -T % seq_multiple(model)
        if pad:
            tokens = torch.nn.functional.pad(tokens, (0, pad))
            if targets is not None:
                targets = torch.nn.functional.pad(targets, (0, pad), value=-100)
        shape = (tokens.size(0), tokens.size(1) // seq_multiple(model), model.dims.dim)
        h = None
        for s in range(layout.n_stages):
            owner = layout.owner(s)
            if owner != layout.pp_rank:
                continue
            if s == 0:
                x = tokens
            else:
                x = torch.empty(shape, dtype=torch.float32, device=self.device)
                dist.recv(x, src=dist.get_global_rank(self.group, layout.owner(s - 1)), group=self.group)
            with self.autocast():
                h = self.chunks[layout.stages.index(s)](x)
            if s < layout.n_stages - 1:
                dist.send(h.float().contiguous(), dst=dist.get_global_rank(self.group, layout.owner(s + 1)),
                          group=self.group)
        if targets is not None:
            loss = torch.zeros((), device=self.device)
            if layout.has_last:
                with self.autocast():
                    loss = model.head(h, targets).float()
            return self._from_last_stage(loss)
        V = model.dims.vocab_size
        logits = torch.empty((tokens.size(0), tokens.size(1), V), dtype=torch.float32, device=self.device)
        if layout.has_last:
            with self.autocast():
                logits = model.head(h).float().contiguous()
        logits = self._from_last_stage(logits)
        return logits[:, :T] if pad else logits

    __call__ = forward
