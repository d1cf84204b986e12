"""ckptflow.json: what a directory holds, and the commit marker.

A directory is committed when its ckptflow.json exists. The manifest is written last, in one
atomic put, after every data file it lists has been written (and fsynced on local disk).
Readers ignore directories without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

from ckptflow import storage
from ckptflow.errors import CkptError
from ckptflow.version import __version__

log = logging.getLogger(__name__)

NAME = "ckptflow.json"
# The commit protocol's two files: commit.Output puts MARKER first and NAME last.
MARKER = ".ckptflow-writing"
SCHEMA = 1
KINDS = ("source", "model", "adapter", "train_state", "export", "eval")


@dataclass
class Manifest:
    kind: str
    format: str
    family: str | None = None
    model_args: dict | None = None
    dtype: str | None = None
    step: int | None = None
    files: dict = field(default_factory=dict)     # {relative name: {size, sha256}}
    inputs: dict = field(default_factory=dict)    # {name: {uri, fingerprint}}
    params: dict = field(default_factory=dict)    # stage parameters that shaped it
    lineage: dict = field(default_factory=dict)   # {source, revision, stages: [...]}
    extra: dict = field(default_factory=dict)     # format-specific facts (original layout, ...)
    schema: int = SCHEMA
    created: str = ""
    tool: str = ""
    uri: str | None = field(default=None, compare=False)  # where it was read from; not stored

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("uri")
        return d

    @classmethod
    def from_dict(cls, d: dict, uri: str | None = None) -> "Manifest":
        names = {f.name for f in dataclasses.fields(cls)} - {"uri"}
        if "kind" not in d or "format" not in d:
            raise CkptError(f"{uri or NAME}: manifest lacks 'kind' or 'format'")
        return cls(**{k: v for k, v in d.items() if k in names}, uri=uri)

    def input_fingerprints(self) -> dict:
        return {k: v.get("fingerprint") for k, v in self.inputs.items()}


def canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def fingerprint(m: Manifest) -> str:
    """sha256 of the canonical JSON, leaving out when and by which version it was written,
    so two identical outputs (say, the same base converted by two runs) share a fingerprint."""
    d = m.to_dict()
    d.pop("created", None)
    d.pop("tool", None)
    return hashlib.sha256(canonical(d)).hexdigest()


def input_ref(m: Manifest) -> dict:
    """How another manifest names this one as an input."""
    return {"uri": m.uri, "fingerprint": fingerprint(m)}


def read(uri: str) -> Manifest | None:
    """The committed manifest of directory `uri`, or None if the directory is not committed."""
    path = storage.join(uri, NAME)
    if not storage.isfile(path):
        return None
    data = storage.read_json(path)
    if not isinstance(data, dict):
        raise CkptError(f"{path}: not a ckptflow manifest")
    if data.get("schema", 0) > SCHEMA:
        raise CkptError(f"{path}: schema {data['schema']} is newer than this ckptflow ({SCHEMA})")
    return Manifest.from_dict(data, uri=storage.normalize(uri))


def require(uri: str) -> Manifest:
    m = read(uri)
    if m is None:
        raise CkptError(f"{uri}: not a committed ckptflow directory (no {NAME})")
    return m


def is_committed(uri: str) -> bool:
    return storage.isfile(storage.join(uri, NAME))


def write(uri: str, m: Manifest) -> Manifest:
    """The commit: one atomic put of ckptflow.json. Call only after every listed file is written."""
    m.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    m.tool = f"ckptflow {__version__}"
    body = json.dumps(m.to_dict(), indent=1, sort_keys=True).encode() + b"\n"
    storage.put_atomic(storage.join(uri, NAME), body)
    m.uri = storage.normalize(uri)
    return m


def uncommit(uri: str) -> None:
    """Remove the marker first, so a crash mid-rewrite never leaves stale data looking committed."""
    storage.remove(storage.join(uri, NAME))


def matches(m: Manifest | None, inputs: dict, params: dict) -> bool:
    """True when committed output `m` was made from the same inputs with the same params."""
    if m is None:
        return False
    want = {k: v.get("fingerprint") for k, v in inputs.items()}
    return m.input_fingerprints() == want and canonical(m.params) == canonical(params)


def verify(uri: str) -> list[str]:
    """Re-hash every listed file; returns the problems (empty when the directory verifies)."""
    return Check(uri, require(uri)).problems()


class Damaged(CkptError):
    """A committed directory whose files no longer match its manifest."""

    def __init__(self, uri: str, problems: list[str]):
        self.uri, self.problems = uri, problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}: the source does not match its {NAME}; it is damaged or was "
                         f"changed after its commit, so nothing was written (`ckptflow verify {uri}`)")


class Check:
    """Re-hash the files committed manifest `m` lists, on background threads (hashlib releases
    the GIL), several files at once: `verify`, and a stage that reads a committed source checks
    it while it converts it instead of before. `problems()` waits for the answer."""

    def __init__(self, uri: str, m: Manifest, only: set[str] | None = None):
        """`only`: the URIs to check (of those listed); default every listed file."""
        from concurrent.futures import ThreadPoolExecutor

        self.uri = storage.normalize(uri)
        self._want = {name: d for name, d in sorted(m.files.items())
                      if only is None or storage.join(self.uri, name) in only}
        n = max(1, min(len(self._want), os.cpu_count() or 1, 4))
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="ckptflow-verify")
        self._got = {name: self._pool.submit(_digest_or_none, storage.join(self.uri, name)) for name in self._want}
        self._pool.shutdown(wait=False)

    def problems(self) -> list[str]:
        problems = []
        for name, want in self._want.items():
            path, got = storage.join(self.uri, name), self._got[name].result()
            if got is None:
                problems.append(f"{path}: missing")
            elif got["size"] != want.get("size"):
                problems.append(f"{path}: size {got['size']} != {want.get('size')}")
            elif got["sha256"] != want.get("sha256"):
                problems.append(f"{path}: sha256 mismatch")
        return problems

    def require(self) -> None:
        """Raise Damaged, naming the first damaged file, unless every file verifies."""
        problems = self.problems()
        if problems:
            raise Damaged(self.uri, problems)

    def cancel(self) -> None:
        for fut in self._got.values():
            fut.cancel()


@contextlib.contextmanager
def checked_while(m: Manifest | None, only: set[str] | None = None):
    """A committed source is re-hashed against its manifest while a stage's body converts it (on
    other cores), so a damaged source fails the write instead of being copied into a new commit:
    after the body, Damaged if a file differs. `only`: the URIs the stage reads (an export of a
    step reads no optimizer state). A body that fails cancels the check and keeps its own error."""
    check = Check(m.uri, m, only=only) if m is not None and m.uri and m.files else None
    try:
        yield
    except BaseException:
        if check is not None:
            check.cancel()
        raise
    if check is not None:
        check.require()


def _digest_or_none(path: str) -> dict | None:
    return storage.file_digest(path) if storage.isfile(path) else None


def committed_under(uri: str) -> tuple[list[str], list[str]]:
    """(committed, interrupted) directories below `uri`, from one recursive listing: a directory
    is committed by its ckptflow.json, interrupted by a writing marker without one. Hidden
    directories (.cache: Prefect results, the shared base) are left out."""
    files = [f for f in storage.list_files(uri) if not any(p.startswith(".") for p in f.split("/")[:-1])]

    def dirs_with(name: str) -> set[str]:
        return {f[:-len(name)].rstrip("/") for f in files if f == name or f.endswith("/" + name)}

    committed = dirs_with(NAME)
    interrupted = dirs_with(MARKER) - committed
    return ([storage.join(uri, d) if d else storage.normalize(uri) for d in sorted(committed)],
            [storage.join(uri, d) for d in sorted(interrupted)])
