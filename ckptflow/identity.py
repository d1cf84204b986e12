"""Who a process is, as a lease names its writer, and whether a process so named is gone.

    holder = identity.current()      # {"host", "boot", "pid", "pid_start"} of this process
    identity.gone(holder)            # True or False on this host; None on another (ask its heartbeat)

A pid alone names no process: pids are reused. So a writer is named by its host, the host's boot
id (/proc/sys/kernel/random/boot_id) and its pid with that pid's start time (/proc/PID/stat
field 22, clock ticks after boot). On the same host and boot that is exact: a dead pid, a zombie,
or a pid now held by a process that started at another time is the writer gone. Another host
can tell nothing of it; ckptflow/lease.py then goes by the lease's heartbeat.
"""
from __future__ import annotations

import os
import socket


def stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state at index 0, ppid 1, starttime 19); None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def current() -> dict:
    """This process as a lease names it: host, boot, pid and the pid's start time (against reuse)."""
    st = stat(os.getpid())
    return {"host": socket.gethostname(), "boot": boot_id(), "pid": os.getpid(),
            "pid_start": int(st[19]) if st else None}


def on_this_host(holder: dict) -> bool:
    return holder.get("host") == socket.gethostname()


def is_current(holder: dict) -> bool:
    """`holder` names this very process."""
    return (on_this_host(holder) and holder.get("pid") == os.getpid()
            and holder.get("pid_start") == current()["pid_start"])


def gone(holder: dict) -> bool | None:
    """Whether the process `holder` names is provably gone: on this host, True after a reboot or
    when its pid is dead, a zombie or reused, else False; None when this host cannot tell."""
    if not on_this_host(holder):
        return None
    if holder.get("boot") and holder.get("boot") != boot_id():
        return True                   # this host rebooted since
    if isinstance(holder.get("pid"), int):
        return pid_gone(holder["pid"], holder.get("pid_start"))
    return None


def pid_gone(pid: int, start) -> bool:
    """True when process `pid` (started at `start`, clock ticks after boot) no longer exists."""
    st = stat(pid)
    if st is None and os.path.isdir("/proc/self"):
        return True                   # Linux: no /proc/PID, no process
    if st is None:                    # no /proc: existence is all the kernel tells
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    if st[0] in ("Z", "X"):           # a zombie writes nothing more
        return True
    return start is not None and int(st[19]) != int(start)


def ancestor_pids() -> set[int]:
    """The pids of this process's parent, its parent, ... up to (not including) init."""
    out, pid = set(), os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        st = stat(pid)
        pid = int(st[1]) if st else 0
    return out
