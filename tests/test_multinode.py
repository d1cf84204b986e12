"""Several nodes, rehearsed on loopback: two `ckptflow train --node-rank R` processes (one rank
each, gloo) meet at a c10d rendezvous on 127.0.0.1, write one DCP step together, and the run
then resumes in one process. The cheap tests check the launcher's command, the config keys and
the node-rank checks without starting torchrun."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

from ckptflow import config, lease, manifest, storage
from ckptflow.checkpointer import read_tensors
from ckptflow.errors import CkptError
from ckptflow.launch import rendezvous_args, torchrun_command
from ckptflow.stages import train as stage
from tests import tinyrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = "seed://llama?dim=64&n_layers=2"
DEMO = os.path.join(ROOT, "deployments", "data", "demo.jsonl")


def run_dict(storage_dir, run_id: str, **train) -> dict:
    return {"run_id": run_id, "storage": str(storage_dir), "model": {"source": SEED}, "data": {"train": DEMO},
            "train": {"method": "full", "steps": 4, "batch_size": 2, "seq_len": 48, "lr": 1e-3, "threads": 1,
                      "device": "cpu", **train},
            "checkpoint": {"every_steps": 2, "keep_last": None}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- cheap: the command, the config, the node ranks ------------------------------------------------

def test_one_node_is_standalone_several_use_c10d_hosted_by_node_0(monkeypatch):
    monkeypatch.setenv("PET_LOCAL_ADDR", "10.0.0.7")      # the user's (torchrun's own variable) wins
    assert rendezvous_args(1, 0, None, "r") == ["--standalone"]
    args = rendezvous_args(2, 1, "trainer-0:29400", "my-run")
    assert args[:5] == ["--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=trainer-0:29400",
                        "--rdzv-id=my-run"]
    conf = "join_timeout=3600,read_timeout=3600"      # node 0 may be downloading the base meanwhile
    assert f"--rdzv-conf=is_host=0,{conf}" in args
    assert f"--rdzv-conf=is_host=1,{conf}" in rendezvous_args(2, 0, "h:1", "r")
    assert not [a for a in args if a.startswith("--local-addr")]
    monkeypatch.delenv("PET_LOCAL_ADDR")
    assert rendezvous_args(2, 0, "127.0.0.1:29400", "r")[-1] == "--local-addr=127.0.0.1"   # the route to node 0
    cmd = torchrun_command(1, "/tmp/c.json", "/base", 0, nnodes=2, node_rank=0, endpoint="127.0.0.1:1", run_id="r")
    assert "--standalone" not in cmd and cmd[-4:] == ["ckptflow.distributed", "/tmp/c.json", "/base", "0"]


@pytest.mark.parametrize("train, problem", [
    ({"nnodes": 2}, "needs train.rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "trainer-0"}, "train.rdzv_endpoint: Value error, expected HOST:PORT"),
    ({"nnodes": 2, "rdzv_endpoint": "trainer-0:0"}, "expected HOST:PORT"),
    ({"nnodes": 0, "rdzv_endpoint": "h:1"}, "train.nnodes"),
    ({"nodes": 2}, "unknown key 'train.nodes' (did you mean 'nnodes'?)"),
])
def test_bad_several_node_config_is_one_line(tmp_path, train, problem):
    with pytest.raises(CkptError, match=re.escape(problem)):
        config.validate(run_dict(tmp_path, "r", **train))


def test_node_rank_out_of_range_exits_2_and_writes_nothing(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(tmp_path / "store", "r", nnodes=2, rdzv_endpoint="127.0.0.1:1")))
    for rank, nodes in ((2, ""), (1, "train.nnodes=1")):
        p = subprocess.run([sys.executable, "-m", "ckptflow.cli", "train", str(cfg), *([nodes] if nodes else []),
                            "--node-rank", str(rank)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert f"--node-rank {rank}: the run config has train.nnodes:" in p.stderr
    assert not (tmp_path / "store").exists()


def test_a_node_above_0_takes_no_lease(tmp_path, monkeypatch):
    """Node 0's launcher (another process) holds the run's lease; node 1 must not ask for it (it
    would be refused as a second writer): it starts torchrun at once, its ranks wait at the
    rendezvous. A second node 0 is refused as a second writer."""
    from ckptflow import launch
    from tests import procs

    cfg = config.validate(run_dict(tmp_path, "r", nnodes=2, rdzv_endpoint="127.0.0.1:1"))
    run = config.run_dir(cfg)
    started = []
    monkeypatch.setattr(launch, "torchrun", lambda c, base, **kw: started.append((base, kw)) or "trained")
    ctx = procs.context()
    go, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
    node0 = procs.start(procs.lease_writer, run, "node 0's launcher", {}, go, release, results)
    try:
        assert results.get(timeout=60)[0] == "ready"
        go.set()
        assert results.get(timeout=60)[:2] == ("won", "node 0's launcher")
        assert stage.run(cfg, node_rank=1) == "trained"     # no "another process is writing this run"
        with pytest.raises(CkptError, match="another process is writing this run: node 0's launcher"):
            stage.run(cfg, node_rank=0)
    finally:
        release.set()
        node0.join(30)
    assert started == [(storage.join(run, "base"), {"stop_after": None, "on_metrics": None, "node_rank": 1})]


# ---- the rehearsal: two nodes on loopback, then one process ------------------------------------

def _train(cfg_path, *args, node_rank: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "CKPTFLOW_LOG": "INFO"}
    return subprocess.Popen([sys.executable, "-m", "ckptflow.cli", "train", str(cfg_path), *args,
                             "--node-rank", str(node_rank)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout: float = 600) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-4000:]
        outs.append(out)
    return outs


def _wait_for_torchrun(node_rank: int, timeout: float = 120) -> None:
    """Until this test's torchrun for `node_rank` runs (its rendezvous process then has the lower pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if b"torch.distributed.run" in cmd and f"--node-rank={node_rank}".encode() in cmd:
                return
        time.sleep(0.1)
    raise AssertionError(f"no torchrun for node rank {node_rank} after {timeout}s")


def _committer(out: str) -> int | None:
    found = re.search(r"rank (\d+) of 2 commits the steps", out)
    return int(found.group(1)) if found else None


@pytest.mark.slow
def test_two_nodes_on_loopback_then_one_process_resumes(tmp_path):
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(run_dict(tmp_path, "nodes", nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}")))
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(run_dict(tmp_path, "node", nproc_per_node=2)))
    for path in (two, one):             # the bases first, so that both timings are of the training only
        stage.prepare_base(config.load_config(str(path)))

    # Node 1 starts first: the rendezvous sorts nodes by host and pid, so global rank 0 goes to
    # node 1, and the rank that commits (under node 0's lease) must be node 0's, global rank 1.
    t0 = time.perf_counter()
    node1 = _train(two, node_rank=1)
    _wait_for_torchrun(1)
    node0 = _train(two, node_rank=0)
    out1, out0 = _finish([node1, node0])
    two_nodes_s = time.perf_counter() - t0
    assert _committer(out0) == 1 and _committer(out1) is None, out0[-3000:]

    # The same 4 steps on one node with 2 processes (torchrun --standalone), timed the same way.
    t0 = time.perf_counter()
    _finish([_train(one)])
    one_node_s = time.perf_counter() - t0
    print(f"\n2 nodes x 1 process: {two_nodes_s:.1f}s; 1 node x 2 processes: {one_node_s:.1f}s (4 steps each)")

    train = storage.join(str(tmp_path), "nodes", "train")
    m = manifest.require(storage.join(train, "step-000004"))
    assert m.format == "dcp" and m.step == 4 and m.extra["world_size"] == 2
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.json"} <= set(m.files)
    assert manifest.verify(m.uri) == [] and manifest.verify(storage.join(train, "step-000002")) == []
    assert lease.read(storage.join(str(tmp_path), "nodes")) is None          # node 0 let go of the run
    rows = [json.loads(line) for line in open(os.path.join(train, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    # Two nodes of one process each do the same sums as one node of two processes: bit for bit.
    ref = manifest.require(storage.join(str(tmp_path), "node", "train", "step-000004"))
    like = read_tensors(storage.join(str(tmp_path), "node", "base"), "model.safetensors")
    tinyrun.assert_same_dcp_steps(m.uri, ref.uri, like)
    for r, w in zip(rows, [json.loads(line) for line in open(os.path.join(ref.uri, "..", "metrics.jsonl"))]):
        assert r["loss"] == w["loss"]

    # One process resumes the two-node run from its DCP step (resharded) and goes on to step 6.
    m6 = stage.run(config.validate(run_dict(tmp_path, "nodes", steps=6)))
    assert m6.step == 6 and m6.format == "tune" and manifest.verify(m6.uri) == []
    steps = {k: float(v) for k, v in read_tensors(m6.uri, "optimizer.safetensors").items() if k.endswith(".step")}
    assert steps and set(steps.values()) == {6.0}          # AdamW's count went on from the DCP state: 4 + 2
    state = json.loads(storage.read_text(storage.join(m6.uri, "trainer_state.json")))
    saved = json.loads(storage.read_text(storage.join(m.uri, "trainer_state.json")))
    assert state["step"] == 6 and state["data"]["index"] == saved["data"]["index"] + 2 * 2


def test_the_readme_multi_node_section_fits_together():
    """The README's several-node config validates; its Service selects the labels that the GPU
    pool's job template now puts on node 0's pod; the other nodes' Job runs --node-rank 1 .. N-1."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("### Several nodes", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    cfg = yaml.safe_load(blocks[0])
    cfg.update(model={"source": SEED}, data={"train": DEMO})
    train = config.validate(cfg).train
    assert (train.nnodes, train.rdzv_endpoint) == (2, "node0.cluster:29400")
    deployment = yaml.safe_load(blocks[1])[0]
    service, job = yaml.safe_load_all(blocks[2])
    assert service["spec"]["selector"].items() <= deployment["work_pool"]["job_variables"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 29400
    command = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "ckptflow train /config/big-run.yaml --node-rank $((JOB_COMPLETION_INDEX + 1))" in command
    template = json.loads(open(os.path.join(ROOT, "deployments", "k8s-gpu-job-template.json")).read())
    assert template["job_configuration"]["job_manifest"]["spec"]["template"]["metadata"]["labels"] == "{{ labels }}"


def test_the_train_task_keys_node_0_like_a_one_node_run_and_other_nodes_apart(tmp_path):
    import inspect

    from tasks.train import _train_params, train

    assert inspect.signature(train.fn).parameters["node_rank"].default == 0
    cfg = config.validate(run_dict(tmp_path, "r", nnodes=2, rdzv_endpoint="127.0.0.1:1"))
    one = _train_params({"config": cfg, "base_uri": "b"})
    assert _train_params({"config": cfg, "base_uri": "b", "node_rank": 0}) == one
    assert _train_params({"config": cfg, "base_uri": "b", "node_rank": 1}) == {**one, "node_rank": 1}
