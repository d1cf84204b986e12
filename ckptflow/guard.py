"""Children that die with their parent, however the parent dies (SIGKILL included).

    proc = guard.popen(["torchrun", ...])      # or the embedded Prefect API server
    proc.pid                                   # the group to kill: os.killpg(proc.pid, SIGTERM)

`popen` starts `python -m ckptflow.guard PARENT_PID -- CMD...` in a new session; the guard
starts CMD in its own process group and waits. It exits as CMD did (the same code, or killed by
the same signal) when CMD ends; when
PARENT_PID is no longer its parent (the parent died, the guard was re-parented) it sends SIGTERM
to the whole group and every descendant (the guard is their subreaper: torchrun puts each rank
in a session of its own), then SIGKILL after GRACE_SECONDS, itself last. A SIGTERM or SIGINT to the
group reaches CMD; the guard itself ignores them and waits for CMD.

Why not PR_SET_PDEATHSIG: Linux sends it when the *thread* that forked the child exits, not the
process, so a child started from a worker thread (Prefect runs tasks in threads) is killed when
that thread ends, long before the parent does (measured: `sleep 30` started with
PR_SET_PDEATHSIG=SIGKILL from a thread that then returned was killed within a second while its
parent lived on). Why not a pipe
whose end-of-file means "parent gone": every process forked by the parent (DataLoader workers,
multiprocessing) inherits the write end and keeps it open after the parent's death. Polling
getppid every POLL_SECONDS is immune to both and costs nothing measurable.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_SECONDS = 0.2
GRACE_SECONDS = 5.0


def command(cmd: list[str], parent: int | None = None) -> list[str]:
    return [sys.executable, "-m", "ckptflow.guard", str(parent or os.getpid()), "--", *cmd]


def popen(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Popen of `cmd` under a guard, in a new session: the returned pid is its process group."""
    return subprocess.Popen(command(cmd), start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the guarded group, SIGKILL what is left after `grace` seconds; reap the guard."""
    if proc.poll() is None:
        killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace + 1.0)
        except subprocess.TimeoutExpired:
            pass
    killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()


def killpg(pgid: int, sig: int) -> None:
    """Signal process group `pgid`; one that is gone (or not ours) is no error."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str]) -> int:
    parent, sep, *cmd = argv
    if sep != "--" or not cmd:
        sys.stderr.write("usage: python -m ckptflow.guard PARENT_PID -- COMMAND...\n")
        return 2
    # The group's SIGTERM / SIGINT is for the command; the guard outlives it to report its code.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _subreaper()
    child = subprocess.Popen(cmd, preexec_fn=_default_signals)
    while True:
        try:
            rc = child.wait(POLL_SECONDS)
        except subprocess.TimeoutExpired:
            _reap(child.pid)
            if os.getppid() != int(parent):
                _orphaned()
            continue
        _stop_descendants(grace=1.0)       # whatever the command left behind
        return _exit_like(rc)


def _default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: a descendant whose parent dies is re-parented to the guard, not to
    init, so that it stays findable. torchrun starts each rank in a session of its own: a kill
    of the guard's group alone would miss them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _orphaned() -> None:
    """The parent is gone: stop the group and every descendant, the guard last."""
    _signal(os.getpgrp(), signal.SIGTERM, group=True)
    _stop_descendants(GRACE_SECONDS)
    os.killpg(0, signal.SIGKILL)


def _stop_descendants(grace: float) -> None:
    """SIGTERM every live descendant, SIGKILL those left after `grace` seconds; reap them."""
    for pid in _descendants():
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _descendants() and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)
    for pid in _descendants():
        _signal(pid, signal.SIGKILL)
    _reap()


def _procs() -> dict:
    """pid -> (ppid, state) of every process (Linux /proc)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[int(name)] = (int(fields[1]), fields[0])
    return out


def _descendants(live: bool = True) -> list[int]:
    procs, found, frontier = _procs(), [], [os.getpid()]
    while frontier:
        kids = [pid for pid, (ppid, _) in procs.items() if ppid in frontier]
        found += kids
        frontier = kids
    return [pid for pid in found if not live or procs[pid][1] != "Z"]


def _reap(keep: int | None = None) -> None:
    """Collect exited descendants re-parented to us (never `keep`: Popen waits for that one)."""
    for pid, (ppid, state) in _procs().items():
        if ppid == os.getpid() and state == "Z" and pid != keep:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_like(rc: int) -> int:
    """The guard's own exit status is the command's: killed by the same signal, or its code."""
    if rc < 0:
        signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
        time.sleep(1.0)          # a signal whose default is not to terminate: fall back to a code
        return 128 - rc
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
