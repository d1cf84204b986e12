"""Storage credentials never leave the process that needs them (ckptflow/credentials.py).

Unit level: references resolve, literals are stashed or redacted, a missing or redacted one is
one line naming it. End to end: a canary key and secret, which the loopback S3 server demands,
go through a whole `ckptflow run` on S3 (literals in the YAML, its own embedded API) and an
export flow run on the test server (Secret block references); then both Prefect databases and
homes, the console output and every object of the bucket are searched for them: zero hits."""
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptflow import credentials
from ckptflow.config import load_config, to_dict, validate
from ckptflow.errors import CkptError

REPO = Path(__file__).resolve().parents[1]

OPTIONS = {"key": "AKIAEXAMPLE", "secret": "s3cr3t", "anon": False, "token": "anon",
           "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "aws_session_token": "t0ken"}}


def test_stash_moves_literals_into_the_environment_and_resolve_brings_them_back(monkeypatch):
    env = {}
    refs = credentials.stash(OPTIONS, env)
    assert credentials.literals(OPTIONS) == ["key", "secret", "client_kwargs.aws_session_token"]
    assert credentials.literals(refs) == []          # "anon" and False are not secrets
    assert refs["key"] == {"env": "CKPTFLOW_CREDENTIAL_KEY"} and refs["token"] == "anon"
    token = {"env": "CKPTFLOW_CREDENTIAL_CLIENT_KWARGS_AWS_SESSION_TOKEN"}
    assert refs["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9", "aws_session_token": token}
    assert set(env.values()) == {"AKIAEXAMPLE", "s3cr3t", "t0ken"} and "s3cr3t" not in json.dumps(refs)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert credentials.resolve(refs) == OPTIONS


def test_a_json_credential_round_trips_through_the_environment(monkeypatch):
    info = {"type": "service_account", "private_key": "-----BEGIN-----"}
    env = {}
    refs = credentials.stash({"token": info, "project": "p"}, env)
    monkeypatch.setenv("CKPTFLOW_CREDENTIAL_TOKEN", env["CKPTFLOW_CREDENTIAL_TOKEN"])
    assert credentials.resolve(refs) == {"token": info, "project": "p"}


def test_missing_or_redacted_credentials_are_one_line_naming_them(monkeypatch):
    monkeypatch.delenv("NO_SUCH_VARIABLE_X", raising=False)
    with pytest.raises(CkptError, match=r"^storage_options\.client_kwargs\.key: environment variable "
                                        r"NO_SUCH_VARIABLE_X is not set$"):
        credentials.resolve({"client_kwargs": {"key": {"env": "NO_SUCH_VARIABLE_X"}}})
    with pytest.raises(CkptError, match=r"^storage_options\.secret: the credential was redacted"):
        credentials.resolve({"secret": credentials.REDACTED})
    monkeypatch.setattr(credentials, "_secret_loader", None)
    with pytest.raises(CkptError, match="only inside a Prefect flow or task"):
        credentials.resolve({"key": {"secret": "s3-key"}})


def test_what_prefect_stores_of_a_config_or_flow_parameters_holds_no_literal_credential():
    from fastapi.encoders import jsonable_encoder     # what Flow.serialize_parameters uses

    from flows.params import ConvertParams, EvalRequest, ExportParams

    cfg = validate({"run_id": "r", "storage": "s3://b/runs", "storage_options": OPTIONS,
                    "model": {"source": "seed://llama"}, "data": {"train": "d.jsonl"}})
    # What is stored keeps the options' shape and every non-secret value, each literal credential
    # replaced: an encoder that dropped storage_options (or the whole object) would not pass.
    want = {"key": "**redacted**", "secret": "**redacted**", "anon": False, "token": "anon",
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "aws_session_token": "**redacted**"}}
    for obj in (cfg, ExportParams(source="s3://b/r", storage_options=OPTIONS),
                EvalRequest(source="s3://b/r/export", data="d", storage_options=OPTIONS),
                ConvertParams(source="s3://b/a", dst="s3://b/c", storage_options=OPTIONS)):
        encoded = jsonable_encoder(obj)
        stored = json.dumps(encoded)
        assert encoded["storage_options"] == want, type(obj).__name__
        assert not any(s in stored for s in ("AKIAEXAMPLE", "s3cr3t", "t0ken")), type(obj).__name__
        assert obj.storage_options == OPTIONS        # the object in this process keeps them
    assert to_dict(cfg)["storage_options"]["key"] == credentials.REDACTED
    assert to_dict(cfg, credentials=True)["storage_options"] == OPTIONS     # for the ranks' 0600 file


# ---- end to end ------------------------------------------------------------------------------

RUN = """\
run_id: canary
storage: {storage}
storage_options: {options}
model:
  source: seed://llama?dim=64&n_layers=2
data:
  train: {repo}/deployments/data/demo.jsonl
  eval: {repo}/deployments/data/demo-eval.jsonl
  eval_batches: 1
train:
  method: lora
  steps: 2
  batch_size: 4
  seq_len: 32
  lora: {{rank: 4, alpha: 8, targets: [q_proj, v_proj]}}
checkpoint:
  every_steps: 2
eval:
  prompts: ["Q: Where does the camel live?\\nA:"]
  max_new_tokens: 4
"""


def hits(root: Path, needles: list[bytes]) -> list[str]:
    """`grep -rlaF` in Python: every file under root holding one of the needles."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                body = path.read_bytes()
            except OSError:
                continue
            found += [f"{path}: {n.decode()}" for n in needles if n in body]
    return found


@pytest.mark.s3
@pytest.mark.parametrize("embedded", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["test-server", "embedded-api"])
def test_canary_credentials_reach_no_database_log_artifact_or_file(prefect_api, tmp_path, embedded):
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL

    from flows.export import export
    from flows.params import ExportParams
    from tests.servers.s3 import start_s3_server

    key, secret = "CANARYKEY" + secrets.token_hex(8).upper(), "canary-secret-" + secrets.token_hex(16)
    needles = [key.encode(), secret.encode()]
    server = start_s3_server(tmp_path / "s3", key=key, secret=secret)
    try:
        bucket = server.make_bucket()
        options = {**server.storage_options}
        inputs = tmp_path / "inputs"          # the user's own config: the one place the canary is written
        inputs.mkdir()
        config = inputs / "canary.yaml"
        config.write_text(RUN.format(storage=f"{bucket}/runs", options=json.dumps(options), repo=REPO))
        # Embedded: as a user runs it, no server configured, so `ckptflow run` starts its own API, whose
        # database lands in this PREFECT_HOME (a fresh one migrates for ~25 s: slow). Else the test server.
        home = tmp_path / "prefect-home"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_API_URL"))}
        env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"))
        if not embedded:
            env["PREFECT_API_URL"] = prefect_api
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "ckptflow.cli", "run", str(config), "--json"], cwd=tmp_path,
                             env=env, capture_output=True, timeout=600)
        console = run.stdout + run.stderr
        assert run.returncode == 0, console.decode(errors="replace")[-4000:]
        out = json.loads(run.stdout.decode().strip().splitlines()[-1])
        assert out["export"] == f"{bucket}/runs/canary/export"
        ran_s = time.monotonic() - t0
        assert (home / "prefect.db").is_file() == embedded

        # An export flow run whose credentials are Secret block references.
        Secret(value=key).save("canary-key", overwrite=True)
        Secret(value=secret).save("canary-secret", overwrite=True)
        refs = {**options, "key": {"secret": "canary-key"}, "secret": {"secret": "canary-secret"}}
        exported = export(ExportParams(source=f"{bucket}/runs/canary", format="hf", storage_options=refs))
        assert exported["uri"].startswith(f"{bucket}/runs/canary/exports/hf-step-000002")

        fs = server.filesystem()
        objects = tmp_path / "bucket-copy"
        fs.get(bucket.removeprefix("s3://") + "/", str(objects), recursive=True)
        copied = [p for p in objects.rglob("*") if p.is_file()]
        assert any(p.name == "run.json" for p in copied) and any(p.name == "summary.md" for p in copied)
        assert any(p.name == "request.json" for p in copied) and any("prefect-results" in str(p) for p in copied)

        time.sleep(3)    # the server writes logs and events a moment after they arrive
        db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1]).parent
        searched = [db, Path(PREFECT_HOME.value()), home, objects]
        found = [h for root in searched for h in hits(root, needles)]
        found += [f"console: {n.decode()}" for n in needles if n in console]
        assert found == [], found
        assert sum(1 for root in searched for p in root.rglob("*") if p.is_file()) > len(copied)
        print(f"ckptflow run on S3 in {ran_s:.1f} s; searched {len(copied)} objects, {db}, {home}: 0 hits")
        print("files searched:", sum(1 for root in searched for p in root.rglob("*") if p.is_file()))
    finally:
        server.stop()


def test_the_embedded_server_gets_no_credential_and_a_configured_api_is_used_as_is(tmp_path):
    from ckptflow import api_server

    env = {"PREFECT_HOME": str(tmp_path), "CKPTFLOW_CREDENTIAL_SECRET": "s3cr3t", "PATH": "/bin"}
    assert "CKPTFLOW_CREDENTIAL_SECRET" not in api_server.embedded_server_env(env)
    assert api_server.configured_api_url(env) is None
    (tmp_path / "profiles.toml").write_text('active = "remote"\n[profiles.remote]\n'
                                            'PREFECT_API_URL = "http://prefect.internal:4200/api"\n')
    assert api_server.configured_api_url(env) == "http://prefect.internal:4200/api"   # no embedded server then
    assert api_server.configured_api_url({**env, "PREFECT_API_URL": "http://x/api"}) == "http://x/api"
