"""The CLI contract: --json objects, exit codes, detect/inspect/verify output."""
import json
import subprocess
import sys

from tests import hfmodels


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ckptflow.cli", *args], capture_output=True, text=True)


def test_detect_json_has_the_contract_fields(tmp_path):
    src = hfmodels.save("mistral", str(tmp_path / "src"), shard="40KB")
    r = cli("detect", src, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["format"] == "hf" and d["family"] == "mistral" and d["dtype"] == "float32"
    assert d["num_params"] == sum(p.numel() for p in hfmodels.model("mistral").parameters())
    assert "model.safetensors.index.json" in d["files"]


def test_convert_inspect_verify_json(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "src"))
    r = cli("convert", src, str(tmp_path / "tune"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["format"] == "tune" and out["kind"] == "model"
    d = json.loads(cli("detect", str(tmp_path / "tune"), "--json").stdout)
    assert d["format"] == "tune" and d["family"] == "llama"
    info = json.loads(cli("inspect", str(tmp_path / "tune"), "--json").stdout)
    assert info["manifest"]["lineage"]["stages"][-1]["stage"] == "convert"
    v = json.loads(cli("verify", str(tmp_path / "tune"), "--json").stdout)
    assert v["ok"] is True and v["problems"] == []


def test_unknown_option_is_exit_2(tmp_path):
    r = cli("convert", "a", "b", "--frobnicate")
    assert r.returncode == 2


def test_bad_dtype_is_one_line(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "src"))
    r = cli("convert", src, str(tmp_path / "x"), "--dtype", "int3")
    assert r.returncode == 2 and "int3" in r.stderr and len(r.stderr.strip().splitlines()) == 1
