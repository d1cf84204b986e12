"""Children that die with their parent, however the parent dies (SIGKILL included).

    proc = guard.popen(["torchrun", ...])      # or the embedded Prefect API server
    proc.pid                                   # the group to kill: os.killpg(proc.pid, SIGTERM)

`popen` starts `python -m ckptflow.guard PARENT_PID -- CMD...` in a new session; the guard
starts CMD in its own process group and waits. It exits as CMD did (the same code, or killed by
the same signal) when CMD ends; when
PARENT_PID is no longer its parent (the parent died, the guard was re-parented) it sends SIGTERM
to the whole group, then SIGKILL after GRACE_SECONDS, itself included. A SIGTERM or SIGINT to the
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
    child = subprocess.Popen(cmd, preexec_fn=_default_signals)
    while True:
        try:
            return _exit_like(child.wait(POLL_SECONDS))
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != int(parent):
            _orphaned(child)


def _default_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _orphaned(child: subprocess.Popen) -> None:
    """The parent is gone: stop the whole group, the guard last."""
    os.killpg(0, signal.SIGTERM)
    try:
        child.wait(GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and _others_in_group():
        time.sleep(0.05)
    os.killpg(0, signal.SIGKILL)


def _others_in_group() -> bool:
    """Whether a process other than this one is in this process group (Linux /proc)."""
    me, group = os.getpid(), os.getpgrp()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


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
