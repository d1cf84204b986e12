"""The README's Prefect promises, word for word, on a real `prefect server start` on loopback
(issue 18): Ctrl-C of `ckptflow run` leaves a truthful summary and run.json, the README's
`prefect flow-run retry` resumes it, and `ckptflow serve` after `prefect deploy --all` runs the
export deployment, whose `--watch` says where the export went. Slow: one server (~20-60 s to
start here) and whole flow runs; every process is stopped by its PID."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptflow import manifest
from tests.browser import harness

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with harness.prefect_server(tmp_path_factory.mktemp("readme-prefect")) as s:
        yield s


def _prefect(server, *args, timeout=300) -> subprocess.CompletedProcess:
    # COLUMNS: rich would wrap a long path at 80 columns
    r = subprocess.run([*PREFECT, *args], env=server.client_env(COLUMNS="500"), cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _committed_steps(run: Path) -> list[str]:
    train = run / "train"
    return sorted(p.name for p in train.glob("step-*") if (p / "ckptflow.json").is_file()) if train.is_dir() else []


def test_ctrl_c_of_ckptflow_run_then_the_readme_retry_resumes(server, tmp_path):
    run = tmp_path / "runs" / "demo"
    cmd = [sys.executable, "-m", "ckptflow.cli", "run", "deployments/configs/demo.yaml", f"storage={tmp_path / 'runs'}",
           "train.steps=40", "checkpoint.every_steps=2", "checkpoint.keep_last=3", "train.batch_size=4",
           "train.seq_len=32", "data.eval_batches=1", "eval.max_new_tokens=4"]
    log = open(tmp_path / "run.log", "wb")
    # Its own process group, as a shell's foreground job: Ctrl-C is SIGINT to that group.
    proc = subprocess.Popen(cmd, env=server.client_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(_committed_steps(run)) < 2:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no two committed steps in 300 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
    finally:
        harness.stop_process_group(proc)
        log.close()
    out = (tmp_path / "run.log").read_text()
    assert proc.returncode != 0, out[-3000:]
    steps = _committed_steps(run)
    assert steps and steps[-1] != "step-000040", steps

    # What the README says a run leaves: run.json, summary.md, loss.png, truthful after Ctrl-C.
    record = json.loads((run / "run.json").read_text())
    train = next(s for s in record["stages"] if s["name"] == "train")
    assert train["state"] == "Cancelled" and train["finished"], train
    assert [f"step-{c['step']:06d}" for c in record["checkpoints"]] == steps
    summary = (run / "summary.md").read_text()
    assert "No checkpoint committed yet." not in summary
    assert re.search(r"\|\s*train\s*\|\s*Cancelled", summary), summary
    for name in steps:
        assert f"{run}/train/{name}" in summary, name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The README's resume, from the repository root: the same flow run, its newest step.
    retry = _prefect(server, "flow-run", "retry", "demo", "--entrypoint", "flows/finetune.py:finetune", timeout=600)
    said = retry.stdout + retry.stderr
    assert f"resumed from {run}/train/{steps[-1]}" in said, said[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert {s["name"]: s["state"] for s in record["stages"]}["train"] == "Completed"
    assert _committed_steps(run)[-1] == "step-000040"
    assert len(record["flow_runs"]) == 2 and len(set(record["flow_runs"])) == 1   # the same flow run, retried
    assert manifest.verify(str(run / "export")) == []


def test_serve_after_deploy_runs_the_export_and_watch_says_where_it_went(server, tiny_lora_run, tmp_path):
    # The README's second way first, then its first way on the same server.
    _prefect(server, "work-pool", "create", "ckptflow-local", "--type", "process")
    _prefect(server, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")
    serve = subprocess.Popen([sys.executable, "-m", "ckptflow.cli", "serve"], env=server.client_env(), cwd=REPO,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "being served" not in log_path.read_text(errors="replace"):
            assert serve.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        params = {"params": {"source": tiny_lora_run, "step": 12, "format": "hf", "dtype": "bfloat16"}}
        watched = _prefect(server, "deployment", "run", "export/export", "--watch", "--params", json.dumps(params),
                           timeout=400)
    finally:
        harness.stop_process_group(serve)
        log.close()
    dst = f"{tiny_lora_run}/exports/hf-step-000012-bfloat16"
    assert "finished successfully in 'Completed'" in watched.stdout, watched.stdout[-3000:]
    assert f"ckptflow.export.written * {dst}" in watched.stdout, watched.stdout[-3000:]
    m = manifest.require(dst)
    assert (m.format, m.step, m.dtype) == ("hf", 12, "bfloat16")
    assert "storage at None" not in log_path.read_text()
