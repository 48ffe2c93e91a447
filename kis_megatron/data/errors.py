"""The error class for user-fixable data problems (bad corpus, bad shard, wrong tokenizer).

It subclasses ValueError so generic callers can still catch it; CLIs turn it into
``error: <message>`` and exit code 2.
"""


class DataError(ValueError):
    """A problem with user data or files; the message names the file and what to fix."""
