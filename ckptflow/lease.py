"""One writer per run directory: a lease file with a heartbeat and an expiry.

    with lease.hold(run_uri, owner="finetune flow"):
        ...   # write stages of the run

`{run}/.ckptflow-lease` holds {holder: {id, owner, host, pid}, acquired_at, heartbeat_at,
expires_at, ttl} (epoch seconds). A background thread renews it every ttl/3. A second process
that asks for a held lease gets a CkptError naming the holder; a lease past its expiry (its
holder crashed or hangs) is taken over, and so is one whose holder's pid is gone on this host.

Object stores have no create-if-absent that every S3-compatible server honours, so taking a
lease is: read it; if free, write our record; wait `settle` seconds; read it back; we hold it
only if the record read back is ours. The guarantee (at most one holder) rests on:
  1. reads see completed writes (local disks, AWS S3, GCS and SeaweedFS are strongly consistent);
  2. each round's read-then-write finishes within settle/2 (measured; a slower round starts over);
  3. a holder is not frozen for longer than ttl*2/3 (it would miss its heartbeats), and host clocks
     agree to well within the ttl (expiry compares wall clocks across hosts).
Two processes racing for a free lease: the one whose write lands last holds it, the other reads
that back and steps aside. As a fence against a holder that lost its lease while frozen, an
Output committing below a run whose lease this process holds re-reads the lease first (`check`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from ckptflow import storage
from ckptflow.errors import CkptError

log = logging.getLogger(__name__)

NAME = ".ckptflow-lease"
TTL = float(os.environ.get("CKPTFLOW_LEASE_TTL", "60"))
SETTLE_LOCAL = 0.2
SETTLE_REMOTE = 1.0
SLOW_ROUNDS = 5

_HELD: dict[str, "Lease"] = {}      # run URI -> the lease this process holds on it
_HELD_LOCK = threading.Lock()


def settle_for(uri: str) -> float:
    env = os.environ.get("CKPTFLOW_LEASE_SETTLE")
    if env:
        return float(env)
    return SETTLE_LOCAL if storage.is_local(uri) else SETTLE_REMOTE


@dataclass
class Lease:
    run_uri: str
    owner: str
    ttl: float
    settle: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    acquired_at: float = 0.0
    depth: int = 0                       # nested hold() calls in this process
    lost: str | None = None              # why we no longer hold it
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return storage.join(self.run_uri, NAME)

    def record(self) -> dict:
        now = time.time()
        return {"holder": {"id": self.id, "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid()},
                "acquired_at": self.acquired_at or now, "heartbeat_at": now, "expires_at": now + self.ttl,
                "ttl": self.ttl}

    def check(self) -> None:
        """Raise unless the lease file still names us (call before an irreversible step)."""
        if self.lost is None:
            current = read(self.run_uri)
            if current is None or _holder_id(current) != self.id:
                self.lost = f"now held by {describe(current)}" if current else "the lease file is gone"
        if self.lost is not None:
            raise CkptError(f"{self.run_uri}: lost the writer lease ({self.lost}); stopping so two writers never mix")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = read(self.run_uri)
                if current is None or _holder_id(current) != self.id:
                    self.lost = f"now held by {describe(current)}" if current else "the lease file was removed"
                    log.error("%s: lost the writer lease (%s)", self.run_uri, self.lost)
                    return
                _write(self)
            except Exception as exc:  # noqa: BLE001 - a missed beat is not fatal; expiry is ttl away
                log.warning("%s: lease heartbeat failed: %s", self.run_uri, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = read(self.run_uri)
            if current is not None and _holder_id(current) == self.id:
                storage.remove(self.uri)
        except Exception as exc:  # noqa: BLE001 - it will expire on its own
            log.warning("%s: could not release the writer lease: %s", self.run_uri, exc)


def read(run_uri: str) -> dict | None:
    """The lease record of run `run_uri`, or None when there is none (or it is unreadable)."""
    uri = storage.join(storage.normalize(run_uri), NAME)
    if not storage.isfile(uri):
        return None
    try:
        data = json.loads(storage.read_bytes(uri))
    except (CkptError, ValueError) as exc:
        log.warning("%s: unreadable lease file, treated as free: %s", uri, exc)
        return None
    return data if isinstance(data, dict) and isinstance(data.get("holder"), dict) else None


def is_live(record: dict, now: float | None = None) -> bool:
    """Not expired, and (on this host) its process still exists."""
    now = time.time() if now is None else now
    if float(record.get("expires_at", 0)) <= now:
        return False
    holder = record["holder"]
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def describe(record: dict | None) -> str:
    if not record:
        return "nobody"
    h, now = record["holder"], time.time()
    return (f"{h.get('owner') or 'ckptflow'} (pid {h.get('pid')} on {h.get('host')}, "
            f"heartbeat {now - float(record.get('heartbeat_at', 0)):.0f}s ago, "
            f"lease expires in {float(record.get('expires_at', 0)) - now:.0f}s)")


def _holder_id(record: dict) -> str | None:
    return record.get("holder", {}).get("id")


def _write(lease: Lease) -> None:
    # No fsync: a lease means nothing after a reboot, and a slow fsync would break the settle budget.
    storage.put_atomic(lease.uri, json.dumps(lease.record(), sort_keys=True).encode(), durable=False)


def _try_once(lease: Lease) -> dict | None:
    """One round of read, write, settle, read back. None when we hold the lease, else the
    record that stands in our way."""
    for _ in range(SLOW_ROUNDS):
        t0 = time.monotonic()
        current = read(lease.run_uri)
        if current is not None and _holder_id(current) != lease.id and is_live(current):
            return current
        if current is not None and _holder_id(current) != lease.id:
            log.warning("%s: taking over the writer lease of %s", lease.run_uri, describe(current))
        _write(lease)
        if time.monotonic() - t0 <= lease.settle / 2:
            break
        log.info("%s: lease round took %.2fs (> settle/2); going round again", lease.run_uri, time.monotonic() - t0)
        time.sleep(random.uniform(0, lease.settle))
    else:
        raise CkptError(f"{lease.uri}: storage too slow to take the lease safely (read+write > {lease.settle / 2:.2f}s "
                        f"{SLOW_ROUNDS} times); raise CKPTFLOW_LEASE_SETTLE for every writer of this run")
    time.sleep(lease.settle)
    back = read(lease.run_uri)
    if back is not None and _holder_id(back) == lease.id:
        return None
    return back or {"holder": {"owner": "another writer that removed the lease"}, "expires_at": time.time() + 1}


def acquire(run_uri: str, owner: str | None = None, *, ttl: float | None = None, wait: float = 0.0,
            settle: float | None = None) -> Lease:
    """Take the writer lease of `run_uri` (waiting up to `wait` seconds for a live holder)."""
    run_uri = storage.normalize(run_uri)
    with _HELD_LOCK:
        held = _HELD.get(run_uri)
        if held is not None and held.lost is None:
            held.depth += 1
            return held
    lease = Lease(run_uri, owner or f"ckptflow pid {os.getpid()}", ttl or TTL,
                  settle_for(run_uri) if settle is None else settle)
    deadline = time.monotonic() + wait
    while (blocker := _try_once(lease)) is not None:
        if time.monotonic() >= deadline:
            raise CkptError(f"{run_uri}: another process is writing this run: {describe(blocker)}; "
                            "wait for it or stop it (a crashed writer's lease is taken over when it expires)")
        time.sleep(min(1.0, lease.ttl / 10, max(0.05, deadline - time.monotonic())))
    lease.acquired_at = time.time()
    lease.depth = 1
    lease._thread = threading.Thread(target=lease._heartbeat, name=f"ckptflow-lease {run_uri}", daemon=True)
    lease._thread.start()
    with _HELD_LOCK:
        _HELD[run_uri] = lease
    log.info("%s: writer lease taken by %s", run_uri, lease.owner)
    return lease


def release(lease: Lease) -> None:
    with _HELD_LOCK:
        lease.depth -= 1
        if lease.depth > 0:
            return
        _HELD.pop(lease.run_uri, None)
    lease.release()


@contextlib.contextmanager
def hold(run_uri: str, owner: str | None = None, *, ttl: float | None = None, wait: float = 0.0,
         settle: float | None = None):
    """`with hold(run_uri, owner=...):` makes this process the one writer of the run (re-entrant)."""
    lease = acquire(run_uri, owner, ttl=ttl, wait=wait, settle=settle)
    try:
        yield lease
    finally:
        release(lease)


def check_for(uri: str) -> None:
    """Before committing `uri`: if this process holds the lease of a run containing it, make sure
    the lease is still ours (a frozen holder may have lost it to an expiry takeover)."""
    uri = storage.normalize(uri)
    with _HELD_LOCK:
        leases = [lz for run, lz in _HELD.items() if uri == run or uri.startswith(run.rstrip("/") + "/")]
    for lz in leases:
        lz.check()
