"""Retries for storage and network calls: exponential backoff with full jitter on transient faults only.

Transient: connection refused/reset/closed, timeouts, HTTP 5xx, throttling (429, SlowDown).
Not transient: missing files or buckets, access denied, bad credentials, bad input. Those fail
at once. Every error that leaves `call` names the URI.

The classes were checked against what s3fs 2026.9 / aiobotocore / aiohttp really raise
(tests/test_retry.py drives a closed port, a server answering 500/502/503/429, a server that
drops connections, a missing bucket and bad credentials on the loopback S3 server):

    closed port          botocore EndpointConnectionError <- aiohttp ClientConnectorError <- ConnectionRefusedError
    connection reset     botocore EndpointConnectionError <- aiohttp ClientOSError <- ConnectionResetError
    closed, no answer    botocore ConnectionClosedError <- aiohttp ServerDisconnectedError
    no answer in time    botocore ReadTimeoutError <- aiohttp SocketTimeoutError
    503 / SlowDown       OSError(EBUSY)      <- botocore ClientError, HTTPStatusCode 503
    500 / InternalError  OSError(EREMOTEIO)  <- ClientError 500
    502, 504, 429        OSError(EIO)        <- ClientError with that status
    no such key/bucket   FileNotFoundError   <- NoSuchKey / NoSuchBucket
    bad key or secret    PermissionError     <- ClientError 403 / SignatureDoesNotMatch

s3fs (5 tries) and botocore (its own retry mode) already retry some of these underneath; this
layer covers what they give up on and every other fsspec backend (gcsfs, memory, local, ...).

A wrong endpoint is bad input, not a fault to wait out: before the first request to an S3
endpoint, `check_endpoint` resolves its host and opens one TCP connection. An unknown host or a
refused connection is a CkptError at once (the CLI: one line, exit 2), instead of tens of
seconds of the layers' retries. Once an endpoint has answered, a refusal later in the run
(a restarting server) is transient again and retried.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import socket
import time
from urllib.parse import urlsplit

from ckptflow.errors import CkptError, TransientError, first_line

log = logging.getLogger(__name__)

# Jitter draws from its own generator: the global `random` belongs to training, whose Python RNG
# state is checkpointed; a retry or lease wait must not move it (resume would differ).
_JITTER = random.Random()

ATTEMPTS = int(os.environ.get("CKPTFLOW_RETRY_ATTEMPTS", "6"))
BASE_DELAY = float(os.environ.get("CKPTFLOW_RETRY_BASE_DELAY", "0.1"))
MAX_DELAY = 10.0
CONNECT_TIMEOUT = 3.0
_CHECKED: set[str] = set()    # endpoints this process reached (or could not judge): not checked again

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.ECONNABORTED,
                     errno.EAGAIN, errno.EBUSY, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
                     getattr(errno, "EREMOTEIO", 121)}
# S3 / GCS error codes that mean "try again later" (the HTTP status is checked separately).
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
                    "TooManyRequests", "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException",
                    "InternalError", "ServiceUnavailable", "BadGateway", "GatewayTimeout",
                    "ProvisionedThroughputExceededException", "TransactionInProgressException"}
# Last resort for wrappers that lose the type: specific phrases only (never bare status numbers,
# which also occur in URIs such as train/step-000500).
_TRANSIENT_PHRASES = ("timed out", "timeout on", "connection reset", "connection aborted", "connection refused",
                      "server disconnected", "connection closed", "broken pipe", "reduce your request rate",
                      "service unavailable", "too many requests", "please slow down", "temporarily unavailable")
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
              CkptError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError)
# botocore / aiohttp / google classes that mean a transport fault, by name so this module never imports them.
_TRANSIENT_CLASSES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                      "IncompleteReadError", "ResponseStreamingError", "AWSConnectionError", "ProxyConnectionError",
                      "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError",
                      "ServerTimeoutError", "SocketTimeoutError", "ClientOSError", "TransportError",
                      "RetryError", "ChecksumError", "IncompleteRead", "RemoteDisconnected"}


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, service error code) of a botocore ClientError, aiohttp or gcsfs HTTP error."""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        meta = resp.get("ResponseMetadata") or {}
        return meta.get("HTTPStatusCode"), (resp.get("Error") or {}).get("Code")
    for attr in ("status", "code", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, None
    return None, None


def _transient_one(exc: BaseException) -> bool | None:
    """True/False when this exception alone decides; None when it does not say."""
    if isinstance(exc, TransientError):
        return True
    status, code = _status(exc)
    if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status in (408, 429))):
        return True
    if status is not None and 400 <= status < 500:
        return False
    if type(exc).__name__ in _TRANSIENT_CLASSES:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying? The outermost exception decides when it is a permanent kind (a missing
    file stays missing); otherwise the first link of its cause chain that says anything."""
    if isinstance(exc, _PERMANENT) and not isinstance(exc, TransientError):
        return False
    for link in _chain(exc):
        verdict = _transient_one(link)
        if verdict is not None:
            return verdict
    text = f"{type(exc).__name__} {exc}".lower()
    return any(p in text for p in _TRANSIENT_PHRASES)


def delay(attempt: int) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base * 2**attempt))."""
    return _JITTER.uniform(0, min(MAX_DELAY, BASE_DELAY * 2 ** attempt))


def call(fn, *args, uri: str = "", what: str = "", attempts: int | None = None, **kwargs):
    """fn(*args, **kwargs), retried on transient faults; errors that escape name `uri`."""
    attempts = attempts or ATTEMPTS
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                named = with_uri(exc, uri, what)
                if named is exc:
                    raise
                raise named from exc
            if attempt + 1 >= attempts:
                raise TransientError(f"{uri}: {what} failed after {attempts} attempts: {first_line(exc)}") from exc
            wait = delay(attempt)
            log.warning("%s: %s failed (%s: %s); retry %d/%d in %.2fs", uri, what, type(exc).__name__,
                        first_line(exc), attempt + 1, attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def with_uri(exc: Exception, uri: str, what: str) -> Exception:
    """The same error, its message naming `uri`. Access denied becomes a CkptError (bad input:
    the CLI prints one line and exits 2); FileNotFoundError keeps its type for callers that test it."""
    if isinstance(exc, PermissionError):
        return CkptError(f"{uri or exc.filename}: permission denied ({what}: {first_line(exc)})")
    if not uri or uri in str(exc) or isinstance(exc, CkptError):
        return exc
    if isinstance(exc, OSError):
        try:
            return type(exc)(f"{uri}: {what} failed: {first_line(exc)}")
        except Exception:  # noqa: BLE001 - an OSError subclass with another signature
            return OSError(f"{uri}: {what} failed: {first_line(exc)}")
    return exc


# --- the first contact with an endpoint -------------------------------------------------------

def check_endpoint(url: str | None, uri: str) -> None:
    """Raise CkptError when the endpoint `url` (the one `uri` is stored at) names a host that does
    not exist or a port where nothing listens. Once per endpoint and process; a timeout, a DNS
    hiccup or an endpoint behind a proxy is left to the usual retries."""
    if not url or url in _CHECKED:
        return
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise CkptError(f"{uri}: storage endpoint {url!r} is not a URL (http://HOST:PORT)")
    if not _behind_proxy(parts.scheme, host):
        _connect(url, uri, host, parts.port or (443 if parts.scheme == "https" else 80))
    _CHECKED.add(url)


def _connect(url: str, uri: str, host: str, port: int) -> None:
    hint = "check AWS_ENDPOINT_URL or storage_options.endpoint_url"
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise CkptError(f"{uri}: storage endpoint {url}: unknown host {host!r}; {hint}") from None
    except ConnectionRefusedError:
        raise CkptError(f"{uri}: storage endpoint {url}: connection refused (nothing listens on port {port}); "
                        f"{hint}, or start the server") from None
    except OSError:
        pass   # no answer in time, network unreachable: may pass; the retries decide


def _behind_proxy(scheme: str, host: str) -> bool:
    import urllib.request

    return bool(urllib.request.getproxies().get(scheme)) and not urllib.request.proxy_bypass(host)
