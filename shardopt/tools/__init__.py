"""User-facing commands behind the ``shardopt`` console script (``demo``, ``bench``).

The tools layer composes the layers below it; it owns no math or communication
of its own.
"""


class CommandError(Exception):
    """A user-facing failure: ``shardopt`` prints it as one line and exits non-zero."""
