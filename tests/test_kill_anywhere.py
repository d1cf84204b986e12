"""Killed anywhere, finished later, same result.

`ckptflow run` is started again and again, each time SIGKILLed as a process group (a crash, an
OOM kill, a preempted node) at a seeded random moment of a chosen stage (watched in run.json):
download, convert, training (and its step saves), merge, export, evaluate. After each kill every
committed directory verifies and no process of the killed run is left; then the run finishes and
its export equals an uninterrupted run's, bit for bit.

Also: a guarded child (torchrun's launcher, the embedded Prefect API) dies with a SIGKILLed
parent, even one started from a thread that has ended; and a SIGKILL of `ckptflow run` alone
(not its group) leaves neither its embedded API server nor anything else running.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ckptflow import manifest
from tests import tinyrun

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "convert", "train", "merge", "export", "evaluate")
GONE_WITHIN_S = 15.0
# `ckptflow run` with a crash armed: `delay` seconds after the flow enters `stage` (or at once if
# the run gets past it first), a timer SIGKILLs the whole process group, as the OOM killer or a
# lost node would. In-process, so that a stage of 50 ms is hit as surely as one of 5 s; before the
# kill it notes where the run was and every process of the group, to be checked from outside.
KILLER = textwrap.dedent("""
    import json, os, signal, sys, threading

    config, target, delay, note, storage = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
    from flows import stage as stages

    real, where, armed = stages.Recorder.stage, ["startup"], []

    def fire():
        import psutil

        from pathlib import Path

        me = psutil.Process()
        # directories being written, or left uncommitted by an earlier kill
        uncommitted = sorted(str(p.parent) for p in Path(storage).rglob(".ckptflow-writing*"))
        with open(note, "w") as f:
            json.dump({"stage": where[0], "pids": [me.pid] + [p.pid for p in me.children(recursive=True)],
                       "uncommitted": uncommitted}, f)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    def arm(seconds):
        if not armed:
            armed.append(threading.Timer(seconds, fire))
            armed[0].daemon = True
            armed[0].start()

    def stage(self, name, task, *args, **kwargs):
        where[0] = name
        if name == target or (name in order and order.index(name) > order.index(target)):
            arm(delay if name == target else 0.0)
        try:
            return real(self, name, task, *args, **kwargs)
        finally:
            where[0] = "after " + name

    order = %r
    stages.Recorder.stage = stage
    from ckptflow.cli import main
    sys.exit(main(["run", config, "--json"]))
""" % (STAGES,))


def write_config(root: Path, storage: Path, run_id: str) -> Path:
    path = root / f"{run_id}.yaml"
    tinyrun.flow_yaml(path, run_id, storage, steps=8)
    return path


@pytest.fixture(scope="module")
def reference(prefect_api, tmp_path_factory) -> Path:
    """An uninterrupted run of the same config (its own storage, its own base): the export."""
    from ckptflow.config import load_config
    from flows.finetune import finetune

    root = tmp_path_factory.mktemp("reference")
    state = finetune(load_config(str(write_config(root, root / "runs", "straight"))), return_state=True)
    assert state.is_completed(), state.message
    return root / "runs" / "straight" / "export"


def committed_dirs(storage: Path) -> list[Path]:
    return sorted(p.parent for p in storage.rglob(manifest.NAME))


def stage_seconds(run_dir: Path) -> dict:
    """How long each stage took in a run (its run.json)."""
    return {s["name"]: s["seconds"] or 0.0 for s in json.loads((run_dir / "run.json").read_text())["stages"]}


def attempt(killer: Path, config: Path, env: dict, log: Path, target: str | None, delay: float) -> dict:
    """One `ckptflow run` (in a session of its own); with a target, killed `delay` s into it."""
    t0 = time.monotonic()
    note = log.parent / "kill.json"
    note.unlink(missing_ok=True)
    storage = config.parent / "runs"
    cmd = ([sys.executable, str(killer), str(config), target, str(delay), str(note), str(storage)] if target else
           [sys.executable, "-m", "ckptflow.cli", "run", str(config), "--json"])
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "killed": rc == -signal.SIGKILL and note.exists()}
    if out["killed"]:
        seen = json.loads(note.read_text())
        procs = []
        for pid in seen["pids"]:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        session = [f"{p.pid} {p.name()}" for p in psutil.process_iter() if _sid(p) == proc.pid]
        out.update(stage=seen["stage"], uncommitted=[Path(w).name for w in seen["uncommitted"]],
                   processes=len(seen["pids"]), left=wait_gone(procs) + session)
    return out


def wait_gone(procs: list, within: float = GONE_WITHIN_S) -> list:
    deadline = time.monotonic() + within
    while True:
        alive = [p for p in procs if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in alive]
        time.sleep(0.1)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _sid(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid) if _alive(p) else None
    except OSError:
        return None


def kill_anywhere(tmp_path: Path, prefect_api: str, reference: Path, targets: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    took = stage_seconds(reference.parent)
    storage = tmp_path / "runs"
    config = write_config(tmp_path, storage, "killed")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "home")}
    log = tmp_path / "console.log"
    kills = []
    for target in targets:
        delay = round(rng.uniform(0.0, max(took.get(target, 0.0), 0.05)), 3)
        out = attempt(killer, config, env, log, target, delay)
        assert out["killed"] or out["rc"] == 0, log.read_text(errors="replace")[-4000:]
        if not out["killed"]:
            break      # it finished before the kill: the rest of the schedule has nothing left to kill
        out.update(target=target, delay=delay)
        kills.append(out)
        assert out["left"] == [], out
        for d in committed_dirs(storage):
            assert manifest.verify(str(d)) == [], (out, str(d))
    final = attempt(killer, config, env, log, None, 0.0)
    assert final["rc"] == 0, log.read_text(errors="replace")[-4000:]
    export = storage / "killed" / "export"
    want, got = manifest.require(str(reference)), manifest.require(str(export))
    assert got.files == want.files and len(want.files) > 1       # sha256 and size of every file
    for name in want.files:
        assert (export / name).read_bytes() == (reference / name).read_bytes(), name
    assert all(manifest.verify(str(d)) == [] for d in committed_dirs(storage))
    print(json.dumps({"stage_seconds": took, "kills": kills, "final_seconds": final["seconds"]}))
    return kills


def test_killed_three_times_then_finished_equals_an_uninterrupted_run(prefect_api, reference, tmp_path):
    kills = kill_anywhere(tmp_path, prefect_api, reference, ["convert", "train", "export"], seed=13)
    assert len(kills) == 3 and len({landed(k) for k in kills}) == 3, kills


@pytest.mark.slow
def test_killed_ten_times_anywhere_then_finished_equals_an_uninterrupted_run(prefect_api, reference, tmp_path):
    targets = ["download", "convert", "train", "train", "train", "merge", "export", "export", "evaluate", "evaluate"]
    kills = kill_anywhere(tmp_path, prefect_api, reference, targets, seed=20261202)
    assert len(kills) == 10
    assert len({landed(k) for k in kills} & set(STAGES)) >= 5, kills


def landed(kill: dict) -> str:
    """The stage a kill hit ("after merge": in the flow's own work right after it)."""
    return kill["stage"].removeprefix("after ")


# ---- processes that die with their parent ----------------------------------------------------

PARENT = textwrap.dedent("""
    import sys, threading, time
    from ckptflow import launch

    def train():      # like a Prefect task in a worker thread: torchrun's launcher with a rank
        # in a session of its own, as torchrun starts them (a kill of the group misses it)
        launch.run(["sh", "-c", f"setsid sleep 120 & echo $! > {sys.argv[1]}; wait"], poll=lambda: None,
                   poll_seconds=0.2)

    threading.Thread(target=train, daemon=True).start()
    threading.Thread(target=lambda: None).start()     # a thread that ends (PR_SET_PDEATHSIG's trap)
    time.sleep(600)
""")


def test_a_launched_group_dies_with_its_sigkilled_parent(tmp_path):
    script, pidfile = tmp_path / "parent.py", tmp_path / "worker.pid"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pidfile)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        worker = psutil.Process(int(pidfile.read_text()))
        group = [p for p in psutil.Process(parent.pid).children(recursive=True)]
        assert worker in group and len(group) >= 3       # guard, sh, sleep
        assert os.getsid(worker.pid) == worker.pid != os.getsid(parent.pid)
        time.sleep(1.0)
        assert all(_alive(p) for p in group)             # nothing died with the ended thread
        parent.kill()
        parent.wait()
        assert wait_gone(group, within=10.0) == []
    finally:
        if parent.poll() is None:
            parent.kill()


def test_sigkill_of_ckptflow_run_leaves_no_embedded_server(tmp_path):
    """`ckptflow run` without PREFECT_API_URL starts its own API server (ckptflow.api_server.
    EmbeddedServer): SIGKILL the run alone, as the OOM killer would, and it is gone too."""
    config = write_config(tmp_path, tmp_path / "runs", "lonely")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_PROFILES_PATH=str(tmp_path / "profiles.toml"))
    with open(tmp_path / "console.log", "wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "ckptflow.cli", "run", str(config)], cwd=REPO, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not any("uvicorn" in " ".join(p.cmdline()) for p in psutil.Process(run.pid).children(recursive=True)):
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "console.log").read_text()
            time.sleep(0.1)
        time.sleep(1.0)     # the server is importing and migrating its database
        procs = psutil.Process(run.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(p.cmdline()) for p in procs)
        run.kill()          # this process alone, not its group
        run.wait()
        assert wait_gone(procs, within=10.0) == []
    finally:
        if run.poll() is None:
            run.kill()


@pytest.mark.slow
def test_killing_a_distributed_run_leaves_no_rank_and_no_server(tmp_path):
    """`ckptflow run` with torchrun ranks (train.nproc_per_node=2) and its embedded API, its
    process group SIGKILLed during training: the ranks (another session, under a guard) and the
    server (another session, under a guard) go too; killpg alone would not reach them."""
    config = write_config(tmp_path, tmp_path / "runs", "ranks")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_PROFILES_PATH=str(tmp_path / "profiles.toml"))
    with open(tmp_path / "console.log", "wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "ckptflow.cli", "run", str(config), "train.nproc_per_node=2",
                                "train.steps=40"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 400

        def ranks():
            return [p for p in psutil.Process(run.pid).children(recursive=True)
                    if "ckptflow.distributed" in " ".join(p.cmdline())]

        while len(ranks()) < 3:       # torchrun and its two ranks
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "console.log").read_text()[-3000:]
            time.sleep(0.2)
        procs = psutil.Process(run.pid).children(recursive=True)
        sessions = {os.getsid(p.pid) for p in procs if _alive(p)}
        assert len(sessions - {run.pid}) >= 2     # the guards (and the ranks) have sessions of their own
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        assert wait_gone(procs, within=15.0) == []
        print(f"{len(procs)} processes in {len(sessions)} sessions, all gone")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
