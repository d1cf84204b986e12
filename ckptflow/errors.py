"""Errors. A CkptError is bad input: the CLI prints its one line and exits 2."""


class CkptError(Exception):
    """Bad input or a refused operation; the message names the file or key."""


class TransientError(Exception):
    """A storage or network fault worth retrying (connection reset, timeout, 5xx, throttling)."""
