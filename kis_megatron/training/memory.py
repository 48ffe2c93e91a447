"""Exact tensor memory on any device, CPU included: :class:`LiveTensorBytes` counts the
bytes of every tensor storage that operators create while it is active, for as long as the
storage lives, and records the peak. Allocator caching, fragmentation and the Python heap
are not counted; tensors that existed before (weights) are not counted either.

Used to measure activation memory on CPU (``benchmarks/bench_recompute_memory.py``) and to
check the planner's activation estimate (``kis_megatron/plan.py``) against a real step.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as m: ...``: ``m.live`` bytes of storages created inside and
    still alive, ``m.peak`` the most at any moment; ``m.reset_peak()`` starts a new peak.

    Eager execution only (inductor-compiled code allocates below the dispatcher). The
    backward of CPU tensors runs on the calling thread, so it is counted too; on CUDA the
    autograd engine uses its own thread, which this mode does not see."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _freed(self, key: int, nbytes: int, _ref) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata  # the StorageImpl: views and in-place results share it
        if key in self._refs or st.nbytes() == 0 or t.device.type == "meta":
            return
        nbytes = st.nbytes()
        # Storages keep their Python object while any tensor uses them, so the callback
        # fires when the memory is released.
        self._refs[key] = weakref.ref(st, lambda ref, k=key, n=nbytes: self._freed(k, n, ref))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) and len(func._schema.returns) > 1 else (out,)
        for ret, value in zip(func._schema.returns, outs):
            if ret.alias_info is not None:  # a view, an in-place or out= result: no new memory
                continue
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out


def accumulated_microbatch_bytes(model, tokens: torch.Tensor) -> tuple[int, int]:
    """The second of two accumulated micro-batches of ``tokens`` through ``model`` (the
    first one's gradients alive, as in a step with accumulation): bytes its forward keeps
    for the backward, and the peak bytes alive during its forward and backward."""
    import gc

    with LiveTensorBytes() as mem:
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        gc.collect()
        before = mem.live
        mem.reset_peak()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        gc.collect()  # cyclic garbage is not memory the backward needs
        kept = mem.live - before
        loss.backward()
        return kept, mem.peak

