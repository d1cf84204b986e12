"""Training in several processes: the one torchrun launcher, which owns its process group.

    train: {nproc_per_node: 2}     # `ckptflow train`, the train task: stages.train.run -> torchrun()

torchrun starts under ckptflow.guard in a new session: its workers share the guard's process
group, and the guard stops the group if this process dies, even by SIGKILL. A `finally` kills
the group whatever ended the wait (an error, a KeyboardInterrupt, a task timeout). Nobody kills
what a Prefect task started when its flow run is cancelled or crashes (docs/design.md), so the
finetune flow's on_cancellation / on_crashed hooks (tasks.launch.kill_hook) call kill_all() for
every group still registered here, as a backstop for a flow process that is being torn down.
Each rank runs ckptflow.distributed (its `main`).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

from ckptflow import config, guard, storage
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

GRACE_SECONDS = 10.0
_PROCS: dict = {}   # process group id -> Popen of the launches alive in this process


def torchrun(cfg, base_uri: str, *, stop_after: int | None = None, on_metrics=None,
             poll_seconds: float = 2.0) -> Manifest:
    """Train in cfg.train.nproc_per_node processes and wait; every new metrics row goes to
    on_metrics(row) while they run. Returns the newest step checkpoint."""
    from ckptflow import checkpointer
    from ckptflow.trainer import read_metrics

    train_uri = storage.join(config.run_dir(cfg), "train")
    seen = [max((r.get("step", 0) for r in read_metrics(train_uri)), default=-1)]

    def poll():
        for row in read_metrics(train_uri):
            if row.get("step", 0) > seen[0]:
                seen[0] = row["step"]
                if on_metrics is not None:
                    on_metrics(row)

    fd, path = tempfile.mkstemp(prefix="ckptflow-run-", suffix=".json")   # 0600: may hold storage_options
    with os.fdopen(fd, "w") as f:
        json.dump(config.to_dict(cfg, credentials=True), f)
    nproc = cfg.train.nproc_per_node
    try:
        code = run(torchrun_command(nproc, path, base_uri, stop_after or 0), poll=poll, poll_seconds=poll_seconds)
    finally:
        os.unlink(path)
    if code != 0:
        raise RuntimeError(f"torchrun with {nproc} processes exited with status {code}; "
                           "a retry resumes from the newest step")
    until = min(stop_after or cfg.train.steps, cfg.train.steps)
    m = checkpointer.latest(train_uri, verify=False)
    if m is None or m.step < until:
        raise CkptError(f"{train_uri}: torchrun finished without a checkpoint at step {until}")
    return m


def torchrun_command(nproc: int, config_json: str, base_uri: str, stop_after: int = 0) -> list[str]:
    """The ranks torchrun starts: ckptflow.distributed's main CONFIG.json BASE STOP_AFTER."""
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
    guard.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    guard.killpg(pgid, signal.SIGKILL)
    if pgid in _PROCS:
        _PROCS[pgid].wait()


def kill_all() -> None:
    for pgid in list(_PROCS):
        kill_group(pgid)


def _alive(pgid: int) -> bool:
    proc = _PROCS.get(pgid)
    if proc is not None:
        proc.poll()   # reap the leader once it exits, or it counts as alive (a zombie)
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
