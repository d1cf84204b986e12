"""`flaky://`: an fsspec filesystem over memory:// that fails a share of its calls the way object
stores fail: connection resets, timeouts, 503 SlowDown, half of them after the operation took
effect (the response was lost). Reads through open files fail too, some after consuming data.

    FlakyFileSystem.configure(rate=0.2, seed=1)     # then any flaky://path URI
    FlakyFileSystem.stats                            # Counter of calls and failures

With rate=0 it is a recorder: `FlakyFileSystem.log` lists (operation, path) in call order.
"""
from __future__ import annotations

import errno
import io
import random
from collections import Counter

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem

FAULTS = (
    lambda: ConnectionResetError(errno.ECONNRESET, "flaky: connection reset by peer"),
    lambda: TimeoutError("flaky: read timed out"),
    lambda: OSError(errno.EBUSY, "flaky: SlowDown, please reduce your request rate"),
)


class FlakyFileSystem(AbstractFileSystem):
    protocol = ("flaky",)
    root_marker = "/"
    rate = 0.0
    rng = random.Random(0)
    stats: Counter = Counter()
    log: list = []

    @classmethod
    def configure(cls, rate: float, seed: int = 0) -> None:
        cls.rate, cls.rng, cls.stats, cls.log = rate, random.Random(seed), Counter(), []

    @property
    def target(self) -> MemoryFileSystem:
        return fsspec.filesystem("memory")

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol("memory://" + str(path).split("://", 1)[-1])

    def _fault(self, op: str, path, *, after=None):
        """Maybe fail; `after` runs the operation first for half of the faults (a lost response)."""
        FlakyFileSystem.stats[op] += 1
        FlakyFileSystem.log.append((op, path))
        if FlakyFileSystem.rng.random() >= FlakyFileSystem.rate:
            return
        FlakyFileSystem.stats["failures"] += 1
        if after is not None and FlakyFileSystem.rng.random() < 0.5:
            after()
        raise FlakyFileSystem.rng.choice(FAULTS)()

    def ls(self, path, detail=True, **kw):
        self._fault("ls", path)
        return self.target.ls(path, detail=detail, **kw)

    def info(self, path, **kw):
        self._fault("info", path)
        return self.target.info(path, **kw)

    def cat_file(self, path, start=None, end=None, **kw):
        self._fault("cat_file", path)
        return self.target.cat_file(path, start=start, end=end, **kw)

    def pipe_file(self, path, value, **kw):
        self._fault("pipe_file", path, after=lambda: self.target.pipe_file(path, value))
        self.target.pipe_file(path, value, **kw)

    def put_file(self, lpath, rpath, **kw):
        self._fault("put_file", rpath, after=lambda: self.target.put_file(lpath, rpath))
        self.target.put_file(lpath, rpath, **kw)

    def rm(self, path, recursive=False, maxdepth=None):
        self._fault("rm", path, after=lambda: self.target.rm(path, recursive=recursive))
        self.target.rm(path, recursive=recursive, maxdepth=maxdepth)

    def rm_file(self, path):
        self.rm(path)

    def mkdir(self, path, create_parents=True, **kw):
        self.target.mkdir(path, create_parents=create_parents, **kw)

    def makedirs(self, path, exist_ok=False):
        self.target.makedirs(path, exist_ok=exist_ok)

    def _open(self, path, mode="rb", **kw):
        self._fault("open", path)
        f = self.target._open(path, mode, **kw)
        if mode == "rb":    # memory:// hands every reader one shared file object; a store gives each its own
            f = io.BytesIO(f.getvalue())
        return _FlakyFile(self, f, path)


class _FlakyFile:
    def __init__(self, fs: FlakyFileSystem, f, path):
        self._fs, self._f, self._path = fs, f, path

    def read(self, n=-1):
        data = self._f.read(n)
        self._fs._fault("read", self._path)   # a fault after reading: those bytes are lost
        return data

    def write(self, data):
        self._fs._fault("write", self._path)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
