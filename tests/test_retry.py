"""Transient or not: the classification checked against what s3fs / botocore / aiohttp really
raise, from a closed port, servers that answer 5xx/429 or drop the connection, and the
loopback S3 server (missing key or bucket, bad credentials). Errors always name the URI."""
import errno
import functools
import http.server
import socket
import struct
import threading

import pytest

from ckptflow import retry, storage
from ckptflow.errors import CkptError, TransientError

CALLS = {
    "cat": lambda fs: fs.cat_file("bkt/key"),
    "pipe": lambda fs: fs.pipe_file("bkt/key", b"x"),
    "info": lambda fs: fs.info("bkt/key"),
}


def raised(fn, fs) -> BaseException:
    try:
        fn(fs)
    except Exception as exc:  # noqa: BLE001 - the point is to look at it
        return exc
    raise AssertionError("the call did not fail")


@functools.lru_cache(maxsize=None)
def s3fs_at(endpoint: str):
    """One client per endpoint: building a botocore client costs ~0.3 s."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, key="k", secret="s", use_listings_cache=False,
                             config_kwargs={"retries": {"total_max_attempts": 1}, "connect_timeout": 2, "read_timeout": 2},
                             client_kwargs={"endpoint_url": endpoint, "region_name": "eu-west-1"})


@pytest.fixture
def no_inner_retries(monkeypatch):
    """s3fs retries 5 times underneath (botocore too); once is enough to see the exception."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setattr(retry, "BASE_DELAY", 0.001)


class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    status, code = 503, "SlowDown"

    def log_message(self, *_):
        pass

    def _answer(self):
        if int(self.headers.get("Content-Length") or 0):
            self.rfile.read(int(self.headers["Content-Length"]))
        body = f'<?xml version="1.0"?><Error><Code>{self.code}</Code><Message>m</Message></Error>'.encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer


@pytest.fixture(scope="module")
def answering():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module", params=["rst", "fin"])
def resetting(request):
    """Accepts, reads the request, then resets (RST) or closes (FIN) the connection unanswered."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.settimeout(1)
            try:
                conn.recv(65536)
            except OSError:
                pass
            if request.param == "rst":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    srv.close()


def closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_a_closed_port_is_transient(no_inner_retries):
    fs = s3fs_at(closed_port())
    for op in CALLS.values():
        exc = raised(op, fs)
        assert type(exc).__name__ == "EndpointConnectionError"   # botocore's, not an OSError
        assert retry.is_transient(exc)


def test_a_dropped_connection_is_transient(no_inner_retries, resetting):
    for op in CALLS.values():
        exc = raised(op, s3fs_at(resetting))
        # RST: EndpointConnectionError <- aiohttp ClientOSError <- ConnectionResetError;
        # FIN: ConnectionClosedError <- aiohttp ServerDisconnectedError
        assert retry.is_transient(exc), f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("status,code", [(500, "InternalError"), (502, "BadGateway"), (503, "SlowDown"),
                                         (503, "ServiceUnavailable"), (504, "GatewayTimeout"), (429, "TooManyRequests")])
def test_5xx_and_throttling_are_transient(no_inner_retries, answering, monkeypatch, status, code):
    monkeypatch.setattr(Answer, "status", status)
    monkeypatch.setattr(Answer, "code", code)
    for op in CALLS.values():
        exc = raised(op, s3fs_at(answering))
        assert isinstance(exc, OSError)      # s3fs translates ClientError; 502/504/429 become a bare EIO
        assert retry.is_transient(exc), f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("status,code", [(400, "InvalidArgument"), (403, "AccessDenied"), (404, "NoSuchBucket"),
                                         (405, "MethodNotAllowed")])
def test_4xx_are_not_transient(no_inner_retries, answering, monkeypatch, status, code):
    monkeypatch.setattr(Answer, "status", status)
    monkeypatch.setattr(Answer, "code", code)
    for op in CALLS.values():
        exc = raised(op, s3fs_at(answering))
        assert not retry.is_transient(exc), f"{type(exc).__name__}: {exc}"


@pytest.mark.s3
def test_missing_keys_and_bad_credentials_on_a_real_server(s3_server, s3_bucket, no_inner_retries):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    missing = raised(lambda f: f.cat_file(f"{s3_bucket[5:]}/nope"), fs)
    assert isinstance(missing, FileNotFoundError) and not retry.is_transient(missing)
    wrong = s3fs.S3FileSystem(skip_instance_cache=True, **{**s3_server.storage_options, "secret": "wrong"})
    for op in (lambda f: f.cat_file(f"{s3_bucket[5:]}/x"), lambda f: f.pipe_file(f"{s3_bucket[5:]}/x", b"1"),
               lambda f: f.ls(s3_bucket[5:])):
        denied = raised(op, wrong)
        assert isinstance(denied, PermissionError) and not retry.is_transient(denied)


@pytest.mark.s3
def test_storage_errors_name_the_uri_and_do_not_retry_permanent_faults(s3_server, s3_bucket, caplog):
    storage.set_options(s3_bucket, {**s3_server.storage_options, "secret": "wrong"})
    try:
        with pytest.raises(CkptError, match=rf"^{s3_bucket}/run/ckptflow.json: permission denied"):
            storage.read_bytes(f"{s3_bucket}/run/ckptflow.json")
        with pytest.raises(CkptError, match=rf"^{s3_bucket}/run/x: permission denied"):
            storage.put_atomic(f"{s3_bucket}/run/x", b"1")
    finally:
        storage.set_options(s3_bucket, None)
    storage.set_options("s3://", s3_server.storage_options)
    try:
        with pytest.raises(CkptError, match=rf"^{s3_bucket}/nope: no such file"):
            storage.read_bytes(f"{s3_bucket}/nope")
        assert storage.exists(f"{s3_bucket}/nope") is False
    finally:
        storage.set_options("s3://", None)
    assert not [r for r in caplog.records if "retry" in r.message]


def test_storage_gives_up_on_a_dead_endpoint_naming_the_uri(no_inner_retries, monkeypatch, caplog):
    monkeypatch.setattr(retry, "ATTEMPTS", 2)
    endpoint = closed_port()
    # An endpoint that answered earlier in the run (here: as if it had) and then died: retried.
    # One never reached at all is a wrong endpoint: tests/test_readme.py.
    monkeypatch.setattr(retry, "_CHECKED", {endpoint})
    storage.set_options("s3://dead", {"key": "k", "secret": "s", "config_kwargs": {"retries": {"total_max_attempts": 1}},
                                      "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"}})
    try:
        with pytest.raises(TransientError, match=r"^s3://dead/run/ckptflow.json: info failed after 2 attempts"):
            storage.isfile("s3://dead/run/ckptflow.json")
    finally:
        storage.set_options("s3://dead", None)
    assert [r for r in caplog.records if "retry 1/1" in r.message]


def test_call_retries_transient_faults_then_succeeds(monkeypatch):
    monkeypatch.setattr(retry, "BASE_DELAY", 0.001)
    faults = [ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("timed out")]

    def flaky():
        if faults:
            raise faults.pop(0)
        return "ok"

    assert retry.call(flaky, uri="s3://b/k", what="read") == "ok" and not faults


def test_permanent_faults_fail_at_once_with_the_uri():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("b/k")

    with pytest.raises(FileNotFoundError, match=r"^s3://b/k: read failed: b/k"):
        retry.call(missing, uri="s3://b/k", what="read")
    assert len(calls) == 1


def test_status_numbers_inside_a_uri_do_not_make_an_error_transient():
    # The old classifier matched "500" anywhere in the message: step-000500 made a missing file retryable.
    for exc in (OSError(errno.EIO, "s3://b/run/train/step-000500/model.safetensors: checksum"),
                ValueError("s3://b/run/train/step-000503/x"), FileNotFoundError("step-000429")):
        assert not retry.is_transient(exc), exc


def test_backoff_is_full_jitter_and_capped():
    for attempt in range(12):
        for _ in range(50):
            assert 0 <= retry.delay(attempt) <= min(retry.MAX_DELAY, retry.BASE_DELAY * 2 ** attempt)


def test_backoff_jitter_leaves_the_global_random_state_alone():
    """Training checkpoints Python's global RNG; a retry (or a slow lease round) in the same process
    must not draw from it, or a resumed run's trainer_state differs from an uninterrupted one's
    (seen under load: only trainer_state.json's RNG differed after a kill and resume)."""
    import random

    from ckptflow import lease

    random.seed(1234)
    before = random.getstate()
    for attempt in range(5):
        retry.delay(attempt)
    lease._JITTER.uniform(0, 1)
    assert random.getstate() == before
