"""The errors of user-fixable data problems (bad corpus, bad shard, wrong tokenizer, an
infusion plan that cannot work), and the integer check the data path's classes share.

Both subclass KisError (every entry point prints ``error: <message>`` and exits 2 for it) and
ValueError, so generic callers can still catch them.
"""

import operator

from kis_megatron.errors import KisError


class DataError(KisError, ValueError):
    """A problem with user data or files; the message names the file and what to fix."""


class InfusionError(DataError):
    """A source or infusion plan that cannot work as asked; the message says what to fix."""


def check_int(value, what: str, minimum: int) -> int:
    """``value`` as an int (anything ``operator.index`` takes, not a bool) of at least
    ``minimum``, else an InfusionError naming ``what``."""
    if isinstance(value, bool):
        raise InfusionError(f"{what} must be an integer >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise InfusionError(f"{what} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise InfusionError(f"{what} must be an integer >= {minimum}, got {value}")
    return value
