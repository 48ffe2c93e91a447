"""The error class for user-fixable data problems (bad corpus, bad shard, wrong tokenizer).

It subclasses KisError (every entry point prints ``error: <message>`` and exits 2 for it) and
ValueError, so generic callers can still catch it.
"""

from kis_megatron.errors import KisError


class DataError(KisError, ValueError):
    """A problem with user data or files; the message names the file and what to fix."""
