"""The one fsspec seam. URIs are plain strings: local paths, file://, s3://, gs://, memory://.

Everything ckptflow reads or writes goes through here, so retries, storage options and the
commit protocol live in one place. Writers hash while writing (never a second read).
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import uuid

from ckptflow.errors import CkptError

log = logging.getLogger(__name__)

CHUNK = 16 * 1024 * 1024
_OPTIONS: dict[str, dict] = {}


def set_options(prefix: str, options: dict | None) -> None:
    """Storage options (fsspec kwargs) for every URI starting with `prefix` ("s3://", "s3://bucket")."""
    if options:
        _OPTIONS[prefix] = dict(options)
    else:
        _OPTIONS.pop(prefix, None)


def options_for(uri: str) -> dict:
    best = ""
    for prefix in _OPTIONS:
        if uri.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return dict(_OPTIONS.get(best, {}))


def protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def is_local(uri: str) -> bool:
    return protocol(uri) in ("file", "local")


def local_path(uri: str) -> str:
    """The filesystem path of a local URI."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def fs_and_path(uri: str):
    import fsspec  # lazy: keeps `import ckptflow` light

    if is_local(uri):
        return fsspec.filesystem("file"), local_path(uri)
    fs, path = fsspec.core.url_to_fs(uri, **options_for(uri))
    return fs, path


def normalize(uri: str) -> str:
    """Local URIs become absolute paths; remote URIs lose trailing slashes."""
    return local_path(uri) if is_local(uri) else uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        if part:
            out = f"{out}/{part.strip('/')}"
    return out


def parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def safe_relpath(name: str, where: str) -> str:
    """Reject names that would escape their directory (index files name shard files)."""
    norm = os.path.normpath(name).replace("\\", "/")
    if name.startswith(("/", "\\")) or norm.startswith("..") or "://" in name or norm in ("", "."):
        raise CkptError(f"{where}: file name {name!r} escapes its directory")
    return norm


def _call(uri: str, what: str, fn, *args, **kwargs):
    """Run one storage call; errors name the URI. Transient faults are retried (see retry.py)."""
    from ckptflow import retry

    return retry.call(fn, *args, uri=uri, what=what, **kwargs)


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return bool(_call(uri, "exists", fs.exists, path))


def isdir(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return bool(_call(uri, "isdir", fs.isdir, path))


def isfile(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return bool(_call(uri, "isfile", fs.isfile, path))


def size(uri: str) -> int:
    fs, path = fs_and_path(uri)
    return int(_call(uri, "size", fs.size, path))


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under `uri`; [] when it does not exist."""
    fs, path = fs_and_path(uri)
    if not is_local(uri):
        fs.invalidate_cache(path)
    try:
        entries = _call(uri, "ls", fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    own = path.rstrip("/")
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != own})


def list_files(uri: str) -> list[str]:
    """Relative paths of every file below `uri` (recursive), sorted."""
    fs, path = fs_and_path(uri)
    if not is_local(uri):
        fs.invalidate_cache(path)
    try:
        found = _call(uri, "find", fs.find, path)
    except FileNotFoundError:
        return []
    root = path.rstrip("/") + "/"
    return sorted(p[len(root):] for p in found if p.startswith(root))


def read_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    fs, path = fs_and_path(uri)
    try:
        if start is None and end is None:
            return _call(uri, "read", fs.cat_file, path)
        return _call(uri, "read", fs.cat_file, path, start=start, end=end)
    except FileNotFoundError as e:
        raise CkptError(f"{uri}: no such file") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str):
    import json

    try:
        return json.loads(read_text(uri))
    except ValueError as e:
        raise CkptError(f"{uri}: not valid JSON ({e})") from e


def open_read(uri: str):
    fs, path = fs_and_path(uri)
    try:
        return _call(uri, "open", fs.open, path, "rb")
    except FileNotFoundError as e:
        raise CkptError(f"{uri}: no such file") from e
    except PermissionError as e:
        raise CkptError(f"{uri}: permission denied") from e


def remove(uri: str) -> None:
    """Delete a file or a directory tree; missing is fine."""
    fs, path = fs_and_path(uri)
    try:
        _call(uri, "rm", fs.rm, path, recursive=True)
    except FileNotFoundError:
        pass
    if not is_local(uri):
        fs.invalidate_cache(path)


def makedirs(uri: str) -> None:
    fs, path = fs_and_path(uri)
    _call(uri, "makedirs", fs.makedirs, path, exist_ok=True)


def put_atomic(uri: str, data: bytes) -> None:
    """One atomic write: temp file + fsync + os.replace locally, a single PUT on object stores."""
    if is_local(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))
        return
    fs, path = fs_and_path(uri)
    _call(uri, "write", fs.pipe_file, path, data)
    fs.invalidate_cache(path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_POOL = None


def _fsync_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptflow-fsync")
    return _POOL


def _fsync_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Hasher:
    """sha256 in a background thread, so hashing overlaps the I/O (hashlib drops the GIL)."""

    def __init__(self):
        self._h = hashlib.sha256()
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.size = 0

    def _run(self):
        while (chunk := self._q.get()) is not None:
            self._h.update(chunk)

    def update(self, data) -> None:
        self.size += len(data)
        self._q.put(data)

    def hexdigest(self) -> str:
        self._q.put(None)
        self._t.join()
        return self._h.hexdigest()


class HashingWriter:
    """A binary file being written into an uncommitted directory; size and sha256 as it goes."""

    def __init__(self, uri: str):
        self.uri = uri
        self._hasher = Hasher()
        if is_local(uri):
            path = local_path(uri)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._f = open(path, "wb")
            self._local = True
        else:
            fs, path = fs_and_path(uri)
            self._f = _call(uri, "open", fs.open, path, "wb", block_size=CHUNK * 4)
            self._local = False

    def write(self, data) -> int:
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)  # the hasher thread must see an immutable buffer
        self._f.write(data)
        self._hasher.update(data)
        return len(data)

    def close(self, *, durable: bool = True) -> dict:
        """Finish the file; {size, sha256}. Locally the data is fsynced before this returns,
        or, with durable=False, in the background: `self.synced` is then a Future that the
        committer waits for before it writes the manifest (the flush overlaps the next file)."""
        self.synced = None
        if self._local:
            self._f.flush()
            if durable:
                os.fsync(self._f.fileno())
                self._f.close()
            else:
                fd = os.dup(self._f.fileno())
                self._f.close()
                self.synced = _fsync_pool().submit(_fsync_fd, fd)
        else:
            self._f.close()
        return {"size": self._hasher.size, "sha256": self._hasher.hexdigest()}

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - the write already failed; keep the first error
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()


def copy_file(src: str, dst: str) -> dict:
    """Stream one file to another location, hashing on the way; returns {size, sha256}."""
    with open_read(src) as fin, HashingWriter(dst) as out:
        while chunk := fin.read(CHUNK):
            out.write(chunk)
        return out.close()


def file_digest(uri: str) -> dict:
    """{size, sha256} of an existing file (used by verify, which is the one deliberate second read)."""
    h = hashlib.sha256()
    n = 0
    with open_read(uri) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return {"size": n, "sha256": h.hexdigest()}
