"""One writer per directory: a lease file that names its writer, with a heartbeat.

    with lease.hold(run_uri, owner="finetune flow"):
        ...   # write stages of the run

`{run}/.ckptflow-lease` holds {holder: {id, owner, host, boot, pid, pid_start}, acquired_at,
heartbeat_at, expires_at, ttl} (epoch seconds). A background thread renews it every ttl/3.
commit.Output takes the same kind of lease on every directory it writes, in the file
`.ckptflow-writing` (the commit marker). A second process that asks for a held lease gets a
CkptError naming the holder (or waits, when asked). A lease is taken over only when its holder
is provably gone:
  - on this host (same host name and boot): its pid is dead, a zombie, or now belongs to another
    process (the start time in /proc/PID/stat differs; ckptflow/identity.py); a live holder is
    never taken over, however old its heartbeat (it may be stopped in a debugger or swapped out);
  - on another host: its heartbeat expired (expires_at is past);
  - this very process: it no longer holds that lease (a write that died with an exception).
A process started by a lease holder (torchrun's ranks under `ckptflow train`) inherits the
holder's lease ids in the environment (CKPTFLOW_LEASES) and writes under that lease as its own.

Locally, taking a lease is a read-check-write under flock(2) on the directory, so racing
processes on one host are serialised exactly. Object stores have no create-if-absent that every
S3-compatible server honours, so there taking a lease is: read it; if free, write our record;
wait `settle` seconds; read it back; we hold it only if the record read back is ours. The
guarantee (at most one holder) rests on:
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
import threading
import time
import uuid
from dataclasses import dataclass, field

from ckptflow import identity, storage
from ckptflow.errors import CkptError

log = logging.getLogger(__name__)

# Jitter draws from its own generator: the global `random` belongs to training, whose Python RNG
# state is checkpointed; a retry or lease wait must not move it (resume would differ).
_JITTER = random.Random()

NAME = ".ckptflow-lease"
ENV = "CKPTFLOW_LEASES"      # {URI: lease id} held by the process that started this one
TTL = float(os.environ.get("CKPTFLOW_LEASE_TTL", "60"))
SETTLE_LOCAL = 0.2           # local file systems that cannot flock a directory
SETTLE_REMOTE = 1.0
SLOW_ROUNDS = 5
ANCESTORS = 3                # a write respects a lease held this many directories above it
OWNER = None                 # what this process calls itself in a lease ("ckptflow convert"); cli sets it

_HELD: dict[str, "Lease"] = {}      # URI -> the directory lease (NAME) this process holds on it
_ACTIVE: set[str] = set()           # ids of every lease (NAME or a marker) this process holds now
_HELD_LOCK = threading.Lock()
_STARTED_WITH = os.environ.get(ENV)  # the leases of the process that started this one


def _forked() -> None:
    """A forked child holds nothing itself; what its parent held it inherits (like a child started
    with the parent's environment)."""
    global _STARTED_WITH, _HELD_LOCK
    _HELD_LOCK = threading.Lock()    # a thread of the parent may have held it at the fork
    _HELD.clear()
    _ACTIVE.clear()
    _STARTED_WITH = os.environ.get(ENV)


os.register_at_fork(after_in_child=_forked)


def settle_for(uri: str) -> float:
    env = os.environ.get("CKPTFLOW_LEASE_SETTLE")
    if env:
        return float(env)
    return SETTLE_LOCAL if storage.is_local(uri) else SETTLE_REMOTE


def default_owner() -> str:
    return OWNER or f"ckptflow pid {os.getpid()}"


# ---- leases passed on to the processes this one starts --------------------------------------

def _inherited() -> dict[str, str]:
    try:
        got = json.loads(_STARTED_WITH or "{}")
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}


def _export_env() -> None:
    """Children this process starts (torchrun's ranks) write under the leases it holds."""
    with _HELD_LOCK:
        mine = {uri: lz.id for uri, lz in _HELD.items() if lz.lost is None}
    merged = {**{u: i for u, i in _inherited().items() if u not in _HELD}, **mine}
    if merged:
        os.environ[ENV] = json.dumps(merged, sort_keys=True)
    else:
        os.environ.pop(ENV, None)


def is_ours(record: dict) -> bool:
    """Held by this process, or by a process that started this one and passed its lease on."""
    holder = record.get("holder") or {}
    hid = holder.get("id")
    if hid in _ACTIVE:
        return True
    if hid is None or hid not in _inherited().values():
        return False
    return not identity.on_this_host(holder) or holder.get("pid") in identity.ancestor_pids()


# ---- the lease -------------------------------------------------------------------------------

@dataclass
class Lease:
    run_uri: str                         # the directory it covers
    owner: str
    ttl: float
    settle: float
    name: str = NAME                     # its file: NAME, or commit.MARKER for one Output
    durable: bool = False                # fsync its first write (a commit marker proves files ours)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    acquired_at: float = 0.0
    depth: int = 0                       # nested hold() calls in this process
    lost: str | None = None              # why we no longer hold it
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return storage.join(self.run_uri, self.name)

    def record(self) -> dict:
        now = time.time()
        return {"holder": {"id": self.id, "owner": self.owner, **identity.current()},
                "acquired_at": self.acquired_at or now, "heartbeat_at": now, "expires_at": now + self.ttl,
                "ttl": self.ttl}

    def check(self) -> None:
        """Raise unless the lease file still names us (call before an irreversible step)."""
        if self.lost is None:
            self.lost = _lost(read(self.run_uri, self.name), self.id)
        if self.lost is not None:
            raise CkptError(f"{self.run_uri}: lost the writer lease ({self.lost}); stopping so two writers never mix")

    def start(self) -> None:
        self.acquired_at = self.acquired_at or time.time()
        _ACTIVE.add(self.id)
        self._thread = threading.Thread(target=self._heartbeat, name=f"ckptflow-lease {self.uri}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.lost = _lost(read(self.run_uri, self.name), self.id)
                if self.lost is not None:
                    log.error("%s: lost the writer lease (%s)", self.uri, self.lost)
                    return
                _write(self, durable=False)
            except Exception as exc:  # noqa: BLE001 - a missed beat is not fatal; expiry is ttl away
                log.warning("%s: lease heartbeat failed: %s", self.uri, exc)

    def stop(self) -> None:
        """Stop the heartbeat; the file stays, but this process no longer holds the lease."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        _ACTIVE.discard(self.id)

    def release(self) -> None:
        self.stop()
        try:
            current = read(self.run_uri, self.name)
            if current is not None and _holder_id(current) == self.id:
                storage.remove(self.uri)
        except Exception as exc:  # noqa: BLE001 - whoever comes next sees we are gone
            log.warning("%s: could not release the writer lease: %s", self.uri, exc)


def read(run_uri: str, name: str = NAME) -> dict | None:
    """The lease record in directory `run_uri`, or None when there is none, or when it names
    nobody (unreadable, or a marker of an older ckptflow: an interrupted write)."""
    uri = storage.join(storage.normalize(run_uri), name)
    try:
        data = json.loads(storage.read_bytes(uri))
    except CkptError:
        return None                    # no such file
    except ValueError as exc:
        log.warning("%s: unreadable lease file, treated as free: %s", uri, exc)
        return None
    return data if isinstance(data, dict) and isinstance(data.get("holder"), dict) else None


def is_live(record: dict, now: float | None = None) -> bool:
    """Whether its holder may still be writing (the module docstring says when it provably is not)."""
    holder = record.get("holder") or {}
    if holder.get("id") in _ACTIVE:
        import gc

        gc.collect()                   # an Output dropped without commit lets go of its claim when collected
        if holder.get("id") in _ACTIVE:
            return True
    if identity.is_current(holder):
        return False                   # this process, which no longer holds it (not in _ACTIVE)
    gone = identity.gone(holder)
    if gone is not None:               # this host: its pid (and boot) say exactly
        return not gone
    now = time.time() if now is None else now
    return float(record.get("expires_at", 0)) > now


def describe(record: dict | None) -> str:
    if not record:
        return "nobody"
    h, now = record["holder"], time.time()
    return (f"{h.get('owner') or 'ckptflow'} (pid {h.get('pid')} on {h.get('host')}, "
            f"started {now - float(record.get('acquired_at', now)):.0f}s ago, "
            f"heartbeat {now - float(record.get('heartbeat_at', 0)):.0f}s ago, "
            f"lease expires in {float(record.get('expires_at', 0)) - now:.0f}s)")


def _holder_id(record: dict) -> str | None:
    return record.get("holder", {}).get("id")


def _lost(current: dict | None, lid: str) -> str | None:
    """Why lease `lid` is no longer held, given its file's `current` record; None while it is."""
    if current is None:
        return "the lease file is gone"
    return None if _holder_id(current) == lid else f"now held by {describe(current)}"


def _write(lz: Lease, durable: bool | None = None) -> None:
    # No fsync for heartbeats and run leases: they mean nothing after a reboot, and a slow fsync
    # would break the settle budget. A commit marker's first write is durable.
    body = json.dumps(lz.record(), sort_keys=True).encode()
    storage.put_atomic(lz.uri, body, durable=lz.durable if durable is None else durable)


@contextlib.contextmanager
def _dir_lock(lz: Lease):
    """flock(2) on the lease's directory (made if missing): yields True when locked, False where
    the file system cannot lock a directory (the settle protocol applies there)."""
    import fcntl

    path = storage.local_path(lz.run_uri)
    os.makedirs(path, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _take(lz: Lease) -> dict | None:
    """Read; write our record unless a live holder stands in the way (returned)."""
    current = read(lz.run_uri, lz.name)
    if current is not None and _holder_id(current) != lz.id and is_live(current):
        return current
    if current is not None and _holder_id(current) != lz.id:
        log.warning("%s: taking over the writer lease of %s, which is gone", lz.uri, describe(current))
    _write(lz)
    return None


def _try_once(lz: Lease) -> dict | None:
    """One attempt: None when we hold the lease, else the record that stands in our way."""
    if storage.is_local(lz.run_uri):
        with _dir_lock(lz) as locked:
            if locked:
                return _take(lz)
    for _ in range(SLOW_ROUNDS):
        t0 = time.monotonic()
        blocker = _take(lz)
        if blocker is not None:
            return blocker
        if time.monotonic() - t0 <= lz.settle / 2:
            break
        log.info("%s: lease round took %.2fs (> settle/2); going round again", lz.uri, time.monotonic() - t0)
        time.sleep(_JITTER.uniform(0, lz.settle))
    else:
        raise CkptError(f"{lz.uri}: storage too slow to take the lease safely (read+write > {lz.settle / 2:.2f}s "
                        f"{SLOW_ROUNDS} times); raise CKPTFLOW_LEASE_SETTLE for every writer of this run")
    time.sleep(lz.settle)
    back = read(lz.run_uri, lz.name)
    if back is not None and _holder_id(back) == lz.id:
        return None
    return back or {"holder": {"owner": "another writer that removed the lease"}, "expires_at": time.time() + 1}


def take(uri: str, owner: str | None = None, *, name: str = NAME, wait: float = 0.0, ttl: float | None = None,
         settle: float | None = None, durable: bool = False, what: str = "another process is writing here") -> Lease:
    """A new lease on directory `uri` (its file `name`), waiting up to `wait` seconds for a live
    holder to finish; a CkptError naming the holder when it does not."""
    uri = storage.normalize(uri)
    lz = Lease(uri, owner or default_owner(), ttl or TTL, settle_for(uri) if settle is None else settle,
               name=name, durable=durable)
    deadline = time.monotonic() + wait
    while (blocker := _try_once(lz)) is not None:
        if time.monotonic() >= deadline:
            raise CkptError(f"{uri}: {what}: {describe(blocker)}; wait for it (--wait) or stop it "
                            "(a crashed writer's claim is cleared once it is provably gone)")
        time.sleep(min(1.0, lz.ttl / 10, max(0.05, deadline - time.monotonic())))
    lz.start()
    return lz


def acquire(run_uri: str, owner: str | None = None, *, ttl: float | None = None, wait: float = 0.0,
            settle: float | None = None) -> Lease:
    """Take the writer lease of `run_uri` (waiting up to `wait` seconds for a live holder)."""
    run_uri = storage.normalize(run_uri)
    with _HELD_LOCK:
        held = _HELD.get(run_uri)
        if held is not None and held.lost is None:
            held.depth += 1
            return held
    lz = take(run_uri, owner, wait=wait, ttl=ttl, settle=settle, what="another process is writing this run")
    lz.depth = 1
    with _HELD_LOCK:
        _HELD[run_uri] = lz
    _export_env()
    log.info("%s: writer lease taken by %s", run_uri, lz.owner)
    return lz


def release(lz: Lease) -> None:
    with _HELD_LOCK:
        lz.depth -= 1
        if lz.depth > 0:
            return
        _HELD.pop(lz.run_uri, None)
    lz.release()
    _export_env()


@contextlib.contextmanager
def hold(run_uri: str, owner: str | None = None, *, ttl: float | None = None, wait: float = 0.0,
         settle: float | None = None):
    """`with hold(run_uri, owner=...):` makes this process the one writer of the run (re-entrant)."""
    lz = acquire(run_uri, owner, ttl=ttl, wait=wait, settle=settle)
    try:
        yield lz
    finally:
        release(lz)


def check_for(uri: str) -> None:
    """Before committing `uri`: if this process holds the lease of a run containing it, make sure
    the lease is still ours (a frozen holder may have lost it to an expiry takeover); the same for
    a launcher's lease this process writes under (torchrun's ranks)."""
    uri = storage.normalize(uri)
    with _HELD_LOCK:
        leases = [lz for run, lz in _HELD.items() if _covers(run, uri)]
        held = set(_HELD)
    for lz in leases:
        lz.check()
    for run, lid in _inherited().items():
        if run not in held and _covers(run, uri):
            lost = _lost(read(run), lid)
            if lost is not None:
                raise CkptError(f"{run}: lost the writer lease this process writes under (its launcher's; {lost})")


def guard(uri: str, wait: float = 0.0) -> None:
    """Refuse to write `uri` while the nearest live lease above it (up to ANCESTORS levels) is
    another process's: one writer per run, whoever writes (a flow, the CLI, gc). A lease of this
    process, or of the process that started it, lets the write go on."""
    uri = storage.normalize(uri)
    deadline = time.monotonic() + wait
    while (blocker := blocking_ancestor(uri)) is not None:
        where, rec = blocker
        if time.monotonic() >= deadline:
            raise CkptError(f"{uri}: another process is writing {where}: {describe(rec)}; "
                            "wait for it (--wait) or stop it")
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def blocking_ancestor(uri: str) -> tuple[str, dict] | None:
    """(directory, lease record) of the nearest live lease above `uri`, up to ANCESTORS levels and
    never above a bucket or the top directory, when another process holds it; else None. The one
    rule for who else is writing around `uri` (guard, gc)."""
    up = storage.normalize(uri)
    for _ in range(ANCESTORS):
        nxt = storage.parent(up)
        if not nxt or nxt == up or nxt.endswith(":/") or "/" not in nxt.split("://", 1)[-1].strip("/"):
            return None                # never above a bucket or the file system's top directory
        up = nxt
        rec = read(up)
        if rec is not None and is_live(rec):
            return None if is_ours(rec) else (up, rec)
    return None


def _covers(run: str, uri: str) -> bool:
    return uri == run or uri.startswith(run.rstrip("/") + "/")
