"""Training in several processes: torchrun in its own process session, killed as a group.

Prefect does not kill what a task started: a cancelled or crashed flow run, or a task timeout,
leaves the children running (shared/reference/prefect.md, section 6). So torchrun starts under
ckptflow.guard in a new session (its workers share the guard's process group, and the guard
stops the group if this process dies, even by SIGKILL), a `finally` kills the group whatever
ended the wait, and the finetune flow's on_cancellation / on_crashed hooks
(`kill_hook`) kill every group still registered here, as a backstop for a flow process that is
being torn down.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from ckptflow import guard

log = logging.getLogger(__name__)

GRACE_SECONDS = 10.0
_PROCS: dict = {}   # process group id -> Popen of the launches alive in this process


def torchrun_command(nproc: int, config_json: str, base_uri: str, stop_after: int = 0) -> list[str]:
    """The ranks ckptflow.distributed.launch starts (its main: CONFIG.json BASE STOP_AFTER)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "ckptflow.distributed", config_json, base_uri, str(stop_after)]


def run(cmd: list[str], *, poll, poll_seconds: float = 2.0, env: dict | None = None) -> int:
    """Run `cmd` in its own session; call poll() every poll_seconds while it runs (progress);
    kill its whole process group on any way out. Returns the exit code."""
    # Under a guard in its own session: a SIGKILL of this process still stops the group.
    proc = guard.popen(cmd, env=env, stdin=subprocess.DEVNULL)
    _PROCS[proc.pid] = proc
    try:
        while proc.poll() is None:
            time.sleep(poll_seconds)
            poll()
        poll()
        return proc.returncode
    finally:
        kill_group(proc.pid)
        _PROCS.pop(proc.pid, None)


def kill_group(pgid: int, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the group, then SIGKILL what is left after `grace` seconds."""
    if not _alive(pgid):
        return
    log.warning("stopping process group %d", pgid)
    _signal(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(pgid, signal.SIGKILL)
    if pgid in _PROCS:
        _PROCS[pgid].wait()


def kill_all() -> None:
    for pgid in list(_PROCS):
        kill_group(pgid)


def kill_hook(flow, flow_run, state) -> None:
    """A flow on_cancellation / on_crashed hook."""
    kill_all()


def _alive(pgid: int) -> bool:
    proc = _PROCS.get(pgid)
    if proc is not None:
        proc.poll()   # reap the leader once it exits, or it counts as alive (a zombie)
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
