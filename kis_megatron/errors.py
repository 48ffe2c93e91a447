"""The one base class of every error a user can cause and fix.

Every entry point (``kis-train``, each script in ``tools/``) catches :class:`KisError`, prints
``error: <message>`` and exits with status 2; anything else that escapes is a bug and keeps
its traceback. Subclasses name the file, key or step to fix: ``ConfigError`` (config.py),
``DataError`` and ``InfusionError`` (data/errors.py), ``KnowledgeError`` (knowledge/triplets.py),
``CheckpointError`` (training/checkpoint.py), ``TrainingDiverged`` (train.py), ``LawInputError``
(law/table.py), ``InteropError`` (interop/hf.py).
"""

import sys


class KisError(Exception):
    """A problem with the user's input, files or run; the message says what to fix."""


def exit_with(e: KisError) -> int:
    """The entry points' convention: ``error: ...`` on stderr, exit status 2."""
    print(f"error: {e}", file=sys.stderr)
    return 2
