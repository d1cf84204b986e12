"""The commit protocol for one output directory.

    with Output(uri) as out:           # claims the directory; refuses a foreign or busy one
        with out.open("model.safetensors") as f: f.write(...)   # hashed while written
        out.commit(manifest)           # ckptflow.json last, in one atomic put

One writer per directory: the `.ckptflow-writing` marker is a lease (ckptflow/lease.py) that
names its writer (owner, host, boot, pid and the pid's start time, start, heartbeat). It goes
down first and comes off last. A second writer is refused with one line naming the holder, or
waits (`wait=` seconds, the CLI's --wait); a marker is cleared as an interrupted write only when
its writer is provably gone (dead pid on this host, checked against pid reuse; an expired
heartbeat from another host). Writes inside a directory whose lease another live process holds
(a run being trained or written by a flow) are refused the same way (lease.guard).

A write that fails (an exception inside `with`, including SIGINT) removes what it wrote and its
marker. Out of space, quota, permission denied and read-only file systems become one CkptError
line naming the path (and for space the bytes needed and free); `reserve(nbytes)` checks a local
destination's free space before the first byte.

What a reader can see at any instant, whatever kills the writer (tests/test_crash.py): no
ckptflow.json (not committed: ignored), or a ckptflow.json whose every listed file is complete
and matches its size and sha256. Locally the data files and every directory holding one are
fsynced before the manifest's rename; on object stores every file is one whole object (a single
PUT or a completed multipart upload) that exists before the manifest's PUT starts. Replacing a
committed output (overwrite) removes its manifest first, so a crash in the middle leaves it
uncommitted, never stale files under a manifest.
"""
from __future__ import annotations

import errno
import json
import logging
import shutil
import weakref

from ckptflow import lease, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

MARKER = manifest.MARKER
SPACE_MARGIN = 64 * 1024     # plus 1 %: what the manifest, the marker and file system overhead may take
# Failures of the environment, not of ckptflow: one line, exit 2, nothing of the write kept.
ENVIRONMENT = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "read-only file system"}


class Output:
    resumable = False      # keep the files of a failed write for the next attempt (Hub downloads)

    def __init__(self, uri: str, *, overwrite: bool = False, wait: float = 0.0, expect: tuple | None = None,
                 owner: str | None = None):
        """Claim directory `uri` for one write. `expect=(inputs, params)`: when another writer
        committed the same thing while we waited, `done` is its manifest and nothing is claimed."""
        self.uri = storage.normalize(uri)
        self.files: dict[str, dict] = {}
        self.later: dict = {}          # name -> Future of its {size, sha256}: hashed and fsynced behind
        self.adopted: list[str] = []   # files others wrote into the directory (Hub downloads)
        self.done: Manifest | None = None
        self.need: int | None = None   # bytes this write is expected to take (reserve)
        self.committed = False
        self._claim: lease.Lease | None = None
        self._created = False
        try:
            self._prepare(overwrite, wait, expect, owner)
        except OSError as e:
            self._release()
            raise environment_error(e, self) or e

    def _prepare(self, overwrite: bool, wait: float, expect: tuple | None, owner: str | None) -> None:
        """Refuse what is not ours; claim; clear our previous output or an interrupted write."""
        existing = manifest.read(self.uri)
        if existing is not None and not overwrite and expect is None:
            raise already_holds(self.uri, existing)
        if existing is None:
            refuse_foreign(self.uri)
        lease.guard(self.uri, wait)
        self._created = storage.is_local(self.uri) and not storage.isdir(self.uri)
        self._claim = lease.take(self.uri, owner, name=MARKER, wait=wait, durable=True)
        weakref.finalize(self, self._claim.stop)   # an Output dropped without commit: no longer ours
        try:
            self._clear(overwrite, expect)
        except BaseException:
            self._release()
            raise

    def _clear(self, overwrite: bool, expect: tuple | None) -> None:
        existing = manifest.read(self.uri)     # again: another writer may have committed meanwhile
        if existing is not None:
            if expect is not None:
                self.done = reusable(self.uri, existing, *expect, overwrite=overwrite)
            elif not overwrite:
                raise already_holds(self.uri, existing)
            if self.done is not None:
                self._release()
                return
            manifest.uncommit(self.uri)
            clear(self.uri)
        elif [n for n in storage.listdir(self.uri) if n != MARKER]:
            log.info("%s: removing an interrupted write", self.uri)
            clear(self.uri)

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if not self.committed and self.done is None:
                self.abort()
            return False
        env = environment_error(exc, self) is not None
        self.abort(keep_files=self.resumable and not env)
        if env:
            raise environment_error(exc, self) from exc
        return False

    def reserve(self, nbytes: int) -> None:
        """Before the first byte: refuse a local destination without room for `nbytes` more."""
        self.need = int(nbytes)
        if not storage.is_local(self.uri):
            return
        free = shutil.disk_usage(storage.local_path(self.uri)).free
        if free < self.need + self.need // 100 + SPACE_MARGIN:
            raise CkptError(f"{self.uri}: not enough space: this write needs {self.need} bytes, "
                            f"{free} are free on its file system")

    def path(self, name: str) -> str:
        return storage.join(self.uri, storage.safe_relpath(name, self.uri))

    def open(self, name: str, *, threaded: bool = True) -> "_Tracked":
        """A hashing writer for file `name`. On object stores the bytes are spooled and uploaded
        whole when it closes, retried whole on a transient fault (storage.HashingWriter), so
        open/put/copy never leave half a file behind a retry and the digest is of what was written.
        threaded=False: hashed in the caller's thread, not a hasher thread (storage.Hasher)."""
        return _Tracked(self, name, threaded)

    def put(self, name: str, data: bytes) -> dict:
        with self.open(name) as f:
            f.write(data)
        return self.settle(name)

    def copy(self, src: str, name: str) -> dict:
        with self.open(name) as f:
            f.copy_range(src, 0, storage.size(src))
        return self.settle(name)

    def settle(self, name: str) -> dict:
        """Wait for file `name`'s hash (and fsync); its {size, sha256}."""
        if name in self.later:
            self.files[name] = self.later.pop(name).result()
        return self.files[name]

    def adopt(self, name: str, digest: dict) -> None:
        """List file `name`, written into the directory by someone else (huggingface_hub), with
        its {size, sha256}; the commit fsyncs it."""
        self.files[name] = {"size": digest["size"], "sha256": digest["sha256"]}
        self.adopted.append(name)

    def commit(self, m: Manifest) -> Manifest:
        for name in list(self.later):
            self.settle(name)   # every data file hashed and durable before the manifest exists
        storage.fsync_files(self.uri, self.adopted)   # ours were fsynced as they finished (later)
        storage.fsync_dirs(self.uri, self.files)      # every file's name, adopted ones too, once
        lease.check_for(self.uri)   # a writer that lost its run's lease must not commit into it
        claim = self._claim
        if claim is not None:
            claim.check()           # nor one whose claim on this directory was taken over
            claim.stop()            # no heartbeat may put the marker back after its removal
        m.files = dict(sorted(self.files.items()))
        out = manifest.write(self.uri, m)
        self.committed = True
        storage.remove(storage.join(self.uri, MARKER))
        self._claim = None
        return out

    def abort(self, *, keep_files: bool = False) -> None:
        """Give up: remove what this write wrote (the directory too when it made it), marker last.
        keep_files: leave the files for a resumed write (the marker then says "interrupted")."""
        claim, self._claim = self._claim, None
        if claim is None or self.committed:
            return
        claim.stop()
        for fut in self.later.values():
            try:
                fut.result()    # no thread of ours still reads or flushes a file being removed
            except Exception:  # noqa: BLE001 - the write already failed; keep its error
                pass
        self.later.clear()
        try:
            if keep_files:
                storage.put_atomic(storage.join(self.uri, MARKER), json.dumps({"interrupted": True}).encode())
            elif self._created:
                discard(self.uri, claimed=True)
            else:
                clear(self.uri)
                storage.remove(storage.join(self.uri, MARKER))
        except Exception as e:  # noqa: BLE001 - the write already failed; keep its error
            log.warning("%s: could not remove this failed write (%s); `ckptflow gc` will", self.uri, e)

    def _release(self) -> None:
        """Let go of a claim that wrote nothing (a refusal after claiming)."""
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()
            if self._created and not storage.listdir(self.uri):
                storage.remove(self.uri)


class _Tracked:
    """A HashingWriter whose digest the Output collects when it commits (or `settle`s the file)."""

    def __init__(self, out: Output, name: str, threaded: bool = True):
        self._out, self._name = out, name
        self._w = storage.HashingWriter(out.path(name), threaded=threaded)

    def write(self, data) -> int:
        return self._w.write(data)

    def copy_range(self, src: str, start: int, end: int) -> None:
        self._w.copy_range(src, start, end)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self._w.abort()
            return
        self._out.later[self._name] = self._w.close_later()


def already_holds(uri: str, m: Manifest) -> CkptError:
    return CkptError(f"{uri}: already holds a committed {m.kind} ({m.format}); "
                     "choose another destination or pass --overwrite")


def refuse_foreign(uri: str) -> None:
    """A non-empty directory without our marker is someone else's. The marker goes down before
    anything else, so any .ckptflow-writing* name (the marker, or its temp file when a kill hit
    the marker's own put) proves the files ours."""
    names = storage.listdir(uri)
    if names and not storage.is_local(uri):   # SeaweedFS lists the emptied "directories" of deleted objects
        names = sorted({f.split("/", 1)[0] for f in storage.list_files(uri)})
    if names and not any(n.startswith(MARKER) for n in names):
        raise CkptError(f"{uri}: destination is not empty and was not written by ckptflow "
                        f"(found {', '.join(names[:5])})")


def environment_error(exc: BaseException, out: Output) -> CkptError | None:
    """One line for a failure of the environment (space, quota, permissions, read-only), else None."""
    e = exc
    while e is not None and not (isinstance(e, OSError) and e.errno in ENVIRONMENT):
        e = e.__cause__ or e.__context__
    if e is None:
        return None
    path = e.filename if isinstance(e.filename, str) else out.uri
    text = f"{path}: {ENVIRONMENT[e.errno]}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and storage.is_local(out.uri):
        written = sum(f.get("size", 0) for f in out.files.values())
        need = f"needs {out.need} bytes" if out.need else f"had written {written} bytes"
        text += f" (this write {need}; {_free(out.uri)} bytes free)"
    return CkptError(text + "; nothing of this write was kept")


def _free(uri: str) -> int | str:
    path = storage.local_path(uri)
    while path and not storage.isdir(path):
        path = storage.parent(path)
    try:
        return shutil.disk_usage(path or "/").free
    except OSError:
        return "?"


def reusable(dst: str, existing: Manifest | None, inputs: dict, params: dict, *, overwrite: bool) -> Manifest | None:
    """What a stage does with a committed destination: `existing` when it was made from the same
    inputs with the same params (nothing to do); None when there is nothing there or `overwrite`
    says replace it; otherwise a CkptError naming what differs (a committed checkpoint is never
    replaced by accident)."""
    if existing is None:
        return None
    if manifest.matches(existing, inputs, params):
        return existing
    if overwrite:
        return None
    raise CkptError(f"{dst}: already holds a committed {existing.kind} ({existing.format}) made "
                    f"{'; '.join(differences(existing, inputs, params)[:3])}; "
                    "pass --overwrite to replace it, or choose another destination")


def differences(m: Manifest, inputs: dict, params: dict) -> list[str]:
    """How committed `m` differs from a write of `inputs` and `params`, one phrase per difference."""
    out = []
    for name in sorted(set(m.inputs) | set(inputs)):
        had, now = m.inputs.get(name) or {}, inputs.get(name) or {}
        if had.get("fingerprint") != now.get("fingerprint"):
            out.append(f"from {name} {_ref(had)}, not {_ref(now)}")
    for key in sorted(set(m.params) | set(params)):
        had, now = m.params.get(key), params.get(key)
        if manifest.canonical({"v": had}) != manifest.canonical({"v": now}):
            out.append(f"with {key}={had!r}, not {key}={now!r}")
    return out or ["differently"]


def _ref(ref: dict) -> str:
    if not ref:
        return "nothing"
    fp = str(ref.get("fingerprint") or "")
    return f"{ref.get('uri')} ({fp.split(':')[-1][:12]})" if fp else str(ref.get("uri"))


def clear(uri: str) -> None:
    """Delete everything in directory `uri` but its marker."""
    for name in storage.listdir(uri):
        if name != MARKER:
            storage.remove(storage.join(uri, name))


def discard(uri: str, *, claimed: bool = False, owner: str | None = None) -> None:
    """Delete an uncommitted directory of ours, its marker last (a crash halfway leaves it marked).
    Unless `claimed` (the caller holds it), claim it first: a live writer's directory is refused
    (CkptError naming it), never deleted."""
    claim = None if claimed else lease.take(uri, owner, name=MARKER)
    try:
        clear(uri)
    finally:
        if claim is not None:
            claim.stop()
    storage.remove(uri)


def writer(uri: str) -> dict | None:
    """The live writer of directory `uri` (its marker's record), or None."""
    rec = lease.read(uri, MARKER)
    return rec if rec is not None and lease.is_live(rec) else None


def is_interrupted(uri: str) -> bool:
    names = storage.listdir(uri)
    return MARKER in names and manifest.NAME not in names and writer(uri) is None
