"""The README's promises, taken at their word (issue 18): each test runs what README.md or docs/
says a user may run and checks what they say comes out."""
import json
import os
import re
import shutil
import subprocess
import sys

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
    shutil.copytree(tiny_lora_run, run)
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
