"""Lazy, optional Triton.

Importing ``kis_kernels`` never imports triton: the CPU default path runs the PyTorch
references and must work where triton is not installed. It also keeps the interpreter
usable in a shared test process. Triton decides at *its own import* whether its standard
library (``tl.sum``, ``tl.max``, ...) is compiled or interpreted (``TRITON_INTERPRET=1``),
so whoever imports triton first fixes that choice for the whole process; a package that
imported triton eagerly would fix it as "compiled" for every later CPU test.

So the op files decorate their kernels with :func:`lazy_jit` instead of ``triton.jit``:
the kernel is handed to ``triton.jit`` on its first launch, at which point triton is
imported and ``triton.language`` is bound to the name ``tl`` in the op module (the kernel
bodies refer to ``tl``; their ``tl.constexpr`` annotations stay strings thanks to
``from __future__ import annotations``, which Triton accepts).
"""

from __future__ import annotations

import os
import sys

_TRUE = {"1", "true", "yes", "on"}


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value in the environment now."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def import_triton():
    """Import and return the ``triton`` module, or None when it is not installed."""
    try:
        import triton
        import triton.language  # noqa: F401  (binds triton.language)
    except ImportError:
        return None
    return triton


def interpreter_active() -> bool:
    """Whether triton is (or, once imported, will be) running its interpreter.

    True when ``TRITON_INTERPRET`` is set and triton's standard library was built
    interpreted, i.e. the variable was already set when triton was first imported.
    """
    if not interpret_requested():
        return False
    if "triton" not in sys.modules:
        return True  # it will be imported now, with the variable set
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.sum, InterpretedFunction)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1): Triton block sizes must be powers of two."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


class LazyKernel:
    """A Triton kernel handed to ``triton.jit`` on first launch: ``kernel[grid](...)``."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._built = {}  # interpret mode -> JITFunction / InterpretedFunction

    def jitted(self):
        """The ``triton.jit`` object for the current mode (compiled or interpreted)."""
        triton = import_triton()
        if triton is None:
            raise ImportError(f"kernel {self.__name__} needs triton, which is not installed")
        knobs = getattr(triton, "knobs", None)
        mode = bool(knobs.runtime.interpret) if knobs is not None else interpret_requested()
        built = self._built.get(mode)
        if built is None:
            # The kernel body resolves `tl` through its module's globals at compile time.
            self.fn.__globals__["tl"] = triton.language
            built = triton.jit(self.fn)
            self._built[mode] = built
        return built

    def __getitem__(self, grid):
        return self.jitted()[grid]


def lazy_jit(fn) -> LazyKernel:
    """Decorator: ``triton.jit``, deferred to the kernel's first launch (see module doc)."""
    return LazyKernel(fn)
