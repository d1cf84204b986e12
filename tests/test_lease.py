"""One writer per run directory: real processes (tests/procs.py) contend for the lease of a run,
on local disk and on the loopback S3 server."""
import json
import os
import signal
import socket
import time

import pytest

from ckptflow import lease, storage
from ckptflow.errors import CkptError
from tests import procs

@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def where(request, tmp_path):
    """(run URI, storage options for the writer processes)."""
    if request.param == "local":
        yield str(tmp_path / "run"), {}
        return
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    storage.set_options(bucket, server.storage_options)
    yield f"{bucket}/run", {bucket: server.storage_options}
    storage.set_options(bucket, None)


class Writers:
    """Processes that take the lease of one run when told to go (tests/procs.py)."""

    def __init__(self, run, options, owners):
        ctx = procs.context()
        self.go, self.release, self.results = ctx.Event(), ctx.Event(), ctx.Queue()
        self.procs = {o: procs.start(procs.lease_writer, run, o, options, self.go, self.release, self.results)
                      for o in owners}
        self.pids = {}
        for _ in owners:
            kind, owner, pid = self.next()
            assert kind == "ready"
            self.pids[owner] = pid

    def next(self, timeout=60):
        return self.results.get(timeout=timeout)

    def stop(self):
        self.release.set()
        for p in self.procs.values():
            p.join(30)
        return {o: p.exitcode for o, p in self.procs.items()}


def test_a_second_writer_is_refused_naming_the_holder(where):
    run, options = where
    first = Writers(run, options, ["finetune flow"])
    first.go.set()
    assert first.next()[0] == "won"
    second = Writers(run, options, ["another flow"])
    second.go.set()
    kind, _, message = second.next()
    assert kind == "lost"
    assert f"pid {first.pids['finetune flow']} on {socket.gethostname()}" in message and "finetune flow" in message
    assert message.startswith(f"{run}: another process is writing this run")
    assert first.stop() == {"finetune flow": 0} and second.stop() == {"another flow": 0}
    assert lease.read(run) is None                     # released on a clean exit
    with lease.hold(run, owner="after"):               # and free for the next writer
        assert lease.read(run)["holder"]["owner"] == "after"


def test_racing_writers_exactly_one_wins(where):
    run, options = where
    for r in range(2 if run.startswith("s3://") else 5):
        racers = Writers(run, options, [f"racer {r}.{i}" for i in range(3)])
        racers.go.set()                                # all three start at once
        outcomes = sorted(racers.next()[0] for _ in range(3))
        assert outcomes == ["lost", "lost", "won"], outcomes
        racers.stop()
        assert lease.read(run) is None


def test_a_killed_holder_does_not_block_the_run(tmp_path, caplog):
    run = str(tmp_path / "run")
    holder = Writers(run, {}, ["doomed"])
    holder.go.set()
    assert holder.next()[0] == "won"
    proc = holder.procs["doomed"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert lease.read(run)["holder"]["pid"] == proc.pid        # the lease outlived its holder ...
    t0 = time.monotonic()
    with lease.hold(run, owner="next"):                         # ... but its pid is gone on this host
        pass
    assert time.monotonic() - t0 < 5
    assert any("taking over" in r.message and "doomed" in r.message for r in caplog.records)


def foreign(run: str, expires_in: float) -> None:
    """A lease written by a process on another host (its pid cannot be checked from here)."""
    now = time.time()
    rec = {"holder": {"id": "x", "owner": "trainer on gpu-7", "host": "gpu-7", "pid": 4242},
           "acquired_at": now - 100, "heartbeat_at": now - 1, "expires_at": now + expires_in, "ttl": 60}
    storage.put_atomic(storage.join(run, lease.NAME), json.dumps(rec).encode())


def test_a_foreign_lease_blocks_until_it_expires(tmp_path):
    run = str(tmp_path / "run")
    foreign(run, expires_in=30)
    with pytest.raises(CkptError, match=r"another process is writing this run: trainer on gpu-7 \(pid 4242 on gpu-7"):
        lease.acquire(run)
    foreign(run, expires_in=0.3)
    with lease.hold(run, owner="me", wait=5):     # waits out the expiry, then takes over
        assert lease.read(run)["holder"]["owner"] == "me"


def test_the_heartbeat_keeps_the_lease_alive_and_holds_nest(tmp_path):
    run = str(tmp_path / "run")
    with lease.hold(run, owner="long job", ttl=0.6) as outer:
        first = lease.read(run)
        time.sleep(1.3)                                        # two ttls: alive only by heartbeats
        later = lease.read(run)
        assert later["holder"]["id"] == outer.id and later["heartbeat_at"] > first["heartbeat_at"]
        assert lease.is_live(later)
        with lease.hold(run, owner="nested stage") as inner:  # same process: the same lease
            assert inner is outer
        assert lease.read(run) is not None                    # the inner exit did not release it
    assert lease.read(run) is None


CHILD_WRITE = """
import sys
from ckptflow import commit
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest
try:
    with commit.Output(sys.argv[1]) as out:
        out.put("a.bin", b"a")
        out.commit(Manifest(kind="model", format="tune"))
except CkptError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_children_write_under_their_launchers_lease_strangers_do_not(tmp_path):
    """torchrun's ranks: a process started by the lease holder inherits the lease (CKPTFLOW_LEASES)
    and commits under it; a process that only copies the variable is not the holder's child."""
    import subprocess
    import sys

    run = str(tmp_path / "run")
    with lease.hold(run, owner="ckptflow train"):
        assert lease.ENV in os.environ
        child = subprocess.run([sys.executable, "-c", CHILD_WRITE, f"{run}/train/step-000001"],
                               capture_output=True, text=True)
        assert child.returncode == 0, child.stderr
        env = {k: v for k, v in os.environ.items() if k != lease.ENV}
        stranger = subprocess.run([sys.executable, "-c", CHILD_WRITE, f"{run}/train/step-000002"],
                                  capture_output=True, text=True, env=env)
        assert stranger.returncode == 2, stranger.stderr
        assert f"another process is writing {run}: ckptflow train (pid {os.getpid()}" in stranger.stderr
    assert lease.ENV not in os.environ
    assert storage.isfile(f"{run}/train/step-000001/ckptflow.json")
    assert not storage.exists(f"{run}/train/step-000002")
