"""Training in several processes: the one torchrun launcher, which owns its process group.

    train: {nproc_per_node: 2}     # `ckptflow train`, the train task: stages.train.run -> torchrun()

torchrun starts under ckptflow.guard in a new session: its workers share the guard's process
group, and the guard stops the group if this process dies, even by SIGKILL. A `finally` kills
the group whatever ended the wait (an error, a KeyboardInterrupt, a task timeout). Nobody kills
what a Prefect task started when its flow run is cancelled or crashes (docs/design.md), so the
finetune flow's on_cancellation / on_crashed hooks (tasks.launch.kill_hook) call kill_all() for
every group still registered here, as a backstop for a flow process that is being torn down.
Each rank runs ckptflow.distributed (its `main`).

Several nodes (train.nnodes: N, train.rdzv_endpoint: HOST:PORT): `ckptflow train CONFIG
--node-rank R` on each machine runs torchrun with the c10d rendezvous (--nnodes N --node-rank R
--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id RUN_ID) instead of --standalone. Node 0
hosts the rendezvous store (is_host=1: HOST may be a Service in front of it, not its host name);
the others only connect, waiting up to RDZV_TIMEOUT for it (node 0 may first be downloading and
converting the base, which its ranks then hand to the other nodes' ranks). torchrun numbers the
processes in the order the rendezvous sorts the nodes, not by --node-rank, so every rank is told
its node's rank (NODE_RANK_ENV) and the rank with node rank 0 and local rank 0 commits
(ckptflow.distributed): it is the one whose launcher holds the run's writer lease. Each node
announces its address on the route to HOST (route_to), not its host name, unless PET_LOCAL_ADDR
(torchrun's --local-addr) says otherwise.
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
NODE_RANK_ENV = "CKPTFLOW_NODE_RANK"   # the --node-rank of the launcher that started a rank
RDZV_TIMEOUT = 3600   # s: nodes wait this long for each other (node 0 may be downloading the base)
_PROCS: dict = {}   # process group id -> Popen of the launches alive in this process


def torchrun(cfg, base_uri: str, *, stop_after: int | None = None, on_metrics=None,
             poll_seconds: float = 2.0, node_rank: int = 0) -> Manifest:
    """Train in cfg.train.nproc_per_node processes (on each of cfg.train.nnodes machines, this
    one being `node_rank`) and wait; every new metrics row goes to on_metrics(row) while they
    run. Returns the newest step checkpoint."""
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
    nproc, tc = cfg.train.nproc_per_node, cfg.train
    cmd = torchrun_command(nproc, path, base_uri, stop_after or 0, nnodes=tc.nnodes, node_rank=node_rank,
                           endpoint=tc.rdzv_endpoint, run_id=cfg.run_id)
    try:
        code = run(cmd, poll=poll, poll_seconds=poll_seconds, env={**os.environ, NODE_RANK_ENV: str(node_rank)})
    finally:
        os.unlink(path)
    if code != 0:
        where = f" on node {node_rank} of {tc.nnodes}" if tc.nnodes > 1 else ""
        raise RuntimeError(f"torchrun with {nproc} processes{where} exited with status {code}; "
                           "a retry resumes from the newest step")
    until = min(stop_after or cfg.train.steps, cfg.train.steps)
    m = checkpointer.latest(train_uri, verify=False)
    if m is None or m.step < until:
        raise CkptError(f"{train_uri}: torchrun finished without a checkpoint at step {until}")
    return m


def torchrun_command(nproc: int, config_json: str, base_uri: str, stop_after: int = 0, *, nnodes: int = 1,
                     node_rank: int = 0, endpoint: str | None = None, run_id: str = "ckptflow") -> list[str]:
    """The ranks torchrun starts: ckptflow.distributed's main CONFIG.json BASE STOP_AFTER."""
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous_args(nnodes, node_rank, endpoint, run_id),
            f"--nproc_per_node={nproc}", "-m", "ckptflow.distributed", config_json, base_uri, str(stop_after)]


def rendezvous_args(nnodes: int, node_rank: int, endpoint: str | None, run_id: str) -> list[str]:
    """--standalone on one node; the c10d rendezvous at `endpoint`, hosted by node 0, on several."""
    if nnodes == 1:
        return ["--standalone"]
    addr = [] if "PET_LOCAL_ADDR" in os.environ else [f"--local-addr={a}" for a in [route_to(endpoint)] if a]
    return [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={run_id}", f"--rdzv-conf=is_host={int(node_rank == 0)},join_timeout={RDZV_TIMEOUT},"
            f"read_timeout={RDZV_TIMEOUT}", "--max-restarts=0", *addr]


def route_to(endpoint: str) -> str | None:
    """This machine's address on the route to `endpoint` (HOST:PORT), which the other nodes reach
    too: torchrun otherwise announces its host name, which pods and many clusters cannot resolve.
    None when HOST does not resolve (torchrun then uses the host name). PET_LOCAL_ADDR overrides."""
    import socket

    host, _, port = endpoint.rpartition(":")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host.strip("[]"), int(port)))    # UDP: picks the route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return None


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
