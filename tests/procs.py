"""Real writer processes for the lease and crash tests. They fork from a forkserver that has
already imported ckptflow and s3fs, so each starts in milliseconds instead of seconds; they are
separate processes all the same (own pid, own memory, killed with SIGKILL).

A forkserver child does not see the test's environment changes, so storage options travel as
an argument ({URI prefix: fsspec options}) and are set in the child.
"""
from __future__ import annotations

import multiprocessing as mp
import os

PRELOAD = ["tests.procs", "ckptflow.lease", "ckptflow.collect", "ckptflow.stages.convert", "s3fs"]
_CTX = None


def context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def start(target, *args):
    p = context().Process(target=target, args=args, daemon=True)
    p.start()
    return p


def _configure(options: dict) -> None:
    from ckptflow import storage

    for prefix, opts in options.items():
        storage.set_options(prefix, opts)


def lease_writer(run: str, owner: str, options: dict, go, release, results) -> None:
    """Wait for `go`, take the lease of `run`, report ("won", owner, pid) or ("lost", owner,
    message), and hold the lease until `release` is set."""
    from ckptflow import lease, storage
    from ckptflow.errors import CkptError

    _configure(options)
    storage.exists(run)                 # the storage client is ready before the race starts
    results.put(("ready", owner, os.getpid()))
    go.wait()
    try:
        with lease.hold(run, owner=owner):
            results.put(("won", owner, os.getpid()))
            release.wait()
    except CkptError as e:
        results.put(("lost", owner, str(e)))


def convert_into(src: str, dst: str, options: dict, dtype: str | None, overwrite: bool) -> None:
    """One conversion, as a stage runs it (the crash test kills this at random moments)."""
    from ckptflow.stages import convert

    _configure(options)
    convert.run(src, dst, dtype=dtype, overwrite=overwrite)
