"""The parallel layout of a run: how the world of processes splits into data, pipeline and
tensor parallel groups, validated once and turned into a named DeviceMesh.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; ``parallel.tp`` and ``parallel.pp`` come from
the config and data parallelism takes the rest (dp = world / (tp * pp)). The mesh is
``(dp, pp, tp)`` with tp innermost, as in Megatron: ranks 0..tp-1 form the first
tensor-parallel group, so the chattiest group stays inside a node, and pipeline neighbours
are tp ranks apart.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from kis_megatron.config import ConfigError, ParallelConfig


@dataclass
class ParallelDims:
    world_size: int
    rank: int
    local_rank: int
    dp: int
    tp: int = 1
    pp: int = 1
    mesh: Optional[object] = field(default=None, repr=False, compare=False)  # DeviceMesh (dp, pp, tp)

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.pp)  # dp is the outermost dimension

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp  # tp is the innermost dimension

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tp) % self.pp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp_group(self) -> Optional[dist.ProcessGroup]:
        """This rank's tensor-parallel group; None when tp == 1 (nothing is sharded)."""
        return self._group("tp") if self.tp > 1 else None

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        """This rank's data-parallel group (ranks holding the same shards); None when dp == 1."""
        return self._group("dp") if self.dp > 1 else None

    @property
    def pp_group(self) -> Optional[dist.ProcessGroup]:
        """This rank's pipeline group (one rank per stage); None when pp == 1."""
        return self._group("pp") if self.pp > 1 else None

    def _group(self, name: str) -> dist.ProcessGroup:
        if self.mesh is None:
            raise RuntimeError("ParallelDims: call init_distributed before asking for process groups")
        return self.mesh.get_group(name)

    @classmethod
    def from_env(cls, cfg: ParallelConfig) -> "ParallelDims":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.tp < 1 or cfg.pp < 1:
            raise ConfigError(f"parallel.tp={cfg.tp} and parallel.pp={cfg.pp} must be >= 1")
        if world % (cfg.tp * cfg.pp):
            raise ConfigError(f"world size {world} is not a multiple of parallel.tp * parallel.pp = "
                              f"{cfg.tp * cfg.pp}")
        return cls(world_size=world, rank=rank, local_rank=local, dp=world // (cfg.tp * cfg.pp),
                   tp=cfg.tp, pp=cfg.pp)


def init_distributed(dims: ParallelDims, device: torch.device, timeout_s: int) -> Optional[dist.ProcessGroup]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) and build the
    (dp, pp, tp) mesh on ``dims``. A timeout on every collective bounds how long a rank waits
    for a peer that died."""
    if dims.world_size == 1:
        return None
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dims.mesh is None:
        dims.mesh = init_device_mesh(device.type, (dims.dp, dims.pp, dims.tp),
                                     mesh_dim_names=("dp", "pp", "tp"))
    return dist.group.WORLD


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _multi_process() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (one all-reduce of one number),
    so that decisions such as skipping a step are taken by all ranks together."""
    if not _multi_process():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_rank0(obj):
    """Rank 0's ``obj`` on every rank (a decision read from shared files, taken once)."""
    if not _multi_process():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
