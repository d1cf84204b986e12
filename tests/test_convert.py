"""HF -> tune -> HF conversion: exact round trips, dtype and shard options, idempotency, parity."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from ckptflow import manifest
from ckptflow.errors import CkptError
from ckptflow.stages import convert
from tests import hfmodels


def files_of(path):
    return sorted(f for f in os.listdir(path) if f != "ckptflow.json")


def same_dir(a, b, skip=()):
    assert files_of(a) == files_of(b)
    for f in files_of(a):
        if f in skip:
            continue
        with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
            assert fa.read() == fb.read(), f


# Every shard x dtype for the first families; the newer ones (same code path, their own key tables and
# config.json fields) sharded in bfloat16 and whole in float32.
ROUND_TRIPS = [(f, s, d) for f in ("llama", "mistral", "qwen2") for s in (None, "40KB")
               for d in (torch.float32, torch.bfloat16, torch.float16)]
ROUND_TRIPS += [(f, s, d) for f in (*hfmodels.DENSE, *hfmodels.FAMILY_KW)
                for s, d in ((None, torch.float32), ("40KB", torch.bfloat16))]


@pytest.mark.parametrize("family, shard, dtype", ROUND_TRIPS)
def test_round_trip_is_byte_exact(tmp_path, family, shard, dtype):
    src = hfmodels.save(family, str(tmp_path / "src"), shard=shard, dtype=dtype)
    convert.run(src, str(tmp_path / "tune"))
    convert.run(str(tmp_path / "tune"), str(tmp_path / "back"), to="hf")
    same_dir(src, str(tmp_path / "back"))
    assert manifest.verify(str(tmp_path / "back")) == []


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_embeddings(tmp_path, tie):
    src = hfmodels.save("llama", str(tmp_path / "src"), shard="40KB", tie_word_embeddings=tie)
    m = convert.run(src, str(tmp_path / "tune"))
    keys = {k for e in m.extra["layout"] for k in e["keys"]}
    assert ("output.weight" in keys) is (not tie)
    convert.run(str(tmp_path / "tune"), str(tmp_path / "back"), to="hf")
    same_dir(src, str(tmp_path / "back"))


def test_tune_shards_use_tune_names_and_pt_metadata(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "src"), shard="40KB")
    m = convert.run(src, str(tmp_path / "tune"))
    shards = [e["name"] for e in m.extra["layout"]]
    assert len(shards) > 1
    for name in shards:
        with safe_open(str(tmp_path / "tune" / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert all(not k.startswith("model.") for k in f.keys())
    assert "assets/config.json" in m.files and "assets/model.safetensors.index.json" in m.files


def test_bin_source_reads_weights_only_and_exports_safetensors(tmp_path):
    src = tmp_path / "src"
    model = hfmodels.model("llama")
    hfmodels.save("llama", str(src))
    os.remove(src / "model.safetensors")
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    convert.run(str(src), str(tmp_path / "tune"))
    convert.run(str(tmp_path / "tune"), str(tmp_path / "back"), to="hf")
    assert "model.safetensors" in os.listdir(tmp_path / "back")
    with safe_open(str(tmp_path / "back" / "model.safetensors"), "pt") as f:
        for k, v in model.state_dict().items():
            if k in f.keys():
                assert torch.equal(f.get_tensor(k), v), k


def test_dtype_option_casts_each_tensor_and_updates_config(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "src"), shard="40KB")
    convert.run(src, str(tmp_path / "tune"))
    convert.run(str(tmp_path / "tune"), str(tmp_path / "bf16"), to="hf", dtype="bfloat16")
    cfg = json.load(open(tmp_path / "bf16" / "config.json"))
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    index = json.load(open(tmp_path / "bf16" / "model.safetensors.index.json"))
    orig = json.load(open(tmp_path / "src" / "model.safetensors.index.json"))
    assert index["weight_map"] == orig["weight_map"]
    assert index["metadata"]["total_size"] * 2 == orig["metadata"]["total_size"]
    for shard in set(orig["weight_map"].values()):
        with safe_open(str(tmp_path / "src" / shard), "pt") as a, safe_open(str(tmp_path / "bf16" / shard), "pt") as b:
            for k in a.keys():
                assert torch.equal(b.get_tensor(k), a.get_tensor(k).to(torch.bfloat16)), k


def test_max_shard_size_repartitions(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "src"))
    m = convert.run(src, str(tmp_path / "tune"), max_shard_size="60KB")
    assert len(m.extra["layout"]) > 2
    convert.run(str(tmp_path / "tune"), str(tmp_path / "back"), to="hf", max_shard_size="100KB")
    back = json.load(open(tmp_path / "back" / "model.safetensors.index.json"))
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as a:
        for k in a.keys():
            with safe_open(str(tmp_path / "back" / back["weight_map"][k]), "pt") as b:
                assert torch.equal(a.get_tensor(k), b.get_tensor(k))


def test_rerun_with_same_inputs_does_no_work(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "src"))
    first = convert.run(src, str(tmp_path / "tune"))
    mtime = os.stat(tmp_path / "tune" / "ckptflow.json").st_mtime_ns
    again = convert.run(src, str(tmp_path / "tune"))
    assert os.stat(tmp_path / "tune" / "ckptflow.json").st_mtime_ns == mtime
    assert manifest.fingerprint(first) == manifest.fingerprint(again)


@pytest.mark.parametrize("family", ["llama", "qwen2", *hfmodels.DENSE, *hfmodels.FAMILY_KW])
def test_load_gives_transformers_logits(tmp_path, family):
    import ckptflow

    hf = hfmodels.model(family)
    hf.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    model, view = ckptflow.load(str(tmp_path / "src"))
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens)
    assert view.format == "hf"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("to", ["tune", "hf"])
def test_convert_path_imports_neither_torch_nor_prefect(tmp_path, to):
    """Nor numpy, whose BLAS threads spin on the cores the hashers need."""
    src = hfmodels.save("llama", str(tmp_path / "src"), shard="40KB")
    if to == "hf":
        src = convert.run(src, str(tmp_path / "tune0")).uri
    code = ("import sys; from ckptflow.cli import main; rc = main(['convert', sys.argv[1], sys.argv[2], '--to', sys.argv[3]]);"
            "heavy = [m for m in ('torch', 'prefect', 'transformers', 'numpy') if m in sys.modules];"
            "print(heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, src, str(tmp_path / "out"), to], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("forward", [True, False])
def test_the_byte_row_order_is_the_tensor_permutation(forward):
    from ckptflow.families import _base

    x = torch.arange(24 * 3).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        want = _base._permute(x, heads, forward=forward)
        assert torch.equal(x[_base.row_order(24, heads, forward)], want)


@pytest.mark.parametrize("to", ["tune", "meta", "dcp"])
def test_writing_a_cast_copy_leaves_the_views_tensors_as_they_were(tmp_path, to):
    """Writers cast copies of the view's items: the same view loaded afterwards still has its own
    dtype (an Item is shared by every view built on it; a writer used to set out_dtype on it)."""
    from ckptflow.commit import Output
    from ckptflow.formats import registry

    src = hfmodels.save("llama", str(tmp_path / "src"), dtype=torch.float32)
    view = registry.open_view(src)
    before = view.state_dict()
    plans = view.plans(out_dtype="BF16")
    assert {it.final_dtype for p in plans for it in p.items} == {"BF16"}
    registry.write(to, view, Output(str(tmp_path / to)), out_dtype="BF16")
    after = view.state_dict()
    assert {it.out_dtype for it in view.items.values()} == {None}
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)


def test_multimodal_gemma3_reads_its_text_model(tmp_path):
    """model_type gemma3 (Gemma3ForConditionalGeneration): the text decoder is read with transformers'
    text-only logits; the vision tower is dropped and writing the multimodal layout back is refused."""
    import transformers

    import ckptflow
    from ckptflow import cli
    from ckptflow.errors import CkptError

    text = dict(hfmodels.TINY, **hfmodels.DENSE["gemma3_text"][1], vocab_size=300)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "mm")
    model, view = ckptflow.load(str(tmp_path / "mm"))
    tokens = torch.randint(0, 290, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, atol=1e-5, rtol=0)
    assert view.family.NAME == "gemma3" and not any("vision" in k for k in view.items)
    # The same checkpoint with the in-memory names some re-saves carry (model.language_model.*).
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "mm" / "model.safetensors"))
    renamed = {("model." + k.replace("language_model.model.", "language_model.", 1)
                if k.startswith(("language_model.model.", "vision_tower.", "multi_modal_projector.")) else k): v
               for k, v in sd.items()}
    assert any(k.startswith("model.language_model.layers.") for k in renamed)
    os.makedirs(tmp_path / "mm2")
    save_file(renamed, str(tmp_path / "mm2" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "mm2" / "config.json").write_bytes((tmp_path / "mm" / "config.json").read_bytes())
    with torch.no_grad():
        torch.testing.assert_close(ckptflow.load(str(tmp_path / "mm2"))[0](tokens), model(tokens), atol=0, rtol=0)
    m = convert.run(str(tmp_path / "mm"), str(tmp_path / "tune"))
    assert m.family == "gemma3" and m.model_args["layer_types"] == text["layer_types"]
    with pytest.raises(CkptError, match="vision tower"):
        convert.run(str(tmp_path / "tune"), str(tmp_path / "back"), to="hf")
    assert not (tmp_path / "back" / "ckptflow.json").exists()


def flip_a_byte(path, at=-1):
    with open(path, "r+b") as f:
        f.seek(at, os.SEEK_END)
        b = f.read(1)
        f.seek(at, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))


@pytest.mark.parametrize("to", ["hf", "tune"])
def test_a_damaged_committed_source_fails_the_conversion_and_nothing_is_committed(tmp_path, to):
    src = hfmodels.save("llama", str(tmp_path / "src"), shard="40KB")
    tune = str(tmp_path / "tune")
    m = convert.run(src, tune)
    shard = sorted(n for n in m.files if n.endswith(".safetensors"))[-1]
    flip_a_byte(os.path.join(tune, shard))       # same size: only the hash can tell
    dst = str(tmp_path / "out")
    with pytest.raises(CkptError, match=rf"{shard}: sha256 mismatch: the source does not match its ckptflow.json"):
        convert.run(tune, dst, to=to)
    assert not os.path.exists(dst)                 # the write it began is gone, marker and all


def test_a_check_limited_to_what_a_stage_reads_passes_over_other_damage(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "src"))
    tune = str(tmp_path / "tune")
    m = convert.run(src, tune)
    asset = next(n for n in m.files if not n.endswith(".safetensors"))
    flip_a_byte(os.path.join(tune, asset))
    weights = {os.path.join(tune, n) for n in m.files if n.endswith(".safetensors")}
    assert manifest.Check(tune, m, only=weights).problems() == []
    assert manifest.Check(tune, m).problems() == [f"{os.path.join(tune, asset)}: sha256 mismatch"]
