"""Checkpoints that survive a kill at any moment.

Layout under ``<run>/checkpoints/``::

    step_00000100/          model + optimizer through torch.distributed.checkpoint (DCP),
        .metadata           so a different parallel layout can reshard them on load; a
                            tensor-parallel tensor is one chunk per shard (DTensor)
        __0_0.distcp
        extra_rank0.pt      step, scheduler, data-stream position, RNG states: one file
        extra_rank1.pt ...  per rank (extra_rank{r}.pt); a resume at another layout reads
                            its own rank's, else rank 0's
        COMPLETE            written last: a directory without it is never loaded
    latest                  text file naming the newest complete checkpoint

A save writes into ``.tmp-step_...``, renames it to ``step_...`` once everything (including
COMPLETE) is on disk, and only then replaces ``latest`` (itself written to a temporary name
and renamed). A kill before the rename leaves a ``.tmp-`` directory that is ignored and
cleaned up; a kill after it leaves a complete checkpoint. Old checkpoints are deleted only
after ``latest`` points past them. A save of weights that are not all finite is refused.

Resuming (``resumable``) skips, with the reason, a complete checkpoint whose files were
damaged afterwards (a missing or unreadable ``.metadata``, a shard shorter than its metadata
says, an ``extra_rank*.pt`` that is not a whole archive) and takes the newest whole one;
``check_fits`` refuses a checkpoint whose tensors are not exactly the model's.
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from kis_megatron.errors import KisError
from kis_megatron.model.llama import Transformer, on_meta_device
from kis_megatron.parallel.dims import any_rank, from_rank0
from kis_megatron.run_dir import complete_checkpoints
from kis_megatron.training.optim import local_optimizer
from kis_megatron.utils import atomic_write, atomic_write_text, publish_dir



class CheckpointError(KisError, RuntimeError):
    """A checkpoint that cannot be used; the message names the path."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _dcp_quietly(fn, *args, **kwargs):
    # DCP warns that it "assumes a single process" when no process group exists: that is
    # exactly the single-process case, so the warning is noise there.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, **kwargs)


def _shard_dims(model: torch.nn.Module) -> dict[str, int]:
    """FQN -> the dimension a tensor-parallel parameter is cut along (tied names included)."""
    return {name: p._tp_shard_dim for name, p in model.named_parameters(remove_duplicate=False)
            if getattr(p, "_tp_shard_dim", None) is not None}


# The optimizer state flattened to one key per parameter and entry ("state.<fqn>.exp_avg",
# "param_groups.<fqn>.lr"): every rank then holds exactly the keys of the parameters it
# steps, so a pipeline stage or a ZeRO-1 shard saves its part and loads any other.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _sharded_entries(model, msd: dict, osd: Optional[dict]):
    """(container, key, shard dim) of every sharded tensor in the model and (flattened)
    optimizer state dicts: parameters, and states shaped like their parameter (Adam's moments)."""
    dims = _shard_dims(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, d in dims.items():
        if name in msd:
            yield msd, name, d
    for key, value in (osd or {}).items():
        fqn = key.removeprefix("state.").rpartition(".")[0]
        if key.startswith("state.") and fqn in dims and torch.is_tensor(value) \
                and value.shape == params[fqn].shape:
            yield osd, key, dims[fqn]


def _as_dtensor(local: torch.Tensor, dim: int, mesh) -> torch.Tensor:
    """This rank's shard as a DTensor sharded along ``dim`` over ``mesh`` (no copy, no
    communication: shards are equal, so the global shape follows from the local one)."""
    shape = list(local.shape)
    shape[dim] *= mesh.size()
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                              stride=stride)


class CheckpointManager:
    """Saves and loads checkpoints of one run.

    ``tp_group``: the tensor-parallel group when parameters are sharded (``apply_tp``).
    Each sharded tensor (a parameter and its Adam moments) is handed to DCP as a DTensor
    over that group: every rank writes only its own shard, with its offset in the full
    tensor, and reads back only the part it owns, so no rank holds a full tensor it does not
    own. The files name full tensors by their single-process names, so DCP reshards a
    checkpoint saved at one ``parallel.tp`` (or pipeline layout, or one process) to another."""

    def __init__(self, directory: str | Path, keep: int = 2, tp_group=None):
        self.dir = Path(directory)
        self.keep = keep
        self.tp_group = tp_group
        self._tp_mesh = None
        # Optimizer-state names this rank saves and loads under another parameter's name: a
        # pipeline's last stage steps its copy of a tied embedding as "output.weight", but the
        # state is the embedding's (one name whatever the layout).
        self.optim_aliases: dict[str, str] = {}

    def _sharded(self, model, msd: dict, osd: Optional[dict]) -> list:
        """(container, key) of every tensor-parallel tensor, each replaced by its DTensor view."""
        if self.tp_group is None:
            return []
        if self._tp_mesh is None:
            device = next(model.parameters()).device.type
            self._tp_mesh = DeviceMesh.from_group(self.tp_group, device_type=device)
        entries = list(_sharded_entries(model, msd, osd))
        for container, key, dim in entries:
            container[key] = _as_dtensor(container[key], dim, self._tp_mesh)
        return [(container, key) for container, key, _ in entries]

    # ------------------------------------------------------------------ discovery

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        return complete_checkpoints(self.dir)

    def latest(self) -> Optional[Path]:
        """The checkpoint ``latest`` names if it is complete, else the newest complete one."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if (path / "COMPLETE").is_file():
                return path
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def resumable(self) -> tuple[Optional[Path], list[tuple[Path, str]]]:
        """The newest whole checkpoint (the one ``latest`` names first, then newest first),
        and the damaged ones passed over with the reason. ``(None, [])`` when there is no
        complete checkpoint at all; a CheckpointError when every one is damaged. Decided on
        rank 0, so that every rank resumes from the same checkpoint."""
        return from_rank0(self._resumable() if _rank() == 0 else None)

    def _resumable(self):
        found = self.complete_checkpoints()[::-1]
        named = self.latest()
        if named in found:
            found.remove(named)
            found.insert(0, named)
        skipped = []
        for path in found:
            reason = damage(path)
            if reason is None:
                return path, skipped
            skipped.append((path, reason))
        if skipped:
            raise CheckpointError(
                f"every checkpoint in {self.dir} is damaged: "
                + "; ".join(f"{p.name}: {r}" for p, r in skipped)
                + f". Restore them, or remove {self.dir} to start the run afresh")
        return None, []

    # ------------------------------------------------------------------ save

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             extra: dict[str, Any], files: Optional[dict[str, str]] = None) -> Path:
        """Save atomically; ``extra`` holds small picklable state (scheduler, data position),
        ``files`` small text files (name -> content) that rank 0 writes beside it."""
        name = f"step_{step:08d}"
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        bad = _first_nonfinite(model)
        device = next(model.parameters()).device
        if any_rank(bad is not None, device):  # every rank refuses together
            raise CheckpointError(f"refusing to save step {step} to {final}: "
                                  f"{bad or 'a parameter of another rank'} is not finite")
        rank = _rank()
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()
        msd, osd = get_state_dict(model, local_optimizer(optimizer), options=_FLAT)
        msd, osd = dict(msd), dict(osd)  # swap in DTensor views without touching live state
        self._sharded(model, msd, osd)
        osd, _ = _renamed(osd, self.optim_aliases)
        _dcp_quietly(dcp.save, {"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        state = {**extra, "step": step, "rng": rng_state()}
        atomic_write(tmp / f"extra_rank{rank}.pt", lambda f: torch.save(state, f))
        _barrier()
        if rank == 0:
            for fname, text in (files or {}).items():
                atomic_write_text(tmp / fname, text)
            atomic_write_text(tmp / "COMPLETE", f"{step}\n")
            # Every file flushed, then renamed into place; an existing one (a step saved
            # again, e.g. the final save after a periodic one) is replaced whole.
            publish_dir(tmp, final)
            atomic_write_text(self.dir / "latest", name + "\n")
            self._prune(name)
        _barrier()
        return final

    def _prune(self, saved: str) -> None:
        for stale in self.dir.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        # Only those up to the one just saved: checkpoints past it (a damaged one passed over
        # on resume) must not count towards `keep`, or the new save itself would go.
        done = [p for p in self.complete_checkpoints() if p.name <= saved]
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def load(self, path: str | Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict:
        """Load model (and optimizer) state in place; return this rank's ``extra`` dict."""
        path = Path(path)
        if not (path / "COMPLETE").is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
        if optimizer is None:
            state = {"model": dict(get_model_state_dict(model))}
        else:
            msd, osd = get_state_dict(model, local_optimizer(optimizer), options=_FLAT)
            state = {"model": dict(msd), "optim": dict(osd)}
        # Each rank's shards are read in place, as DTensor views of its own tensors.
        sharded = self._sharded(model, state["model"], state.get("optim"))
        if "optim" in state:  # tensors load in place; other values come back under the alias
            aliased, back = _renamed(state["optim"], self.optim_aliases)
            _read(path, {**state, "optim": aliased})
            for key, value in aliased.items():
                state["optim"][back.get(key, key)] = value
        else:
            _read(path, state)
        for container, key in sharded:
            container[key] = container[key].to_local()
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, local_optimizer(optimizer), model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=_FLAT)
        extra_file = path / f"extra_rank{_rank()}.pt"
        if not extra_file.is_file():
            extra_file = path / "extra_rank0.pt"  # a run resumed on a different layout
        try:
            return torch.load(extra_file, weights_only=False)
        except Exception as e:  # a damaged file: torch raises several kinds
            raise CheckpointError(f"{extra_file} is damaged ({type(e).__name__}: {e})") from None


def model_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every tensor a checkpoint of this model holds (the
    single-process names and shapes whatever the layout), from a meta-device model."""
    with on_meta_device():
        model = Transformer(model_cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _metadata(path: Path):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing .metadata") from None
    except Exception as e:  # unpickling a cut file raises several kinds
        raise CheckpointError(f"{path}: .metadata is unreadable ({type(e).__name__}: {e})") from None


def damage(path: str | Path) -> Optional[str]:
    """Why a complete checkpoint cannot be loaded, or None. Reads the metadata and the
    archives' directories only: every file the metadata points into must hold the bytes it
    promises, and each ``extra_rank*.pt`` must be a whole archive (a cut one is not)."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        return "no COMPLETE marker"
    try:
        meta = _metadata(path)
    except CheckpointError as e:
        return str(e).removeprefix(f"{path}: ")
    need: dict[str, int] = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(need.items()):
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size < end:
            return f"{name} is truncated ({f.stat().st_size} bytes; its metadata needs {end})"
    extras = sorted(path.glob("extra_rank*.pt"))
    if not extras:
        return "missing extra_rank0.pt"
    for f in extras:
        try:
            zipfile.ZipFile(f).close()  # torch.save writes a zip; a cut one has no directory
        except (zipfile.BadZipFile, OSError) as e:
            return f"{f.name} is cut or damaged ({e})"
    return None


def check_fits(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, naming the first offending tensor and both shapes, a checkpoint whose model
    tensors are not exactly ``shapes`` (see model_shapes): one missing, extra or of another
    shape. Reads only the checkpoint's metadata."""
    path = Path(path)
    meta = _metadata(path)
    saved = {k.removeprefix("model."): tuple(v.size) for k, v in meta.state_dict_metadata.items()
             if k.startswith("model.") and hasattr(v, "size")}
    hint = "it was saved from another model (compare the model section of its run's config.yaml)"
    for name, shape in shapes.items():
        if name not in saved:
            raise CheckpointError(f"{path} does not fit this model: it lacks model.{name} (shape "
                                  f"{list(shape)} in the model); {hint}")
        if saved[name] != shape:
            raise CheckpointError(f"{path} does not fit this model: model.{name} has shape "
                                  f"{list(saved[name])} in the checkpoint but {list(shape)} in "
                                  f"the model; {hint}")
    for name, shape in saved.items():
        if name not in shapes:
            raise CheckpointError(f"{path} does not fit this model: it holds model.{name} (shape "
                                  f"{list(shape)}), which the model lacks; {hint}")


def verify(path: str | Path, model_cfg) -> None:
    """Refuse, naming the reason, a checkpoint that is damaged or is not of this model."""
    reason = damage(path)
    if reason is not None:
        raise CheckpointError(f"{path} cannot be loaded: {reason}")
    check_fits(path, model_shapes(model_cfg))


def _first_nonfinite(model: torch.nn.Module) -> Optional[str]:
    """Name of this rank's first parameter holding a NaN or an infinity, else None."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            return name
    return None


def _read(path: Path, state: dict) -> None:
    try:
        _dcp_quietly(dcp.load, state, checkpoint_id=str(path))
    except (RuntimeError, CheckpointException) as e:  # DCP wraps each rank's error (a BaseException)
        found = re.findall(r"Missing key in checkpoint state_dict: (\S+)", str(e))
        if not found:  # bytes damaged in place: sizes and metadata are whole, the data is not
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise CheckpointError(f"{path} cannot be read, it is damaged: {last[0][:300]}") from None
        key = found[-1].rstrip(".")  # the last: the text holds the traceback's source lines too
        raise CheckpointError(
            f"{path} lacks {key}: it was saved from another model, or by a kis-megatron before "
            "the optimizer state was saved per parameter (November 2026), which cannot be "
            "resumed; its weights still load for evaluation and export "
            "(tools/eval_retention.py, tools/export_hf.py)") from None


def _renamed(osd: Optional[dict], aliases: dict[str, str]) -> tuple[Optional[dict], dict[str, str]]:
    """``osd`` (flattened) with each aliased parameter's keys renamed; and new -> old key."""
    if not aliases or osd is None:
        return osd, {}
    out, back = {}, {}
    for key, value in osd.items():
        kind, _, rest = key.partition(".")  # "state" / "param_groups", "<fqn>.<entry>"
        for old, new in aliases.items():
            if rest.startswith(old + "."):
                renamed = f"{kind}.{new}{rest[len(old):]}"
                back[renamed] = key
                key = renamed
                break
        out[key] = value
    return out, back
