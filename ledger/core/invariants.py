"""Invariant checks that survive ``python -O``.

Validation returns a status to the caller; a broken invariant is a programmer error (or a
corrupted journal) and stops the shard loudly instead of letting it write a wrong balance.
"""


class InvariantViolation(AssertionError):
    """A ledger invariant does not hold. The shard that raised it must stop serving."""


def ensure(condition: bool, message: str, *args: object) -> None:
    """Raise ``InvariantViolation`` when ``condition`` is false.

    Args:
        condition: What must hold.
        message: A %-format string describing the invariant; formatted only on failure.
        *args: Values for ``message``.
    """
    if not condition:
        raise InvariantViolation(message % args if args else message)
