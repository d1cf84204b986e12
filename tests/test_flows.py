"""The flows on a Prefect test server (one per session, `prefect_api` in conftest): a failed run
started again skips its finished stages; a run killed mid-training resumes from its newest step
to the same weights as an uninterrupted run; artifacts; export-only runs; the gpu limit."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ckptflow import manifest, storage
from ckptflow.config import load_config
from ckptflow.errors import CkptError
from tests import tinyrun

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # One storage for the module: the runs share the pinned seed base under .cache/base/.
    return tmp_path_factory.mktemp("flows") / "runs"


def tiny(runs: Path, run_id: str) -> Path:
    path = runs.parent / f"{run_id}.yaml"
    tinyrun.flow_yaml(path, run_id, runs, steps=6)
    return path


def commits(*dirs: str) -> dict:
    """ckptflow.json of each directory: its bytes and mtime, to prove nothing rewrote it."""
    out = {}
    for d in dirs:
        p = Path(d) / manifest.NAME
        out[d] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def task_states(flow_run_id) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def run_json(run_uri: str) -> dict:
    return json.loads((Path(run_uri) / "run.json").read_text())


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_failed_export_started_again_skips_every_finished_stage(prefect_api, runs, monkeypatch):
    from ckptflow.stages import export as export_stage
    from flows.finetune import base_dirs, finetune

    cfg = load_config(str(tiny(runs, "export-fails")))
    real, calls = export_stage.run, []

    def fails_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise CkptError("injected: the export stage fails once")
        return real(*args, **kwargs)

    monkeypatch.setattr(export_stage, "run", fails_once)
    first = finetune(cfg, return_state=True)
    assert first.is_failed()
    run_uri, base = str(runs / "export-fails"), base_dirs(cfg)
    rec = run_json(run_uri)
    states = {s["name"]: s["state"] for s in rec["stages"]}
    assert states["train"] == "Completed" and states["export"] == "Failed" and "evaluate" not in states
    finished = [base["source"], base["tune"], *(f"{run_uri}/train/step-{s:06d}" for s in (2, 4, 6)),
                f"{run_uri}/merged"]
    before = commits(*finished)

    # `prefect flow-run retry` runs the same failed flow run again, here without the injection.
    retry = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "retry", str(first.state_details.flow_run_id),
                            "--entrypoint", "flows/finetune.py:finetune"], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PREFECT_API_URL": prefect_api}, timeout=300)
    assert retry.returncode == 0, retry.stdout[-2000:] + retry.stderr[-3000:]
    assert commits(*finished) == before          # nothing finished was written again
    ran = task_states(first.state_details.flow_run_id)
    assert {k: ran[k] for k in ("download", "convert", "train", "merge")} == dict.fromkeys(
        ("download", "convert", "train", "merge"), "Cached")
    assert ran["export"] == "Completed" and ran["evaluate"] == "Completed"
    rec = run_json(run_uri)
    assert [s["name"] for s in rec["stages"]] == ["download", "detect", "convert", "train", "merge", "export",
                                                  "evaluate"]
    assert {s["name"]: s["state"] for s in rec["stages"]}["train"] == "Cached"
    assert all(s["seconds"] is not None and s["output"] for s in rec["stages"])
    assert manifest.read(f"{run_uri}/export").format == "hf" and len(calls) == 1

    # A new flow run of the same config: every stage is skipped.
    second = finetune(cfg, return_state=True)
    assert second.is_completed(), second.message
    ran = task_states(second.state_details.flow_run_id)
    assert ran.pop("detect") == "Completed"     # read-only, never cached
    assert set(ran.values()) == {"Cached"} and len(ran) == 6
    assert commits(*finished) == before and len(calls) == 1    # the export stage was not even called

    # A cached stage whose output was deleted since runs again; the others stay cached.
    storage.remove(f"{run_uri}/export")
    third = finetune(cfg, return_state=True)
    assert third.is_completed()
    ran = task_states(third.state_details.flow_run_id)
    assert ran["export"] == "Completed" and ran["merge"] == "Cached" and ran["evaluate"] == "Cached"
    assert manifest.verify(f"{run_uri}/export") == []


KILLER = textwrap.dedent("""
    import os, signal, sys
    from ckptflow import manifest

    real_write = manifest.write

    def write(uri, m):          # SIGKILL right after step K is committed: a preempted node
        out = real_write(uri, m)
        if m.kind == "train_state" and m.step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    manifest.write = write
    from ckptflow.config import load_config
    from flows.finetune import finetune
    finetune(load_config(sys.argv[1]))
""")


@pytest.fixture(scope="module")
def finished(prefect_api, runs):
    """One uninterrupted tiny run that several tests look at: its final state."""
    from flows.finetune import finetune

    state = finetune(load_config(str(tiny(runs, "Straight_1"))), return_state=True)
    assert state.is_completed(), state.message
    return state


def test_training_killed_mid_run_resumes_to_the_same_weights(prefect_api, runs, finished, tmp_path):
    from flows.finetune import finetune

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    config = tiny(runs, "killed")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.run([sys.executable, str(killer), str(config), "4"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run_uri = str(runs / "killed")
    assert manifest.read(f"{run_uri}/train/step-000004") is not None
    assert not Path(f"{run_uri}/train/step-000006").exists()
    kept = commits(f"{run_uri}/train/step-000002", f"{run_uri}/train/step-000004")

    again = finetune(load_config(str(config)), return_state=True)
    assert again.is_completed(), again.message
    ran = task_states(again.state_details.flow_run_id)
    assert ran["train"] == "Completed" and ran["download"] == "Cached" and ran["convert"] == "Cached"
    assert commits(*kept) == kept                # resumed from step 4, not trained again
    # CPU training is deterministic: resuming gives the uninterrupted run's weights, bit for bit.
    for rel in ("train/step-000006/model.safetensors", "merged/model.safetensors", "export/model.safetensors"):
        assert sha(f"{run_uri}/{rel}") == sha(runs / "Straight_1" / rel), rel


def artifacts(prefect_api: str, flow_run_id) -> dict:
    """The newest artifact of each key that the flow run created: {key: artifact JSON}."""
    import httpx

    body = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "sort": "CREATED_DESC", "limit": 200}
    found = httpx.post(prefect_api + "/artifacts/filter", json=body, timeout=30).raise_for_status().json()
    latest = {}
    for a in found:
        latest.setdefault(a["key"], a)
    return latest


def test_a_run_publishes_summary_metrics_and_progress(prefect_api, runs, finished):
    # Keys: the run id lowercased, anything but letters and digits a dash (Prefect's rule).
    latest = artifacts(prefect_api, finished.state_details.flow_run_id)
    assert set(latest) == {"straight-1-summary", "straight-1-metrics", "straight-1-progress"}
    summary = latest["straight-1-summary"]["data"]
    assert "## Stages" in summary and "| evaluate | Completed |" in summary
    assert "![loss curve](data:image/png;base64," in summary and "| perplexity |" in summary
    rows = json.loads(latest["straight-1-metrics"]["data"])
    assert [r["step"] for r in rows if r["loss"] is not None] == [1, 2, 3, 4, 5, 6]
    assert latest["straight-1-progress"]["data"] == 100.0
    run_uri = runs / "Straight_1"
    assert (run_uri / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert (run_uri / "summary.md").read_text() == summary


def test_export_only_flow_exports_a_chosen_step_of_a_run(prefect_api, runs, finished):
    from flows.export import export
    from flows.params import ExportParams

    run_uri = runs / "Straight_1"
    out = export(ExportParams(source=str(run_uri), step=4, format="hf", dtype="bfloat16"))
    assert out["uri"] == str(run_uri / "exports" / "hf-step-000004-bfloat16")
    m = manifest.require(out["uri"])
    assert (m.format, m.step, m.dtype) == ("hf", 4, "bfloat16") and manifest.verify(out["uri"]) == []
    again = export(ExportParams(source=str(run_uri), step=4, format="hf", dtype="bfloat16"), return_state=True)
    assert task_states(again.state_details.flow_run_id) == {"export": "Cached"}


def test_export_params_are_a_typed_form(prefect_api):
    from prefect.utilities.callables import parameter_schema

    from flows.export import export

    schema = parameter_schema(export).model_dump()
    params = schema["definitions"]["ExportParams"]["properties"]
    assert params["format"]["enum"] == ["original", "hf", "meta", "peft", "tune", "gguf"]
    assert params["dtype"]["enum"] == ["keep", "bfloat16", "float16", "float32", "q8_0"]
    assert all(p.get("description") for p in params.values())


def test_gpu_slot_is_held_only_when_the_limit_exists(prefect_api):
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tasks.train import gpu_slot

    with gpu_slot():       # no limit named gpu: runs unthrottled, no warning-only lookup
        pass
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu", limit=1))
        try:
            with gpu_slot():
                assert client.read_global_concurrency_limit_by_name("gpu").active_slots == 1
            assert client.read_global_concurrency_limit_by_name("gpu").active_slots == 0
        finally:
            client.delete_global_concurrency_limit_by_name("gpu")


HOLDER = textwrap.dedent("""
    import sys
    from ckptflow import launch
    from tasks.launch import kill_hook
    from prefect import flow, task

    @task
    def hold(pidfile: str) -> None:     # a stand-in for torchrun: a launcher with a worker child
        launch.run(["sh", "-c", f"sleep 120 & echo $! > {pidfile}; wait"], poll=lambda: None, poll_seconds=0.2)

    @flow(on_cancellation=[kill_hook], on_crashed=[kill_hook])
    def holder(pidfile: str) -> None:
        hold(pidfile)

    holder(sys.argv[1])
""")


def test_terminating_a_flow_run_kills_its_launched_process_group(prefect_api, tmp_path):
    script, pidfile = tmp_path / "holder.py", tmp_path / "child.pid"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(pidfile)], cwd=REPO, start_new_session=True,
                            env={**os.environ, "PREFECT_API_URL": prefect_api},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        child = int(pidfile.read_text())
        os.kill(proc.pid, signal.SIGTERM)        # what a worker does to a cancelled flow run
        assert proc.wait(timeout=60) != 0
        deadline = time.monotonic() + 15
        while _alive(child):
            assert time.monotonic() < deadline, "the launched worker outlived its terminated flow run"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:      # a zombie has exited; init has not reaped it yet
        return not f.read().split(") ", 1)[1].startswith("Z")


@pytest.mark.s3
def test_a_run_on_s3_keeps_its_cache_beside_it_in_a_block_without_credentials(prefect_api, s3_server, s3_bucket, tmp_path):
    import fsspec

    from flows.finetune import finetune
    from tasks.common import ResultsStorage

    storage_uri = f"{s3_bucket}/runs"
    config = tiny(tmp_path / "runs", "on-s3")
    cfg = load_config(str(config), [f"storage={storage_uri}", "train.steps=2", "data.eval=null",
                                    "storage_options=" + json.dumps(s3_server.storage_options)])
    first = finetune(cfg, return_state=True)
    assert first.is_completed(), first.message
    second = finetune(cfg, return_state=True)
    ran = task_states(second.state_details.flow_run_id)
    assert {ran[k] for k in ("download", "convert", "train", "merge", "export")} == {"Cached"}
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    results = f"{storage_uri}/.cache/prefect-results".removeprefix("s3://")
    assert any(name.rsplit("/", 1)[-1].startswith("train-") for name in fs.ls(results))
    block = ResultsStorage.load("ckptflow-results-" + hashlib.sha256(f"s3://{results}".encode()).hexdigest()[:12])
    assert block.basepath == f"s3://{results}" and block.settings == {}     # no credentials in a block
    assert fs.exists(f"{storage_uri}/on-s3/export/ckptflow.json".removeprefix("s3://"))


def test_a_dated_run_id_names_one_run_per_scheduled_day(runs):
    import datetime as dt

    from flows.finetune import dated

    cfg = load_config(str(tiny(runs, "nightly-{date}")))
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")   # outside a flow run: now
    assert dated(cfg).run_id == f"nightly-{today}"
    plain = load_config(str(tiny(runs, "demo")))
    assert dated(plain) is plain


@pytest.mark.parametrize("source, shared", [
    ("seed://llama?dim=64&n_layers=2", True),
    ("hf://Qwen/Qwen2.5-0.5B@" + "0123456789abcdef" * 2 + "01234567", True),   # a commit: never moves
    ("hf://Qwen/Qwen2.5-0.5B", False),                                          # main moves
    ("hf://Qwen/Qwen2.5-0.5B@v1.0", False),                                     # so may a tag
    ("s3://bucket/models/qwen", False),                                         # so may files
])
def test_only_a_pinned_base_is_shared_between_runs(runs, source, shared):
    from flows.finetune import base_dirs

    a = base_dirs(load_config(str(tiny(runs, "a")), [f"model.source={source}"]))
    b = base_dirs(load_config(str(tiny(runs, "b")), [f"model.source={source}"]))
    assert a["shared"] is shared and (a == b) is shared
    if shared:
        assert a["tune"].startswith(f"{runs}/.cache/base/") and a["source"].endswith("/source")
    else:
        assert a["tune"] == f"{runs}/a/base" and a["source"] == f"{runs}/a/source"
