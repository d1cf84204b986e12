"""The one fsspec seam. URIs are plain strings: local paths, file://, s3://, gs://, memory://.

Everything ckptflow reads or writes goes through here, so retries, storage options and the
commit protocol live in one place. Writers hash while writing (never a second read).

Object stores (s3://, gs://, ...):
- configured by the environment (AWS_*, AWS_ENDPOINT_URL; GOOGLE_APPLICATION_CREDENTIALS) and by
  `set_options(prefix, storage_options)` (the run config's storage_options), see docs/storage.md;
- listings are never served from a cache, so exists/isfile/listdir see what another process wrote
  a moment ago (s3fs and gcsfs cache listings per instance by default);
- a file being written is spooled locally (in memory up to SPOOL_MEMORY, then an anonymous temp
  file) and uploaded whole on close, so a transient fault retries the whole upload and a crash
  never leaves a partial object under the file's name;
- reads reopen at the current offset after a transient fault.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import queue
import tempfile
import threading
import uuid

from ckptflow.errors import CkptError, TransientError

log = logging.getLogger(__name__)

CHUNK = 16 * 1024 * 1024
SPOOL_MEMORY = 16 * 1024 * 1024      # larger files spool to an anonymous temp file (gone if we crash)
SPOOL_DIR = os.environ.get("CKPTFLOW_SPOOL_DIR") or None
# Protocols whose fsspec implementation caches directory listings; we turn that off (see above).
LISTING_CACHES = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "oss"}
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
    opts = options_for(uri)
    if protocol(uri) in LISTING_CACHES:
        opts.setdefault("use_listings_cache", False)
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    from ckptflow import retry

    retry.check_endpoint(_endpoint_url(fs, uri), uri)   # a wrong endpoint: one line at once, not retries
    return fs, path


def _endpoint_url(fs, uri: str) -> str | None:
    """The S3 endpoint `fs` talks to when one is configured (storage_options or AWS_ENDPOINT_URL)."""
    if protocol(uri) not in ("s3", "s3a"):
        return None
    return (getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def _fresh(uri: str):
    """(fs, path) with any cached listing of `path` and its parents dropped (another process may
    have written there since)."""
    fs, path = fs_and_path(uri)
    if not is_local(uri):
        fs.invalidate_cache(path)
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


def info(uri: str) -> dict | None:
    """fsspec's info of `uri` (type, size, ...), or None when nothing is there. Other errors are
    raised (after retries), never read as "missing": fsspec's own exists/isfile/isdir swallow
    every exception, which would turn a timeout into "not committed"."""
    fs, path = _fresh(uri)
    try:
        return _call(uri, "info", fs.info, path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def exists(uri: str) -> bool:
    return info(uri) is not None


def isdir(uri: str) -> bool:
    got = info(uri)
    return got is not None and got.get("type") == "directory"


def isfile(uri: str) -> bool:
    got = info(uri)
    return got is not None and got.get("type") == "file"


def size(uri: str) -> int:
    fs, path = _fresh(uri)
    try:
        return int(_call(uri, "size", fs.size, path))
    except FileNotFoundError as e:
        raise CkptError(f"{uri}: no such file") from e


def stamp(uri: str) -> str:
    """What changes when a file is rewritten in place, without reading it: size and modification
    time locally (ns), size and ETag (or last-modified) on object stores. Equal stamps mean "same
    file, untouched"; a copy gets another stamp, which only costs a re-conversion."""
    if is_local(uri):
        try:
            st = os.stat(local_path(uri))
        except (FileNotFoundError, NotADirectoryError):
            raise CkptError(f"{uri}: no such file") from None
        return f"{st.st_size}:{st.st_mtime_ns}"
    got = info(uri)
    if got is None:
        raise CkptError(f"{uri}: no such file")
    tag = got.get("ETag") or got.get("etag") or got.get("LastModified") or got.get("mtime") or ""
    return f"{got.get('size')}:{tag}"


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under `uri`; [] when it does not exist."""
    fs, path = _fresh(uri)
    try:
        entries = _call(uri, "ls", fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    own = path.rstrip("/")
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != own})


def list_files(uri: str) -> list[str]:
    """Relative paths of every file below `uri` (recursive), sorted."""
    fs, path = _fresh(uri)
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
    except (FileNotFoundError, IsADirectoryError) as e:
        raise CkptError(f"{uri}: no such file") from e


def read_text(uri: str) -> str:
    try:
        return read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CkptError(f"{uri}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_json(uri: str):
    import json

    try:
        return json.loads(read_text(uri))
    except ValueError as e:
        raise CkptError(f"{uri}: not valid JSON ({e})") from e


def open_read(uri: str):
    """A binary file for reading (read/seek/tell, a context manager). On object stores a
    transient fault in the middle of a read reopens the file at the same offset."""
    fs, path = fs_and_path(uri)
    try:
        f = _call(uri, "open", fs.open, path, "rb")
    except (FileNotFoundError, IsADirectoryError) as e:
        raise CkptError(f"{uri}: no such file") from e
    if protocol(uri) == "memory":
        # fsspec's memory store hands every reader the same file object, one position for all:
        # a stage reading a file while its source check hashes it would read the other's bytes.
        return io.BytesIO(f.getvalue())
    return f if is_local(uri) else _Reader(uri, fs, path, f)


class _Reader:
    """A remote file that survives transient faults: each read is retried whole, after reopening
    the file at the offset where the failed read started."""

    def __init__(self, uri: str, fs, path: str, f):
        self.uri, self._fs, self._path, self._f = uri, fs, path, f
        self._pos = 0
        self._size = getattr(f, "size", None)

    def _read_once(self, n: int) -> bytes:
        if self._f is None:
            self._f = self._fs.open(self._path, "rb")
            self._f.seek(self._pos)
        try:
            data = self._f.read(n)
        except Exception:
            self._drop()
            raise
        self._pos += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        return _call(self.uri, "read", self._read_once, n)

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        elif whence == 2:
            if self._size is None:
                self._size = size(self.uri)
            pos += self._size
        self._pos = pos
        if self._f is not None:
            self._f.seek(pos)
        return pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _drop(self) -> None:
        f, self._f = self._f, None
        try:
            f.close()
        except Exception:  # noqa: BLE001 - the handle is already broken
            pass

    def close(self) -> None:
        if self._f is not None:
            self._drop()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


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


def put_atomic(uri: str, data: bytes, *, durable: bool = True) -> None:
    """One atomic write: temp file + fsync + os.replace locally, a single PUT on object stores
    (retried whole on a transient fault; a PUT either lands entirely or not at all).
    durable=False skips the fsyncs: still atomic for every reader, but may not survive a power
    loss (for files that are meaningless after a reboot, like the writer lease)."""
    if is_local(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{TMP_INFIX}{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        if durable:
            _fsync_dir(os.path.dirname(path))
        return
    fs, path = fs_and_path(uri)
    try:
        _call(uri, "write", fs.pipe_file, path, bytes(data))
    except FileNotFoundError as e:
        raise CkptError(f"{uri}: cannot write: {e} (does the bucket exist?)") from e
    fs.invalidate_cache(path)


TMP_INFIX = ".tmp-"    # put_atomic's temp files: `{name}.tmp-XXXXXXXX` (gc removes strays)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# fsync of a directory that the file system does not support: nothing to make durable there.
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def _fsync_dir(path: str) -> None:
    """Make the entries of directory `path` durable (a new or renamed file's name). A real error
    (EIO, ENOSPC, ...) is raised: the data may not be on disk; only "not supported" is ignored."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_files(uri: str, names) -> None:
    """Local `uri`: fsync every file in `names` (relative); their directories are fsync_dirs' work.
    Object stores have nothing to sync."""
    if not is_local(uri):
        return
    for name in names:
        fd = os.open(os.path.join(local_path(uri), name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dirs(uri: str, names) -> None:
    """Local `uri`: fsync the directories that hold `names` (files already fsynced), `uri` and its parent."""
    if not is_local(uri):
        return
    root = local_path(uri)
    dirs = {root, os.path.dirname(root)}
    for name in names:
        d = os.path.dirname(os.path.join(root, name))
        while d.startswith(root) and d not in dirs:
            dirs.add(d)
            d = os.path.dirname(d)
    for d in sorted(dirs, key=len, reverse=True):
        _fsync_dir(d)


_POOL = None
# Closed files whose hashing and fsync may still run while the next is written: one per core (at
# least 2), since sha256 runs at ~1.6 GB/s on a core, slower than a disk's page cache takes bytes.
HASH_AHEAD = max(2, min(8, os.cpu_count() or 1))
_AHEAD = threading.BoundedSemaphore(HASH_AHEAD)
_BUFFERS: list[bytearray] = []      # CHUNK-sized read buffers, reused: no fresh pages to fault in
_BUFFERS_LOCK = threading.Lock()
COPY_ERRORS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def _finish_pool():
    """The threads that finish closed files: their hash, fsync or upload (HashingWriter.close_later)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=HASH_AHEAD, thread_name_prefix="ckptflow-finish")
    return _POOL


def _after_fork() -> None:
    """A forked child has none of the parent's threads: its pool and slots start afresh."""
    global _POOL, _AHEAD
    _POOL, _AHEAD = None, threading.BoundedSemaphore(HASH_AHEAD)
    _BUFFERS.clear()


os.register_at_fork(after_in_child=_after_fork)


@contextlib.contextmanager
def _buffer():
    """A CHUNK-sized bytearray from the pool (returned on exit)."""
    with _BUFFERS_LOCK:
        buf = _BUFFERS.pop() if _BUFFERS else None
    if buf is None or len(buf) != CHUNK:
        buf = bytearray(CHUNK)
    try:
        yield buf
    finally:
        with _BUFFERS_LOCK:
            if len(_BUFFERS) < 2 * HASH_AHEAD:
                _BUFFERS.append(buf)


class Hasher:
    """sha256 in a background thread, so hashing overlaps the I/O (hashlib drops the GIL).

    Items are bytes-like chunks, or (offset, length) ranges of the file at `path`, read back
    (from the page cache) by this thread: the bytes copy_file_range put there without passing
    through Python. Ranges are hashed in file order with the chunks, as they were queued.
    threaded=False hashes in the caller instead: a writer that is itself a background thread
    (an asynchronous step save) then keeps to one core, beside the training threads."""

    def __init__(self, path: str | None = None, *, threaded: bool = True):
        self._h = hashlib.sha256()
        self._q: queue.Queue = queue.Queue(maxsize=4)
        self._path, self._fd, self._error = path, None, None
        self._t = threading.Thread(target=self._run, daemon=True, name="ckptflow-hash") if threaded else None
        if self._t is not None:
            self._t.start()
        self.size = 0

    def _run(self):
        try:
            while (item := self._q.get()) is not None:
                if isinstance(item, tuple):
                    self._hash_range(*item)
                else:
                    self._h.update(item)
        except BaseException as e:  # noqa: BLE001 - reported by hexdigest, in the writer's thread
            self._error = e
            while self._q.get() is not None:
                pass
        finally:
            if self._fd is not None:
                os.close(self._fd)

    def _hash_range(self, offset: int, length: int) -> None:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY)
        with _buffer() as buf:
            view = memoryview(buf)
            while length:
                n = os.preadv(self._fd, [view[:min(len(buf), length)]], offset)
                if n <= 0:
                    raise CkptError(f"{self._path}: shorter than what was copied into it")
                self._h.update(view[:n])
                offset, length = offset + n, length - n

    def update(self, data) -> None:
        self.size += len(data)
        if self._t is None:
            self._h.update(data)
        else:
            self._q.put(data)

    def update_range(self, offset: int, length: int) -> None:
        self.size += length
        if self._t is None:
            self._hash_range(offset, length)
        else:
            self._q.put((offset, length))

    def hexdigest(self) -> str:
        self.stop()
        if self._error is not None:
            raise self._error
        return self._h.hexdigest()

    def stop(self) -> None:
        """End the thread (idempotent); after this the digest is final."""
        if self._t is None:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        elif self._t.is_alive():
            self._q.put(None)
            self._t.join()


class HashingWriter:
    """A binary file being written into an uncommitted directory; size and sha256 as it goes.

    Locally the bytes go straight to the file, and `copy_range` copies bytes of another local
    file inside the kernel. On object stores they are spooled (memory, then an anonymous temp
    file that the OS frees even after SIGKILL) and uploaded whole by close(), retried whole on a
    transient fault: the hash is taken once, over the bytes the caller wrote, and the upload is
    checked against that size, so a retried upload cannot change the digest."""

    def __init__(self, uri: str, *, threaded: bool = True):
        """threaded: hash in a thread of its own (see Hasher)."""
        self.uri = uri
        self._local = is_local(uri)
        if self._local:
            path = local_path(uri)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self._f = open(path, "wb", buffering=0)
            except PermissionError as e:
                raise CkptError(f"{uri}: permission denied ({e.strerror})") from e
            self._hasher = Hasher(path, threaded=threaded)
        else:
            self._f = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, dir=SPOOL_DIR)
            self._hasher = Hasher(threaded=threaded)

    def write(self, data) -> int:
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)  # the hasher thread must see an immutable buffer
        view, n = memoryview(data), len(data)
        while view:
            view = view[self._f.write(view):]   # unbuffered: a write may take less than all
        self._hasher.update(data)
        return n

    def copy_range(self, src: str, start: int, end: int) -> None:
        """Append bytes [start, end) of file `src`: locally inside the kernel (copy_file_range;
        the hasher reads them back from the page cache on its own thread), else through memory."""
        if self._local and is_local(src) and self._copy_in_kernel(local_path(src), start, end):
            return
        with open_read(src) as f:
            f.seek(start)
            left = end - start
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise CkptError(f"{src}: truncated (ends before byte {end})")
                self.write(chunk)
                left -= len(chunk)

    def _copy_in_kernel(self, src: str, start: int, end: int) -> bool:
        """Pieces of 4 chunks, each handed to the hasher as soon as it is in place."""
        fd_out = self._f.fileno()
        at = os.lseek(fd_out, 0, os.SEEK_CUR)
        fd_in = os.open(src, os.O_RDONLY)
        try:
            offset = start
            while offset < end:
                try:
                    n = os.copy_file_range(fd_in, fd_out, min(4 * CHUNK, end - offset), offset)
                except OSError as e:
                    if offset == start and e.errno in COPY_ERRORS:
                        return False    # this kernel or file system cannot: copy through memory
                    raise
                if n == 0:
                    raise CkptError(f"{src}: truncated (ends before byte {end})")
                self._hasher.update_range(at + offset - start, n)
                offset += n
        finally:
            os.close(fd_in)
        return True

    def close(self, *, durable: bool = True) -> dict:
        """Finish the file; {size, sha256}. Locally the data is fsynced before this returns
        (durable=False leaves that to the caller's commit). On object stores the upload is
        done (and the object's size checked) when this returns."""
        digest = self._digest()
        if self._local:
            if durable:
                os.fsync(self._f.fileno())
            self._f.close()
            return digest
        try:
            upload(self._f, self.uri, digest["size"])
        finally:
            self._f.close()
        return digest

    def close_later(self):
        """Finish the file without waiting for its hash or its fsync: a Future of {size, sha256}
        that the committer resolves before it writes the manifest, so file N is hashed and
        flushed while file N+1 is written. At most HASH_AHEAD files finish in the background;
        the next close_later waits for a slot (bounding the memory queued for hashing). On object
        stores the upload runs there too."""
        _AHEAD.acquire()
        try:
            if not self._local:     # the upload of file N overlaps the writing of N+1
                return _finish_pool().submit(self._finish_remote)
            fd = os.dup(self._f.fileno())
            self._f.close()
            try:
                return _finish_pool().submit(self._finish, fd)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            _AHEAD.release()
            raise

    def _finish(self, fd: int) -> dict:
        try:
            digest = self._digest()
            os.fsync(fd)
            return digest
        finally:
            os.close(fd)
            _AHEAD.release()

    def _finish_remote(self) -> dict:
        try:
            return self.close()
        finally:
            _AHEAD.release()

    def _digest(self) -> dict:
        return {"size": self._hasher.size, "sha256": self._hasher.hexdigest()}

    def abort(self) -> None:
        """Give up on the file. Remotely nothing was uploaded; locally the partial file stays in
        the uncommitted directory (the next writer or `ckptflow gc` removes it)."""
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - the write already failed; keep the first error
            pass
        self._hasher.stop()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()


def upload(f, uri: str, nbytes: int) -> None:
    """Upload the whole of open binary file `f` to `uri`, retried whole on a transient fault,
    then check that the object has `nbytes` bytes."""
    fs, path = fs_and_path(uri)

    def once() -> None:
        f.seek(0)
        if nbytes <= SPOOL_MEMORY:
            fs.pipe_file(path, f.read())       # one PUT: the body is the object, or nothing is
            return
        if os.path.exists(_fd_path(f)):
            fs.put_file(_fd_path(f), path)     # s3fs uploads the parts concurrently
        else:
            _stream(f, fs, path)
        fs.invalidate_cache(path)
        got = fs.size(path)                    # parts assembled by the store: check the total
        if got != nbytes:
            raise TransientError(f"{uri}: uploaded {nbytes} bytes but the store holds {got}")

    try:
        _call(uri, "upload", once)
    except FileNotFoundError as e:
        raise CkptError(f"{uri}: cannot write: {e} (does the bucket exist?)") from e


def _fd_path(f) -> str:
    """A path that opens the anonymous temp file behind `f` (Linux /proc magic link): fsspec's
    put_file wants a path, and the spool file has no name, so that a crash leaks nothing."""
    f.flush()
    return f"/proc/self/fd/{f.fileno()}"


def _stream(f, fs, path: str) -> None:
    """Upload without a path (no /proc): a multipart stream, aborted (never completed) on error."""
    out = fs.open(path, "wb", block_size=CHUNK * 4)
    try:
        while chunk := f.read(CHUNK):
            out.write(chunk)
    except BaseException:
        discard = getattr(out, "discard", None)
        if discard is not None:
            discard()
        raise
    out.close()


def file_digest(uri: str) -> dict:
    """{size, sha256} of an existing file (used by verify, which is the one deliberate second read).
    Locally read into one reused buffer: no fresh memory (and page faults) per chunk."""
    h, n = hashlib.sha256(), 0
    if is_local(uri):
        try:
            f = open(local_path(uri), "rb", buffering=0)
        except (FileNotFoundError, IsADirectoryError) as e:
            raise CkptError(f"{uri}: no such file") from e
        with f, _buffer() as buf:
            view = memoryview(buf)
            while got := f.readinto(buf):
                h.update(view[:got])
                n += got
        return {"size": n, "sha256": h.hexdigest()}
    with open_read(uri) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return {"size": n, "sha256": h.hexdigest()}
