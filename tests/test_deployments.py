"""deployments/prefect.yaml: what it declares, and the deployments working on a real Prefect
server behind authentication (`prefect server start` with PREFECT_SERVER_API_AUTH_STRING on
loopback, clients and the worker with PREFECT_API_AUTH_STRING; a client without it is refused):
`prefect deploy`, a process worker, a demo run that hands its evaluation to the `evaluate`
deployment through the export event, and an export-only run of the `export` deployment. Every
process is stopped by its PID."""
import base64
import json
import os
import secrets
import urllib.error
import urllib.request
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ckptflow import manifest
from ckptflow.config import load_config, to_dict, validate
from tests.browser import harness

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def deployments() -> dict:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def test_the_nightly_deployment_runs_the_nightly_config():
    params = deployments()["finetune-nightly"]["parameters"]["config"]
    assert to_dict(validate(params)) == to_dict(load_config(str(REPO / "deployments/configs/nightly.yaml")))


def test_every_deployment_builds_from_prefect_yaml():
    from flows import deploy

    specs = deploy.load(str(PREFECT_YAML))
    built = {s["name"]: deploy.runner_deployment(s, str(PREFECT_YAML)) for s in specs}
    assert set(built) == {"finetune-nightly", "export", "evaluate", "convert"}
    nightly = built["finetune-nightly"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.concurrency_limit == 1 and nightly.concurrency_options.collision_strategy == "ENQUEUE"
    (trigger,) = built["evaluate"].triggers
    assert trigger.expect == {"ckptflow.export.completed"}
    assert trigger.match.model_dump() == {"prefect.resource.id": "ckptflow.export.*",
                                          "ckptflow.eval-deployment": "evaluate/evaluate"}
    assert built["export"]._parameter_openapi_schema.definitions["ExportParams"]["properties"]["format"]["enum"]


def test_a_deployment_with_an_unknown_key_is_refused(tmp_path):
    from ckptflow.errors import CkptError
    from flows import deploy

    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: x\n    entrypoint: flows/export.py:export\n    shedules: []\n")
    with pytest.raises(CkptError, match="unknown key 'shedules'"):
        deploy.load(str(bad))


def test_a_deployment_with_a_literal_credential_is_refused(tmp_path):
    from ckptflow.errors import CkptError
    from flows import deploy

    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: x\n    entrypoint: flows/export.py:export\n    parameters:\n"
                   "      params: {source: s3://b/r, storage_options: {key: AKIA1, secret: {env: S}}}\n")
    with pytest.raises(CkptError, match=r"deployment 'x': parameters\.params\.storage_options\.key is a literal"):
        deploy.load(str(bad))
    bad.write_text(bad.read_text().replace("key: AKIA1", "key: {secret: s3-key}"))
    assert deploy.load(str(bad))[0]["name"] == "x"


# ---- on a real server ------------------------------------------------------------------------

AUTH = "ckptflow-admin:" + secrets.token_hex(16)     # user:password, as the dashboard asks for it


def client_env(server, **extra):
    """A client of the authenticated server: PREFECT_API_AUTH_STRING as well as the URL."""
    return server.client_env(PREFECT_API_AUTH_STRING=AUTH, **extra)


def prefect_cli(server, *args, timeout=180, env=None):
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], env=env or client_env(server), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def request(server, path: str, body: dict | None = None, auth: str | None = AUTH):
    """GET (POST with a body) {api}{path} with Basic `auth` (what PREFECT_API_AUTH_STRING sends)."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(server.api_url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()[:1000]


def wait_for_run(server, flow_run_filter: dict, timeout: float = 240) -> dict:
    """The first flow run matching the filter once it is final; fails on a failed run."""
    deadline = time.monotonic() + timeout
    while True:
        found = api(server, "/flow_runs/filter", {"flow_runs": flow_run_filter, "limit": 5})
        final = [r for r in found if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        if final:
            assert final[0]["state_type"] == "COMPLETED", final[0]["state"]
            return final[0]
        assert time.monotonic() < deadline, f"no finished flow run for {flow_run_filter}: {found}"
        time.sleep(1)


def api(server, path: str, body: dict | None = None, attempts: int = 5):
    """An authenticated API call, again after a 503: SQLite under a loaded 2-core box answers
    "Service Unavailable" when a write waits too long for the database lock."""
    for attempt in range(attempts):
        code, out = request(server, path, body)
        if code == 200 or code == 201:
            return out
        if code != 503 or attempt + 1 == attempts:
            raise RuntimeError(f"{path}: {code} {out!r}")
        time.sleep(2 ** attempt)


def deployment_id(server, flow: str, name: str) -> str:
    return api(server, f"/deployments/name/{flow}/{name}")["id"]


def served(server, tmp_path) -> dict:
    """Start `ckptflow serve`, wait until it has registered every deployment, stop it by PID."""
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ckptflow.cli", "serve"], env=client_env(server), cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(found := api(server, "/deployments/filter", {"limit": 20})) < 4:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        harness.stop_process_group(proc)
        log.close()
    return {d["name"]: d for d in found}


def refused_without_the_auth_string(server) -> None:
    assert request(server, "/health", auth=None)[0] == 200           # probes stay open
    assert request(server, "/flow_runs/filter", {"limit": 1}, auth=None)[0] == 401
    assert request(server, "/flow_runs/filter", {"limit": 1}, auth="ckptflow-admin:wrong")[0] == 401
    assert request(server, "/flow_runs/filter", {"limit": 1})[0] == 200
    bare = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "ls"], env=server.client_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert bare.returncode != 0 and "401" in bare.stdout + bare.stderr, bare.stdout[-2000:] + bare.stderr[-2000:]


def test_deployed_flows_run_on_a_process_worker(tmp_path):
    runs = tmp_path / "runs"
    with harness.prefect_server(tmp_path, extra_env={"PREFECT_SERVER_API_AUTH_STRING": AUTH}) as server:
        refused_without_the_auth_string(server)
        by_serve = served(server, tmp_path)
        assert set(by_serve) == {"finetune-nightly", "export", "evaluate", "convert"}
        assert by_serve["finetune-nightly"]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

        prefect_cli(server, "work-pool", "create", "ckptflow-local", "--type", "process")
        prefect_cli(server, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML))
        nightly = api(server, "/deployments/name/finetune/finetune-nightly")
        assert nightly["work_pool_name"] == "ckptflow-local" and nightly["schedules"][0]["active"]
        log = open(tmp_path / "worker.log", "wb")
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ckptflow-local"],
                                  env=client_env(server, PREFECT_WORKER_QUERY_SECONDS="1"), cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # A finished demo run, handing its evaluation to the evaluate deployment.
            demo = subprocess.run(
                [sys.executable, "-m", "ckptflow.cli", "run", "deployments/configs/demo.yaml", f"storage={runs}",
                 "train.steps=4", "checkpoint.every_steps=2", "train.batch_size=4", "train.seq_len=32",
                 "data.eval_batches=2", "eval.max_new_tokens=4", "eval.deployment=evaluate/evaluate", "--json"],
                env=client_env(server), cwd=REPO, capture_output=True, text=True, timeout=300)
            assert demo.returncode == 0, demo.stderr[-3000:]
            out = json.loads(demo.stdout.strip().splitlines()[-1])
            run_uri = out["run"]
            assert out["export"] == f"{run_uri}/export" and Path(out["summary"]).is_file()

            # An export-only run of the `export` deployment, with the form's parameters; the
            # worker runs it beside the evaluation that the demo's export event started.
            params = {"params": {"source": run_uri, "step": 2, "format": "hf", "dtype": "bfloat16"}}
            created = api(server, f"/deployments/{deployment_id(server, 'export', 'export')}/create_flow_run",
                          {"parameters": params})

            wait_for_run(server, {"deployment_id": {"any_": [deployment_id(server, "evaluate", "evaluate")]}})
            rec = json.loads((Path(run_uri) / "run.json").read_text())
            assert rec["eval"]["after"]["perplexity"] < rec["eval"]["before"]["perplexity"]
            # the demo config's lm-eval tasks (eval.tasks) ran in the evaluate deployment, on both models
            scores = rec["eval"]["lm_eval"]
            assert set(scores["after"]) == set(scores["before"]) == {"ckptflow_demo_qa", "ckptflow_demo_cloze"}
            assert {s["name"]: s["state"] for s in rec["stages"]}["evaluate"] == "Completed"
            assert manifest.verify(f"{run_uri}/eval") == []

            done = wait_for_run(server, {"id": {"any_": [created["id"]]}})
            assert done["state_name"] == "Completed"
            exported = manifest.require(f"{run_uri}/exports/hf-step-000002-bfloat16")
            assert (exported.format, exported.step, exported.dtype) == ("hf", 2, "bfloat16")
        finally:
            harness.stop_process_group(worker)
            log.close()
        assert worker.poll() is not None


def test_the_gpu_pool_template_requests_the_gpus_its_deployments_ask_for():
    template = json.loads((REPO / "deployments" / "k8s-gpu-job-template.json").read_text())
    variables = template["variables"]["properties"]
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert variables["gpus"]["type"] == "integer"
    gpu_pool = yaml.safe_load(PREFECT_YAML.read_text())["definitions"]["work_pools"]["gpu"]
    assert set(gpu_pool["job_variables"]) <= set(variables)
