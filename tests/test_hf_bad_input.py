"""Bad HF input: one line on stderr naming the file or key, exit 2, nothing committed."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests import hfmodels


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ckptflow.cli", *args], capture_output=True, text=True)


def sharded(tmp_path):
    return hfmodels.save("llama", str(tmp_path / "src"), shard="40KB")


def truncate_shard(src):
    path = os.path.join(src, "model-00002-of-00012.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    return "model-00002-of-00012.safetensors"


def index_lists_missing_shard(src):
    os.remove(os.path.join(src, "model-00003-of-00012.safetensors"))
    return "model-00003-of-00012.safetensors"


def index_escapes(src):
    p = os.path.join(src, "model.safetensors.index.json")
    idx = json.load(open(p))
    key = next(iter(idx["weight_map"]))
    idx["weight_map"][key] = "../../etc/passwd"
    json.dump(idx, open(p, "w"))
    return "../../etc/passwd"


def config_shape_mismatch(src):
    p = os.path.join(src, "config.json")
    cfg = json.load(open(p))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(p, "w"))
    return "mlp.w1.weight"


def lying_header(src):
    path = os.path.join(src, "model-00001-of-00012.safetensors")
    data = bytearray(open(path, "rb").read())
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"shape":[256,64]', b'"shape":[256,65]')
    data[8:8 + n] = header[:n]
    open(path, "wb").write(bytes(data))
    return "model-00001-of-00012.safetensors"


CASES = {
    "truncated shard": truncate_shard,
    "index lists a missing shard": index_lists_missing_shard,
    "index name escapes the directory": index_escapes,
    "config shapes do not match": config_shape_mismatch,
    "header lies about a shape": lying_header,
}


@pytest.mark.parametrize("case", CASES)
def test_bad_hf_input(tmp_path, case):
    src = sharded(tmp_path)
    needle = CASES[case](src)
    dst = tmp_path / "dst"
    r = cli("convert", src, str(dst))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptflow: error:"), r.stderr
    assert needle in lines[0]
    assert not (dst / "ckptflow.json").exists()


def edit_config(src, **change):
    p = os.path.join(src, "config.json")
    json.dump({**json.load(open(p)), **change}, open(p, "w"))


NEWER_FAMILY_CASES = {
    # config field against the tensors: the line names the field and a tensor
    "qwen3 hidden_size": ("qwen3", {"hidden_size": 96}, ["hidden_size = 96", "tensor '"]),
    "olmo2 intermediate_size": ("olmo2", {"intermediate_size": 96}, ["intermediate_size = 96", "mlp.w"]),
    "gemma head_dim": ("gemma", {"head_dim": 8}, ["head_dim = 16", "attn."]),
    "gemma3 layer_types": ("gemma3_text", {"layer_types": ["full_attention"]}, ["layer_types", "config.json"]),
    "smollm3 no_rope_layers": ("smollm3", {"no_rope_layers": [1]}, ["no_rope_layers", "config.json"]),
    "qwen3_5": ("qwen3", {"model_type": "qwen3_5"}, ["'qwen3_5' is not supported", "'gemma3_text'", "'olmo2'"]),
    "gemma4_text": ("gemma2", {"model_type": "gemma4_text"}, ["'gemma4_text' is not supported", "'qwen3'"]),
}


@pytest.mark.parametrize("case", NEWER_FAMILY_CASES)
def test_bad_config_of_a_newer_family_is_one_line(tmp_path, case):
    family, change, needles = NEWER_FAMILY_CASES[case]
    src = hfmodels.save(family, str(tmp_path / "src"))
    edit_config(src, **change)
    r = cli("convert", src, str(tmp_path / "dst"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptflow: error:"), r.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "dst" / "ckptflow.json").exists()


def test_pickle_with_a_non_tensor_is_refused(tmp_path):
    src = tmp_path / "src"
    hfmodels.save("llama", str(src))
    os.remove(src / "model.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Evil()}, src / "pytorch_model.bin")
    r = cli("convert", str(src), str(tmp_path / "dst"))
    assert r.returncode == 2
    assert "pytorch_model.bin" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "dst" / "ckptflow.json").exists()


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("convert", str(tmp_path / "empty"), str(tmp_path / "dst"))
    assert r.returncode == 2 and "empty" in r.stderr
    r = cli("detect", str(tmp_path / "empty"), "--json")
    assert r.returncode == 2 and r.stdout == ""


def test_unknown_format_lists_what_was_found(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    (d / "weights.npz").write_bytes(b"x")
    r = cli("detect", str(d))
    assert r.returncode == 2 and "weights.npz" in r.stderr


def test_foreign_nonempty_destination_is_left_alone(tmp_path):
    src = sharded(tmp_path)
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    r = cli("convert", src, str(dst))
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (dst / "notes.txt").read_text() == "keep me"


def test_verify_finds_a_changed_byte(tmp_path):
    src = sharded(tmp_path)
    assert cli("convert", src, str(tmp_path / "tune")).returncode == 0
    shard = tmp_path / "tune" / "model-00004-of-00012.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = cli("verify", str(tmp_path / "tune"), "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["ok"] is False and "model-00004-of-00012.safetensors" in out["problems"][0]


def _rewrite(src, change):
    from safetensors.torch import load_file, save_file

    path = os.path.join(src, "model.safetensors")
    sd = load_file(path)
    change(sd)
    save_file(sd, path, metadata={"format": "pt"})


def fused_rows_do_not_split(src):
    key = "model.layers.1.self_attn.qkv_proj.weight"
    _rewrite(src, lambda sd: sd.__setitem__(key, sd[key][:-16].contiguous()))   # one v head short
    return key


def expert_missing(src):
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    _rewrite(src, lambda sd: sd.pop(key))
    return key


def qwen3_moe_expert_missing(src):
    key = "model.layers.0.mlp.experts.3.down_proj.weight"
    _rewrite(src, lambda sd: sd.pop(key))
    return key


FAMILY_CASES = {"phi3": fused_rows_do_not_split, "mixtral": expert_missing, "qwen3_moe": qwen3_moe_expert_missing}


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_fused_rows_and_missing_experts_name_the_key(tmp_path, family):
    src = hfmodels.save(family, str(tmp_path / "src"))
    needle = FAMILY_CASES[family](src)
    dst = tmp_path / "dst"
    r = cli("convert", src, str(dst))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptflow: error:") and repr(needle) in lines[0], r.stderr
    assert not (dst / "ckptflow.json").exists()


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_config_against_tensors_is_refused_by_every_export(tmp_path, fmt):
    """Not only convert to tune: an HF -> HF or HF -> GGUF export of a checkpoint whose config.json
    disagrees with its tensors used to commit a broken output with exit 0."""
    src = hfmodels.save("qwen3", str(tmp_path / "src"))
    edit_config(src, hidden_size=96)
    r = cli("export", src, str(tmp_path / "dst"), "--format", fmt)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors: tensor '" in lines[0] and "hidden_size = 96" in lines[0], lines
    assert not (tmp_path / "dst").exists()
