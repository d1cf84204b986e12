"""The commit protocol for one output directory.

    out = Output(uri)                  # refuses a foreign non-empty directory, clears our leftovers
    with out.open("model.safetensors") as f: f.write(...)   # hashed while written
    out.commit(manifest)               # ckptflow.json last, in one atomic put

A `.ckptflow-writing` marker says "ckptflow is writing here": a directory holding it and no
ckptflow.json is an interrupted write that the next writer (or `ckptflow gc`) may delete.

What a reader can see at any instant, whatever kills the writer (tests/test_crash.py): no
ckptflow.json (not committed: ignored), or a ckptflow.json whose every listed file is complete
and matches its size and sha256. Locally the data files are fsynced before the manifest's
rename; on object stores every file is one whole object (a single PUT or a completed multipart
upload) that exists before the manifest's PUT starts. Replacing a committed output
(overwrite) removes its manifest first, so a crash in the middle leaves it uncommitted, never
stale files under a manifest.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time

from ckptflow import lease, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

MARKER = manifest.MARKER


class Output:
    def __init__(self, uri: str, *, overwrite: bool = False):
        self.uri = storage.normalize(uri)
        self.files: dict[str, dict] = {}
        self.pending: list = []     # background fsyncs to finish before the commit
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        """Refuse what is not ours; clear our previous output or interrupted write. The marker goes
        down first and comes off last, so a crash at any point leaves a directory that is either
        still committed or recognisably ours to clear (never anonymous files)."""
        existing = manifest.read(self.uri)
        if existing is not None:
            if not overwrite:
                raise CkptError(f"{self.uri}: already holds a committed {existing.kind} ({existing.format}); "
                                "choose another destination or pass --overwrite")
            self._mark()
            manifest.uncommit(self.uri)
            clear(self.uri)
        elif storage.isdir(self.uri):
            names = storage.listdir(self.uri)
            # The marker goes down before anything else, so any .ckptflow-writing* name (the
            # marker, or its temp file when a kill hit the marker's own put) proves the files ours.
            if names and not any(n.startswith(MARKER) for n in names):
                raise CkptError(f"{self.uri}: destination is not empty and was not written by ckptflow "
                                f"(found {', '.join(names[:5])})")
            if names:
                log.info("%s: removing an interrupted write", self.uri)
                clear(self.uri)
        self._mark()

    def _mark(self) -> None:
        note = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        storage.put_atomic(storage.join(self.uri, MARKER), json.dumps(note).encode())

    def path(self, name: str) -> str:
        return storage.join(self.uri, storage.safe_relpath(name, self.uri))

    def open(self, name: str) -> "_Tracked":
        """A hashing writer for file `name`. On object stores the bytes are spooled and uploaded
        whole when it closes, retried whole on a transient fault (storage.HashingWriter), so
        open/put/copy never leave half a file behind a retry and the digest is of what was written."""
        return _Tracked(self, name)

    def put(self, name: str, data: bytes) -> dict:
        with self.open(name) as f:
            f.write(data)
        return self.files[name]

    def copy(self, src: str, name: str) -> dict:
        with storage.open_read(src) as fin, self.open(name) as f:
            while chunk := fin.read(storage.CHUNK):
                f.write(chunk)
        return self.files[name]

    def commit(self, m: Manifest) -> Manifest:
        for fut in self.pending:
            fut.result()        # every data file is durable before the marker exists
        self.pending.clear()
        lease.check_for(self.uri)   # a writer that lost its run's lease must not commit into it
        m.files = dict(sorted(self.files.items()))
        out = manifest.write(self.uri, m)
        storage.remove(storage.join(self.uri, MARKER))
        return out


class _Tracked:
    """A HashingWriter that records its digest in the Output when closed cleanly."""

    def __init__(self, out: Output, name: str):
        self._out, self._name = out, name
        self._w = storage.HashingWriter(out.path(name))

    def write(self, data) -> int:
        return self._w.write(data)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self._w.abort()
            return
        self._out.files[self._name] = self._w.close(durable=False)
        if self._w.synced is not None:
            self._out.pending.append(self._w.synced)


def clear(uri: str) -> None:
    """Delete everything in directory `uri` but its marker."""
    for name in storage.listdir(uri):
        if name != MARKER:
            storage.remove(storage.join(uri, name))


def discard(uri: str) -> None:
    """Delete an uncommitted directory of ours, its marker last (a crash halfway leaves it marked)."""
    clear(uri)
    storage.remove(uri)


def is_interrupted(uri: str) -> bool:
    names = storage.listdir(uri)
    return MARKER in names and manifest.NAME not in names
