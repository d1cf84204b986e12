"""The bad-input corpus: every reader (hf safetensors and .bin, tune, peft, meta) fed broken
input through the real CLI. Each case ends in exit 2, exactly one line on stderr naming the
file or key, and no committed output at the destination.

The cases are built and their CLI processes run concurrently once per module (`ran`); each
case is still its own test. A pickle that runs code on load is tests/test_hf_bad_input.py's."""
import json
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from ckptflow import manifest
from ckptflow.stages import convert
from tests import seeded

MARKER = ".ckptflow-writing"


# -- editing files --------------------------------------------------------------------------

def read_st(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_st(path, header, body):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)


def edit_header(path, fn):
    header, body = read_st(path)
    body = fn(header, body) or body
    write_st(path, header, body)


def tensors(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def edit_json(path, fn):
    d = json.load(open(path))
    fn(d)
    json.dump(d, open(path, "w"))


def shards(d):
    return sorted(f for f in os.listdir(d) if f.startswith("model-") and f.endswith(".safetensors"))


# -- the cases: build(dirs, case_dir) -> (CLI args before DST or None, text the error must name) --

def truncated_file(b, d):
    copy(b["single"], d)
    p = f"{d}/model.safetensors"
    os.truncate(p, os.path.getsize(p) - 100)
    return ["convert", d], "model.safetensors"


def truncated_shard(b, d):
    copy(b["sharded"], d)
    name = shards(d)[1]
    os.truncate(f"{d}/{name}", os.path.getsize(f"{d}/{name}") - 8)
    return ["convert", d], name


def header_lies_about_a_shape(b, d):
    copy(b["single"], d)
    name = []

    def lie(h, _):
        name.append(tensors(h)[0])
        h[name[0]]["shape"] = [s + 1 for s in h[name[0]]["shape"]]
    edit_header(f"{d}/model.safetensors", lie)
    return ["convert", d], name[0]


def header_offsets_overlap(b, d):
    copy(b["single"], d)

    def overlap(h, _):
        first, second = tensors(h)[:2]
        h[second]["data_offsets"] = [h[first]["data_offsets"][0], h[first]["data_offsets"][0]
                                     + h[second]["data_offsets"][1] - h[second]["data_offsets"][0]]
    edit_header(f"{d}/model.safetensors", overlap)
    return ["convert", d], "model.safetensors: tensor"


def header_longer_than_the_file(b, d):
    copy(b["single"], d)
    with open(f"{d}/model.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 10**9))
    return ["convert", d], "model.safetensors"


def header_not_json(b, d):
    copy(b["single"], d)
    with open(f"{d}/model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\xff{not json")
    return ["convert", d], "model.safetensors"


def unknown_dtype(b, d):
    copy(b["single"], d)
    name = []

    def q4(h, _):
        name.append(tensors(h)[-1])
        h[name[0]]["dtype"] = "Q4_K"
    edit_header(f"{d}/model.safetensors", q4)
    return ["convert", d], name[0]


def trailing_bytes(b, d):
    copy(b["single"], d)
    with open(f"{d}/model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    return ["convert", d], "model.safetensors"


def index_lists_a_missing_shard(b, d):
    copy(b["sharded"], d)
    name = shards(d)[2]
    os.remove(f"{d}/{name}")
    return ["convert", d], name


def index_name_escapes(b, d):
    copy(b["sharded"], d)
    edit_json(f"{d}/model.safetensors.index.json",
              lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "../../etc/passwd"}))
    return ["convert", d], "../../etc/passwd"


def index_maps_a_tensor_to_the_wrong_shard(b, d):
    copy(b["sharded"], d)
    key = []

    def swap(i):
        wm = i["weight_map"]
        key.append(next(k for k in sorted(wm) if wm[k] != wm[sorted(wm)[0]]))
        wm[key[0]] = wm[sorted(wm)[0]]
    edit_json(f"{d}/model.safetensors.index.json", swap)
    return ["convert", d], key[0]


def index_without_weight_map(b, d):
    copy(b["sharded"], d)
    json.dump({"metadata": {}}, open(f"{d}/model.safetensors.index.json", "w"))
    return ["convert", d], "model.safetensors.index.json"


def config_not_json(b, d):
    copy(b["single"], d)
    open(f"{d}/config.json", "w").write('{"model_type": "llama",')
    return ["convert", d], "config.json"


def config_unknown_model_type(b, d):
    copy(b["single"], d)
    edit_json(f"{d}/config.json", lambda c: c.update(model_type="gpt9", architectures=["Gpt9ForCausalLM"]))
    return ["convert", d], "gpt9"


def config_shapes_do_not_match(b, d):
    copy(b["single"], d)
    edit_json(f"{d}/config.json", lambda c: c.update(intermediate_size=c["intermediate_size"] + 16))
    return ["convert", d], "mlp.w"


def config_wants_a_layer_that_is_missing(b, d):
    copy(b["single"], d)
    edit_json(f"{d}/config.json", lambda c: c.update(num_hidden_layers=3))
    return ["convert", d], "layers.2."


def unknown_tensor_key(b, d):
    copy(b["single"], d)
    key = "model.layers.0.self_attn.mystery.weight"

    def add(h, body):
        h[key] = {"dtype": "F32", "shape": [4], "data_offsets": [len(body), len(body) + 16]}
        return body + b"\0" * 16
    edit_header(f"{d}/model.safetensors", add)
    return ["convert", d], key


def bin_with_a_non_tensor_value(b, d):
    import torch
    from safetensors.torch import load_file

    copy(b["single"], d, skip=("model.safetensors",))
    sd = load_file(f"{b['single']}/model.safetensors")
    sd["optimizer_step"] = 3
    torch.save(sd, f"{d}/pytorch_model.bin")
    return ["convert", d], "optimizer_step"


def empty_directory(b, d):
    os.makedirs(d)
    return ["convert", d], "empty"


def unknown_format(b, d):
    os.makedirs(d)
    open(f"{d}/weights.npz", "wb").write(b"PK")
    return ["convert", d], "weights.npz"


def interrupted_write_as_a_source(b, d):
    copy(b["single"], d)
    open(f"{d}/{MARKER}", "w").write("{}")
    return ["convert", d], "interrupted ckptflow write"


def unreadable_file(b, d):
    if os.geteuid() == 0:
        return None, "running as root: chmod 000 does not stop root from reading the file"
    copy(b["single"], d)
    os.chmod(f"{d}/model.safetensors", 0)
    return ["convert", d], "model.safetensors"


def tune_shard_truncated(b, d):
    copy(b["tune"], d, keep_manifest=True)
    name = shards(d)[0]
    os.truncate(f"{d}/{name}", os.path.getsize(f"{d}/{name}") - 4)
    return ["convert", d, "--to", "hf"], name


def tune_shard_missing(b, d):
    copy(b["tune"], d, keep_manifest=True)
    name = shards(d)[-1]
    os.remove(f"{d}/{name}")
    return ["convert", d, "--to", "hf"], name


def tune_manifest_not_json(b, d):
    copy(b["tune"], d, keep_manifest=True)
    open(f"{d}/ckptflow.json", "w").write("{")
    return ["convert", d, "--to", "hf"], "ckptflow.json"


def tune_checksum_mismatch(b, d):
    copy(b["tune"], d, keep_manifest=True)
    name = shards(d)[1]
    with open(f"{d}/{name}", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    return ["verify", d], name


def adapter(b, d, *, config=None, tensors_=None):
    """A hand-made PEFT LoRA adapter for the seeded llama (dim 64, 4 heads)."""
    os.makedirs(d)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
           "base_model_name_or_path": b["single"], **(config or {})}
    json.dump(cfg, open(f"{d}/adapter_config.json", "w"))
    names = tensors_ or {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": shape
                         for i in range(2) for ab, shape in (("A", [4, 64]), ("B", [64, 4]))}
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for k, shape in names.items():
        n = shape[0] * shape[1] * 4
        header[k] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    write_st(f"{d}/adapter_model.safetensors", header, b"\0" * pos)


def peft_type_unsupported(b, d):
    adapter(b, d, config={"peft_type": "IA3"})
    return ["convert", d], "adapter_config.json"


def peft_tensor_not_lora(b, d):
    key = "base_model.model.model.layers.0.self_attn.q_proj.weight"
    adapter(b, d, tensors_={key: [64, 64]})
    return ["convert", d], key


def peft_rank_does_not_match(b, d):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    adapter(b, d, tensors_={"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": [8, 64],
                            "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": [64, 8]})
    return ["convert", d], key


def meta_params_not_json(b, d):
    copy(b["meta"], d)
    open(f"{d}/params.json", "w").write("{'dim': 64}")
    return ["convert", d], "params.json"


def meta_non_tensor_value(b, d):
    import torch

    copy(b["meta"], d)
    sd = torch.load(f"{d}/consolidated.00.pth", weights_only=True)
    sd["rope.freqs.note"] = "not a tensor"
    torch.save(sd, f"{d}/consolidated.00.pth")
    return ["convert", d], "rope.freqs.note"


CASES = {f.__name__: f for f in [
    truncated_file, truncated_shard, header_lies_about_a_shape, header_offsets_overlap, header_longer_than_the_file,
    header_not_json, unknown_dtype, trailing_bytes, index_lists_a_missing_shard, index_name_escapes,
    index_maps_a_tensor_to_the_wrong_shard, index_without_weight_map, config_not_json, config_unknown_model_type,
    config_shapes_do_not_match, config_wants_a_layer_that_is_missing, unknown_tensor_key, bin_with_a_non_tensor_value,
    empty_directory, unknown_format, interrupted_write_as_a_source, unreadable_file,
    tune_shard_truncated, tune_shard_missing, tune_manifest_not_json, tune_checksum_mismatch,
    peft_type_unsupported, peft_tensor_not_lora, peft_rank_does_not_match, meta_params_not_json, meta_non_tensor_value,
]}
# `verify` reports a mismatch on stdout and exits 1 (its documented contract, tests/test_hf_bad_input.py).
EXIT = {"tune_checksum_mismatch": 1}


def copy(src, dst, skip=(), keep_manifest=False):
    """Copy a base directory. Without its ckptflow.json it is a foreign checkpoint (as users bring)."""
    drop = set(skip) | (set() if keep_manifest else {"ckptflow.json"})
    shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n in drop])


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    base = seeded.hf_dirs(str(root / "base"))
    base["tune"] = convert.run(base["sharded"], str(root / "base" / "tune")).uri
    base["meta"] = convert.run(base["single"], str(root / "base" / "meta"), to="meta").uri
    jobs = {}
    for name, build in CASES.items():
        args, needle = build(base, str(root / name))
        jobs[name] = (args, needle, str(root / f"{name}-dst"))

    def run(job):
        args, _, dst = job
        if args is None:
            return None
        full = [*args, dst] if args[0] == "convert" else args
        return subprocess.run([sys.executable, "-m", "ckptflow.cli", *full], capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(jobs, pool.map(run, jobs.values())))
    return {name: (*jobs[name], results[name]) for name in jobs}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line_and_nothing_committed(ran, case):
    args, needle, dst, r = ran[case]
    if args is None:
        pytest.skip(needle)
    lines = r.stderr.strip().splitlines()
    if EXIT.get(case) == 1:
        assert r.returncode == 1 and needle in r.stdout and lines == [], (r.stdout, r.stderr)
        return
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("ckptflow: error: "), r.stderr[-2000:]
    assert needle in lines[0], lines[0]
    assert r.stdout == ""
    assert manifest.read(dst) is None
    assert not os.path.exists(dst) or set(os.listdir(dst)) <= {MARKER}
