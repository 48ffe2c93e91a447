"""The one base class of every error a user can cause and fix.

Every entry point (``kis-train``, each script in ``tools/``) catches :class:`KisError`, prints
``error: <message>`` and exits with status 2; anything else that escapes is a bug and keeps
its traceback. Subclasses name the file, key or step to fix: ``ConfigError`` (config.py),
``DataError`` and ``InfusionError`` (data/errors.py), ``KnowledgeError`` (knowledge/triplets.py),
``CheckpointError`` (training/checkpoint.py), ``TrainingDiverged`` (training/trainer.py),
``LawInputError`` (law/table.py), ``InteropError`` (interop/hf.py), ``OutputExists``
(utils.py) and ``StorageError`` (here: the file system refused a read or write).
"""

import errno
import os
import sys
from typing import Optional


class KisError(Exception):
    """A problem with the user's input, files or run; the message says what to fix."""


class StorageError(KisError):
    """The file system refused: no space left, a path that is not a directory, no
    permission. The message names the path and the cause."""

    @classmethod
    def from_os_error(cls, e: OSError, doing: str = "") -> "StorageError":
        path = e.filename if e.filename is not None else "a file"
        cause = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            cause += " (free space there, or point log.dir elsewhere)"
        return cls(f"{doing + ' ' if doing else ''}{os.fspath(path)}: {cause}")


def os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError that caused ``e`` (``e`` itself, its cause or context, or a failure that
    torch.distributed.checkpoint collected), or None."""
    seen = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return x
        todo += [x.__cause__, x.__context__]
        for failure in (getattr(x, "failures", None) or {}).values():  # DCP's CheckpointException
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def exit_with(e: Exception) -> int:
    """The entry points' convention: ``error: ...`` on stderr, exit status 2. An OSError (an
    environment failure met at the boundary) is printed as the path and its cause."""
    if isinstance(e, OSError):
        e = StorageError.from_os_error(e)
    print(f"error: {e}", file=sys.stderr)
    return 2
