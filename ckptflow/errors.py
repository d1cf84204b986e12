"""Errors. A CkptError is bad input: the CLI prints its one line and exits 2."""


class CkptError(Exception):
    """Bad input or a refused operation; the message names the file or key."""


class TransientError(Exception):
    """A storage or network fault worth retrying (connection reset, timeout, 5xx, throttling)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
