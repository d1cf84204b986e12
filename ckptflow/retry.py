"""Retries for storage and network calls: exponential backoff with jitter on transient faults only.

Transient: connection resets, timeouts, 5xx, throttling. Not transient: missing files or
buckets, access denied, bad input. Those fail at once, with the URI in the message.
"""
from __future__ import annotations

import errno
import logging
import random
import time

from ckptflow.errors import CkptError, TransientError

log = logging.getLogger(__name__)

ATTEMPTS = 6
BASE_DELAY = 0.05
MAX_DELAY = 5.0

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.ECONNABORTED, errno.EAGAIN, errno.EBUSY}
_TRANSIENT_WORDS = ("timeout", "timed out", "connection reset", "connection aborted", "throttl",
                    "slowdown", "slow down", "internalerror", "serviceunavailable", "service unavailable",
                    "503", "502", "500", "504", "429", "too many requests", "temporarily", "broken pipe",
                    "remotedisconnected", "server disconnected", "connection closed")
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              CkptError, ValueError, KeyError, TypeError)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT_WORDS)


def delay(attempt: int) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(MAX_DELAY, BASE_DELAY * 2 ** attempt))


def call(fn, *args, uri: str = "", what: str = "", attempts: int | None = None, **kwargs):
    attempts = attempts or ATTEMPTS
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise
            if attempt + 1 >= attempts:
                raise TransientError(f"{uri}: {what} failed after {attempts} attempts: {exc}") from exc
            wait = delay(attempt)
            log.warning("%s: %s failed (%s); retry %d/%d in %.2fs", uri, what, exc, attempt + 1, attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
