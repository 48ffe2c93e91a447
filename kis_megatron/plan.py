"""Memory and throughput planner: ``kis-train --config F.yaml key=value ... --plan [--json]``.

For a config and a world size it computes, with nothing trained and no weight allocated (the
model is laid out on the meta device), what each rank of that layout holds and does:

- **parameters per rank**, counted on the meta model cut the way the run cuts it (pipeline
  stages pruned by ``PipelineLayout.prune``, tensor-parallel slices by :func:`tp_shard_dim`,
  the rule ``apply_tp`` follows). ``held`` is what a rank stores; ``owned`` counts a
  replicated tensor (the norms, on every tensor-parallel rank) only on tensor-parallel rank
  0 and a pipeline's second copy of a tied embedding (the last stage's head) not at all, so
  ``owned`` summed over the ranks of one data-parallel replica is exactly the model's
  ``num_params()``.
- **memory per rank**: weights (fp32, which are also the optimizer's master weights: the
  model trains fp32 parameters under bf16 autocast, plus the bf16 copies autocast keeps for
  the backward), gradients (fp32; DDP keeps a second copy in its buckets), AdamW state (two
  fp32 moments; ZeRO-1 partitions them over dp as torch's ZeroRedundancyOptimizer does,
  largest tensors first onto the least-loaded rank) and activations: the tensors each
  layer saves for the backward under ``train.recompute``, counted from what this model's
  code saves (Triton kernels on CUDA, the PyTorch references on CPU; see
  :func:`activation_bytes`), times the micro-batches a pipeline schedule keeps in flight
  (1F1B: pp - stage; interleaved: torch's warm-up count + 1), plus the largest transient
  (one logits chunk of the loss, or one recomputed block).
- **FLOPs per step** (model FLOPs, as MFU counts them, and the hardware FLOPs that
  recomputation adds), **bytes each parallel dimension sends per step** per rank (README,
  "Choosing a layout"), and for a named GPU and an assumed MFU the step time and tokens/s,
  with a warning when a rank's total exceeds the GPU's usable memory.

The world size comes from ``--plan-world N`` (default ``$WORLD_SIZE``, else tp x pp: dp = 1);
the planner needs no torchrun. Accuracy, checked in ``tests/test_plan.py``: parameter counts
exact; weights, gradients and optimizer state exact against a built model and optimizer;
activations within 2 % of the bytes a real CPU step keeps (reference and Triton paths, fp32).
Derived from the code but not measured here: bf16 activations on CUDA and the pipeline
schedules' in-flight micro-batches (activations at tp=2 with and without sp are measured on
two gloo ranks: exact). Not modelled: the CUDA context, NCCL buffers and allocator fragmentation (the fit check keeps 10 %
of the GPU for them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch

from kis_kernels.ops.linear_cross_entropy import default_chunk_rows
from kis_megatron.config import Config, ConfigError
from kis_megatron.model.llama import ModelDims, Transformer, llama_ffn_dim, model_sizes, on_meta_device
from kis_megatron.parallel.pipeline import PipelineLayout, check_microbatches
from kis_megatron.parallel.tensor_parallel import check_tp, tp_shard_dim
from kis_megatron.training.device import GPUS

USABLE = 0.9  # of a GPU's memory (GPUS, training/device.py) a plan may fill
_GIB = 1024 ** 3

@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    vpp: int
    dp: int
    sp: bool
    zero1: bool
    micro_batches: int  # per step and data-parallel rank


def resolve_layout(cfg: Config, world: int) -> Layout:
    """The layout of ``cfg`` on ``world`` processes, with the trainer's own checks."""
    par, t = cfg.parallel, cfg.train
    if world < 1 or world % (par.tp * par.pp):
        raise ConfigError(f"--plan-world {world} is not a multiple of parallel.tp * parallel.pp = "
                          f"{par.tp * par.pp}")
    dp = world // (par.tp * par.pp)
    check_tp(ModelDims.from_config(cfg.model), par.tp)
    if t.global_batch % (t.micro_batch * dp):
        raise ConfigError(f"train.global_batch={t.global_batch} must be a multiple of "
                          f"micro_batch * dp = {t.micro_batch * dp}")
    m = t.global_batch // (t.micro_batch * dp)
    check_microbatches(m, par)
    return Layout(world, par.tp, par.pp, par.vpp, dp, par.sp, par.zero1, m)


# ---------------------------------------------------------------------------- parameters


def stage_parameters(cfg: Config, layout: Layout) -> list[dict]:
    """Per pipeline rank: ``held`` and ``owned`` parameter counts of one tensor-parallel
    rank (``owned_tp0`` for tensor-parallel rank 0, which also owns the replicated norms),
    the sizes of the tensors it steps (for ZeRO-1) and of its block linears (for autocast's
    bf16 copies)."""
    out = []
    for pp_rank in range(layout.pp):
        with on_meta_device():
            model = Transformer(cfg.model)
        stage = PipelineLayout(cfg.model.n_layers, cfg.parallel, pp_rank) if layout.pp > 1 else None
        if stage is not None:
            stage.prune(model)
        first = stage is None or stage.has_first
        held = owned = owned_tp0 = block_linear = 0
        sizes = []  # (numel, is matrix) of each tensor this rank steps
        for name, p in model.named_parameters():
            dim = tp_shard_dim(name)
            n = p.numel() // layout.tp if dim is not None else p.numel()
            held += n
            sizes.append((n, p.ndim >= 2))
            tied_copy = name == "output.weight" and cfg.model.tie_embeddings and not first
            if not tied_copy:
                owned += n if dim is not None else 0
                owned_tp0 += n
            if name.startswith("layers.") and p.ndim == 2:
                block_linear += n
        out.append({"pp_rank": pp_rank, "held": held, "owned_tp0": owned_tp0, "owned": owned,
                    "sizes": sizes, "block_linear": block_linear,
                    "layers": len(model.layers), "first": first,
                    "last": stage is None or stage.has_last})
    return out


def zero1_largest_share(sizes: list[tuple[int, bool]], dp: int) -> int:
    """Elements of optimizer state on the most loaded data-parallel rank under ZeRO-1: per
    parameter group (matrices with weight decay, then vectors), largest first, each onto
    the rank with the fewest so far (torch's ZeroRedundancyOptimizer partitioning)."""
    load = [0] * dp
    for group in (True, False):
        for n in sorted((n for n, matrix in sizes if matrix == group), reverse=True):
            load[load.index(min(load))] += n
    return max(load)


# ---------------------------------------------------------------------------- activations


def activation_bytes(cfg: Config, layout: Layout, stage: dict, cuda: bool, bf16: bool) -> dict:
    """Bytes one micro-batch leaves saved for the backward on this stage (``per_microbatch``)
    and the largest transient on top of the retained ones (``transient``).

    Per block, N = micro_batch x seq_len tokens, N_r = N / tp with sequence parallelism
    (norms and residual stream), h = dim, a = bytes of linear outputs (2 under bf16
    autocast), the residual stream float32; q, kv, f, heads per tensor-parallel rank:
    both norms keep their input (N_r h 4) and 1/rms (N_r 4) (the CPU reference also its
    normalised product, N_r h 4); the q/k/v linears keep their input (under autocast one
    bf16 copy per linear: 3 N h a, and 2 for gate/up; in fp32 the norm output once each,
    2 N h 4); attention keeps roped q, k, v, its output (N (2q + 2kv) a) and log-sum-exp
    (N heads 4); the MLP keeps gate and up (2 N f a; the CPU reference keeps them and
    silu(gate) in float32, 12 N f) and its product (N f a) for w_down. ``selective`` frees
    the log-sum-exp (the attention output stays: wo needs it); ``full`` keeps the block
    input only and recomputes one block at a time in the backward."""
    m, t = cfg.model, cfg.train
    tp, sp = layout.tp, layout.sp
    d_heads = m.dim // m.n_heads
    kv_heads = m.n_kv_heads or m.n_heads
    ffn = m.ffn_dim
    if ffn is None:
        ffn = llama_ffn_dim(m.dim)
    N = t.micro_batch * cfg.data.seq_len
    Nr = N // tp if sp else N
    h, a = m.dim, (2 if bf16 else 4)
    q, kv, f, heads = m.n_heads * d_heads // tp, kv_heads * d_heads // tp, ffn // tp, m.n_heads // tp
    ref = not (cuda and m.kernels)  # the PyTorch reference ops (CPU, or model.kernels=false)
    norm = Nr * h * 4 + Nr * 4 + (Nr * h * 4 if ref else 0)
    linear_inputs = 5 * N * h * a if bf16 else 2 * N * h * 4
    attention = N * (2 * q + 2 * kv) * a
    lse = N * heads * 4
    mlp = (12 * N * f + N * f * a) if ref else 3 * N * f * a
    block = 2 * norm + linear_inputs + attention + lse + mlp
    kept = {"none": block, "selective": block - lse, "full": Nr * h * 4}[t.recompute]
    per_mb = stage["layers"] * kept
    if layout.pp > 1 and not stage["last"]:
        per_mb += Nr * h * 4  # the stage output, kept by the schedule for the backward
    # Full recomputation: one block's activations rebuilt in the backward, and the gradient
    # flowing into it (its own saved tensors are freed as its backward proceeds).
    transient = block + Nr * h * 4 if t.recompute == "full" else 0
    if stage["first"]:
        per_mb += N * 9  # token ids (int64) and the vocabulary-shard mask
    if stage["last"]:
        vocab = m.vocab_size // tp
        per_mb += norm  # the final norm
        if m.kernels:  # fused loss: gradients computed in forward, kept for the backward
            g = 4 if ref else a
            per_mb += N * h * g + vocab * h * g
            chunk = default_chunk_rows(N, h, vocab)
            transient = max(transient, chunk * vocab * (4 if ref else a) + N * h * a)
        else:  # full logits: float32 log-softmax kept, plus the bf16 hidden and weight
            per_mb += N * vocab * 4 + (N * h * a + vocab * h * a if bf16 else N * h * 4)
            transient = max(transient, N * vocab * (a + 4))
    return {"per_microbatch": per_mb, "transient": transient}


def in_flight(layout: Layout, pp_rank: int) -> float:
    """Micro-batches of this rank's activations alive at once, in units of all its layers:
    1 without pipelining; 1F1B keeps pp - stage; interleaved 1F1B keeps torch's warm-up
    count + 1 chunk forwards, each 1/vpp of the rank's layers."""
    if layout.pp == 1:
        return 1.0
    if layout.vpp == 1:
        return float(min(layout.micro_batches, layout.pp - pp_rank))
    chunks = (layout.vpp - 1) * layout.pp + 2 * (layout.pp - 1 - pp_rank) + 1
    return min(chunks, layout.micro_batches * layout.vpp) / layout.vpp


# ---------------------------------------------------------------------------- the plan


def comm_bytes(cfg: Config, layout: Layout, stage: dict, bf16: bool) -> dict:
    """Bytes this rank sends per optimizer step, by parallel dimension (ring collectives: an
    all-reduce of X bytes over n ranks sends 2 (n-1)/n X per rank; all-gather and
    reduce-scatter (n-1)/n X each)."""
    m, t = cfg.model, cfg.train
    h, a = m.dim, (2 if bf16 else 4)
    tokens = t.micro_batch * cfg.data.seq_len  # per micro-batch
    mb = layout.micro_batches
    out = {"dp": 0.0, "zero1": 0.0, "tp": 0.0, "pp": 0.0}
    if layout.dp > 1:
        share = (layout.dp - 1) / layout.dp
        out["dp"] = 2 * share * 4 * stage["held"]  # fp32 gradients
        if layout.zero1:
            out["zero1"] = share * 4 * stage["held"]  # updated parameters broadcast
    if layout.tp > 1:
        share = 2 * (layout.tp - 1) / layout.tp  # all-reduce, or all-gather + reduce-scatter
        # Per layer: forward, the two row-parallel outputs (a bytes); backward, the gradients
        # of the two column-parallel inputs (float32: autocast casts inside the linear).
        per_layer = 2 * tokens * h * a + 2 * tokens * h * 4
        extra = 0
        if stage["first"]:
            extra += tokens * h * 4  # embedding: partial rows summed
        if stage["last"]:
            extra += tokens * h * 4 + 3 * tokens * 4  # head input gradient; loss statistics
        out["tp"] = mb * share * (stage["layers"] * per_layer + extra)
    if layout.pp > 1:
        boundary = tokens * h * 4 / (layout.tp if layout.sp else 1)  # the float32 residual stream
        sends = (0 if stage["last"] else 1) + (0 if stage["first"] else 1)  # forward, backward
        out["pp"] = mb * layout.vpp * sends * boundary
        if m.tie_embeddings and (stage["first"] or stage["last"]):
            out["pp"] += m.vocab_size // layout.tp * h * 4  # the tied embedding's gradient sum
    out["total"] = sum(out.values())
    return {k: int(v) for k, v in out.items()}


def plan(cfg: Config, world: int, gpu: str | None = "h100", mfu: float = 0.4) -> dict:
    """The plan of ``cfg`` on ``world`` processes (see the module doc); ``gpu`` a key of
    ``GPUS`` or None for the CPU path (no fit check, no step time)."""
    if gpu is not None and gpu not in GPUS:
        raise ConfigError(f"--plan-gpu {gpu!r}: choose from {', '.join(GPUS)} (or cpu)")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--plan-mfu {mfu}: must be in (0, 1]")
    layout = resolve_layout(cfg, world)
    t = cfg.train
    cuda = gpu is not None
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and cuda)
    stages = stage_parameters(cfg, layout)
    ranks = []
    for st in stages:
        optim_elems = zero1_largest_share(st["sizes"], layout.dp) if layout.zero1 else st["held"]
        act = activation_bytes(cfg, layout, st, cuda, bf16)
        copies = 2 * st["block_linear"] if bf16 and t.recompute != "full" else 0
        ddp = layout.dp > 1 and layout.pp == 1  # DDP's buckets hold a second copy of the gradients
        mem = {"weights": 4 * st["held"] + copies,
               "grads": 4 * st["held"] * (2 if ddp else 1),
               "optimizer": 8 * optim_elems,
               "activations": int(act["per_microbatch"] * in_flight(layout, st["pp_rank"]) + act["transient"])}
        mem["total"] = sum(mem.values())
        ranks.append({"pp_rank": st["pp_rank"], "params_held": st["held"],
                      "params_owned_tp0": st["owned_tp0"], "params_owned_other_tp": st["owned"],
                      "layers": st["layers"], "memory_bytes": mem,
                      "comm_bytes_per_step": comm_bytes(cfg, layout, st, bf16)})
    worst = max(ranks, key=lambda r: r["memory_bytes"]["total"])
    sizes = model_sizes(cfg.model, cfg.data.seq_len)
    tokens = t.global_batch * cfg.data.seq_len
    flops = sizes["flops_per_token"] * tokens
    m = cfg.model
    fwd_attention = 4.0 * m.n_layers * m.dim * cfg.data.seq_len * tokens
    extra = {"none": 0.0, "selective": fwd_attention,
             "full": flops / 3 - 2.0 * m.vocab_size * m.dim * tokens}[t.recompute]  # a forward of the blocks
    out = {
        "layout": {"world_size": layout.world, "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp,
                   "dp": layout.dp, "sp": layout.sp, "zero1": layout.zero1,
                   "micro_batches_per_step": layout.micro_batches},
        "device": gpu or "cpu", "dtype": "bf16" if bf16 else "fp32", "recompute": t.recompute,
        "model_params": sizes["model_params"],
        "params_per_rank": max(r["params_held"] for r in ranks),  # the maxima over ranks

        "memory_bytes_per_rank": worst["memory_bytes"],
        "flops_per_step": flops,
        "hardware_flops_per_step": flops + extra,
        "comm_bytes_per_step": worst["comm_bytes_per_step"],
        "tokens_per_step": tokens,
        "ranks": ranks,
        "warnings": [],
    }
    if cuda:
        name, gib = GPUS[gpu].name, GPUS[gpu].memory_gib
        peak = GPUS[gpu].peak_tflops(bf16) * 1e12
        step = flops / (layout.world * peak * mfu)
        usable = int(USABLE * gib * _GIB)
        out["gpu"] = {"name": name, "memory_bytes": gib * _GIB, "usable_bytes": usable,
                      "peak_tflops": peak / 1e12, "mfu": mfu, "step_time_s": step,
                      "tokens_per_s": tokens / step, "fits": worst["memory_bytes"]["total"] <= usable}
        if not out["gpu"]["fits"]:
            out["warnings"].append(
                f"will not fit: pipeline rank {worst['pp_rank']} needs "
                f"{worst['memory_bytes']['total'] / _GIB:.1f} GiB, {name} offers ~{usable / _GIB:.0f} GiB "
                f"usable; raise parallel.tp / parallel.pp, set parallel.zero1=true or "
                f"train.recompute=full, or lower train.micro_batch")
    return out


def _gib(n: float) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB / 4 else f"{n / 2**20:.2f} MiB"


def format_plan(p: dict) -> str:
    """The plan as text for a terminal."""
    lay, mem = p["layout"], p["memory_bytes_per_rank"]
    lines = [f"layout: world {lay['world_size']} = dp {lay['dp']} x pp {lay['pp']} x tp {lay['tp']}"
             f" (vpp {lay['vpp']}, sp {lay['sp']}, zero1 {lay['zero1']}), "
             f"{lay['micro_batches_per_step']} micro-batches per step and dp rank; {p['device']}, "
             f"{p['dtype']}, recompute {p['recompute']}",
             f"model: {p['model_params']:,} parameters; {p['tokens_per_step']:,} tokens and "
             f"{p['flops_per_step']:.3e} FLOPs per step ({p['hardware_flops_per_step']:.3e} with recomputation)",
             "per rank (the largest over ranks; each pipeline rank below):",
             f"  parameters {p['params_per_rank']:,}",
             "  memory " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.items()),
             "  sends per step " + ", ".join(f"{k} {_gib(v)}" for k, v in p["comm_bytes_per_step"].items())]
    if len(p["ranks"]) > 1:
        for r in p["ranks"]:
            lines.append(f"  pp rank {r['pp_rank']}: {r['layers']} layers, {r['params_held']:,} parameters, "
                         f"total {_gib(r['memory_bytes']['total'])} (activations "
                         f"{_gib(r['memory_bytes']['activations'])})")
    if "gpu" in p:
        g = p["gpu"]
        lines.append(f"on {g['name']} at {g['mfu']:.0%} MFU ({g['peak_tflops']:.0f} TFLOP/s peak): "
                     f"{g['step_time_s']:.3f} s per step, {g['tokens_per_s']:,.0f} tokens/s; memory "
                     f"{'fits' if g['fits'] else 'DOES NOT FIT'} ({_gib(mem['total'])} of "
                     f"{_gib(g['usable_bytes'])} usable)")
    lines += [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("planning (--plan: print the plan and exit; nothing is trained)")
    g.add_argument("--plan", action="store_true", help="print memory, FLOPs and traffic per rank")
    g.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    g.add_argument("--plan-world", type=int, default=None,
                   help="processes in all (default $WORLD_SIZE, else parallel.tp * parallel.pp)")
    g.add_argument("--plan-gpu", default="h100",
                   help=f"GPU to plan for: {', '.join(GPUS)}, or cpu (default h100)")
    g.add_argument("--plan-mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (0.4)")


def run(cfg: Config, args: argparse.Namespace) -> int:
    """``kis-train ... --plan``: print the plan (text or JSON). Warnings are part of the
    text on stdout; with ``--json`` they are in the JSON and also printed to stderr."""
    world = args.plan_world or int(os.environ.get("WORLD_SIZE", "0")) or cfg.parallel.tp * cfg.parallel.pp
    gpu = None if args.plan_gpu == "cpu" else args.plan_gpu
    p = plan(cfg, world, gpu, args.plan_mfu)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))
    for w in p["warnings"]:
        if args.json:
            print(f"warning: {w}", file=sys.stderr)
    return 0


def warn_if_unfit(cfg: Config, world: int, device: torch.device) -> str | None:
    """Before a CUDA run builds anything: the warning when the plan of this rank's layout
    exceeds 90 % of this GPU's memory (None when it fits, or off CUDA)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        p = plan(cfg, world, "h100", 0.4)  # the GPU's name only sets the peak FLOP/s, unused here
    except Exception as e:  # a planner bug must not stop a run; the trainer checks the layout itself
        return f"warning: no memory plan for this layout ({type(e).__name__}: {e})"
    need = p["memory_bytes_per_rank"]["total"]
    if need <= USABLE * total:
        return None
    return (f"warning: the plan of this layout needs {_gib(need)} per rank, more than 90% of this "
            f"GPU's {_gib(total)}; see kis-train ... --plan")
