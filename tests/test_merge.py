"""Merge: W' = W + scale * B @ A in float32, equal to peft's merge_and_unload; re-merge refused."""
import os

import pytest
import torch

from ckptflow import api, cli, families, manifest
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.stages import merge
from tests import hfmodels
from tests.test_peft import VARIANTS, lora_step, make_run, peft_adapter


def tune_sd(uri):
    return api.load_state_dict(uri)[0]


def raw(uri):
    """{key: raw bytes} of a tune directory, to prove untouched tensors are byte-identical."""
    out = {}
    for name in (e["name"] for e in manifest.require(uri).extra["layout"]):
        path = os.path.join(uri, name)
        for t in st.read_header(path)[1]:
            out[t.name] = st.read_tensor_bytes(t)
    return out


MERGES = [("llama", v) for v in sorted(VARIANTS)] + [(f, "patterns") for f in hfmodels.DENSE]


@pytest.mark.parametrize("family, variant", MERGES)
def test_peft_made_adapter_merges_like_peft(tmp_path, family, variant):
    base = hfmodels.save(family, str(tmp_path / "base"))
    pm = peft_adapter(base, str(tmp_path / "ad"), **VARIANTS[variant])
    want = pm.merge_and_unload().state_dict()
    m = merge.run(str(tmp_path / "ad"), base, str(tmp_path / "merged"))
    assert (m.kind, m.format, m.extra["merged"]["format"]) == ("model", "tune", "peft")
    got = tune_sd(str(tmp_path / "merged"))
    fam = families.get(family)
    ref = families.hf_state_dict_to_tune(want, fam, api.load_state_dict(base)[1].args)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0, msg=k)


# peft's own target names per family: fused Phi-3 modules, attention only for MoE.
FAMILY_TARGETS = {
    "phi3": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "phi3-rslora": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"], use_rslora=True,
                        rank_pattern={"model.layers.1.self_attn.qkv_proj": 2}),
    "mixtral": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "qwen3_moe": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
}


def saved_tensors(model, path):
    """What save_pretrained writes (transformers 5 groups MoE experts in memory, not on disk)."""
    from safetensors.torch import load_file

    model.save_pretrained(path)
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("case", list(FAMILY_TARGETS))
def test_family_adapters_merge_like_peft(tmp_path, case):
    from ckptflow.families import _fused

    family = case.split("-")[0]
    base = hfmodels.save(family, str(tmp_path / "base"))
    pm = peft_adapter(base, str(tmp_path / "ad"), **FAMILY_TARGETS[case])
    want = saved_tensors(pm.merge_and_unload(), str(tmp_path / "want"))
    merge.run(str(tmp_path / "ad"), base, str(tmp_path / "merged"))
    got = tune_sd(str(tmp_path / "merged"))
    ref = _fused.hf_state_dict_to_tune(want, families.get(family), api.load_state_dict(base)[1].args)
    assert got.keys() == ref.keys()
    diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert diff <= 1e-6, diff


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(str(tmp_path_factory.mktemp("merge")))


def test_step_merge_changes_only_targets(tmp_path, run):
    cfg = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "w2"], "use_rslora": True}
    step = lora_step(run, 7, cfg, seed=3)
    m = merge.run(step.uri, "-", str(tmp_path / "merged"))
    base_raw, merged_raw = raw(os.path.join(run, "base")), raw(m.uri)
    assert list(base_raw) == list(merged_raw)       # same keys, same order, same layout
    changed = {k for k in base_raw if base_raw[k] != merged_raw[k]}
    assert changed == {f"layers.{i}.{p}.weight" for i in range(2) for p in ("attn.q_proj", "mlp.w2")}
    base, got = tune_sd(os.path.join(run, "base")), tune_sd(m.uri)
    from ckptflow import checkpointer

    ad = checkpointer.read_tensors(step.uri, "model.safetensors")
    s = 8.0 / 4 ** 0.5
    for k in changed:
        mod = k.removesuffix(".weight")
        want = base[k].double() + s * ad[mod + ".lora_b.weight"].double() @ ad[mod + ".lora_a.weight"].double()
        torch.testing.assert_close(got[k].double(), want, atol=1e-6, rtol=0)
    assert m.step == 7 and m.lineage["run"] == run and m.lineage["step"] == 7
    assert [s["stage"] for s in m.lineage["stages"]][-2:] == ["train", "merge"]


def test_merge_is_float32_math_cast_to_the_base_dtype(tmp_path):
    r = make_run(str(tmp_path), dtype=torch.bfloat16)
    step = lora_step(r, 1, {"rank": 4, "alpha": 16.0, "targets": ["v_proj"]})
    m = merge.run(step.uri, os.path.join(r, "base"), str(tmp_path / "merged"))
    assert m.dtype == "bfloat16"
    base, got = tune_sd(os.path.join(r, "base")), tune_sd(m.uri)
    from ckptflow import checkpointer

    ad = checkpointer.read_tensors(step.uri, "model.safetensors")
    k = "layers.1.attn.v_proj"
    want = (base[k + ".weight"].float() + 4.0 * (ad[k + ".lora_b.weight"] @ ad[k + ".lora_a.weight"])).bfloat16()
    assert got[k + ".weight"].dtype == torch.bfloat16 and torch.equal(got[k + ".weight"], want)


def test_idempotent_and_a_second_merge_is_refused(tmp_path, run):
    step = lora_step(run, 9, {"rank": 2, "alpha": 4.0, "targets": ["k_proj"]}, seed=9)
    first = merge.run(step.uri, "-", str(tmp_path / "merged"))
    again = merge.run(step.uri, "-", str(tmp_path / "merged"))
    assert again.created == first.created and manifest.fingerprint(again) == manifest.fingerprint(first)
    with pytest.raises(CkptError, match="already has adapter"):
        merge.run(step.uri, str(tmp_path / "merged"), str(tmp_path / "twice"))
    assert not os.path.exists(tmp_path / "twice")
    # The same numbers in another container (a PEFT export of the step) are the same adapter.
    from ckptflow.stages import export

    export.run(step.uri, str(tmp_path / "as-peft"), format="peft")
    with pytest.raises(CkptError, match="already has adapter"):
        merge.run(str(tmp_path / "as-peft"), str(tmp_path / "merged"), str(tmp_path / "twice"))
    # A different adapter on top of a merged model is fine.
    other = lora_step(run, 10, {"rank": 2, "alpha": 4.0, "targets": ["k_proj"]}, seed=10)
    merge.run(other.uri, str(tmp_path / "merged"), str(tmp_path / "stacked"))


def test_cli_merge_and_bad_input(tmp_path, run, capsys):
    step = lora_step(run, 11, {"rank": 2, "alpha": 2.0, "targets": ["w1"]})
    assert cli.main(["merge", step.uri, "-", str(tmp_path / "m"), "--json"]) == 0
    assert '"format": "tune"' in capsys.readouterr().out
    assert cli.main(["merge", os.path.join(run, "base"), "-", str(tmp_path / "x")]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err


def test_lora_on_a_tied_head_is_refused(tmp_path):
    base = hfmodels.save("qwen2", str(tmp_path / "qwen"))          # tied embeddings
    peft_adapter(base, str(tmp_path / "ad"), r=2, lora_alpha=4, target_modules=["lm_head"])
    path = str(tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(CkptError, match="base_layer.*save_embedding_layers"):
        merge.run(str(tmp_path / "ad"), base, str(tmp_path / "m"))
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(path).items() if "base_layer" not in k}, path, {"format": "pt"})
    with pytest.raises(CkptError, match="'output' has no base weight 'output.weight'.*is tied to tok_embeddings"):
        merge.run(str(tmp_path / "ad"), base, str(tmp_path / "m"))


def test_a_lora_step_loads_as_its_merged_model(run):
    from tests.test_peft import own_model, tokens

    step = lora_step(run, 12, {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "w3"]}, seed=12)
    model, view = api.load(step.uri)
    assert view.adapter is not None and view.manifest.step == 12
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), own_model(run, step.uri)(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n, extra_key, lora, match", [
    (13, "layers.0.attn.q_proj.weight", {}, "'layers.0.attn.q_proj.weight' is not a LoRA weight"),
    (14, None, {"rank": 8}, r"lora_a.weight' has shape \[4, 64\], expected \[8, 64\]"),
])
def test_bad_step_adapters_name_the_key(tmp_path, run, n, extra_key, lora, match):
    from safetensors.torch import load_file, save_file

    step = lora_step(run, n, {"rank": 4, "alpha": 8.0, "targets": ["q_proj"]})
    path = os.path.join(step.uri, "model.safetensors")
    sd = load_file(path)
    if extra_key:
        sd[extra_key] = torch.zeros(64, 64)
    save_file(sd, path, {"format": "pt"})
    step.extra["lora"].update(lora)
    manifest.write(step.uri, step)
    with pytest.raises(CkptError, match=match):
        merge.run(step.uri, "-", str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")


def test_a_torchtune_adapter_merges_like_the_same_step(tmp_path, run):
    import json

    from ckptflow import checkpointer

    step = lora_step(run, 15, {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "w2"]}, seed=15)
    d = tmp_path / "torchtune-out"
    d.mkdir()
    torch.save(checkpointer.read_tensors(step.uri, "model.safetensors"), d / "adapter_0.pt")
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA",
                                                       "target_modules": ["q_proj", "k_proj", "down_proj"]}))
    a = merge.run(str(d), os.path.join(run, "base"), str(tmp_path / "a"))
    b = merge.run(step.uri, "-", str(tmp_path / "b"))
    assert a.extra["merged"]["format"] == "torchtune"
    assert raw(a.uri) == raw(b.uri)
    with pytest.raises(CkptError, match="already has adapter"):      # same numbers, other container
        merge.run(str(d), b.uri, str(tmp_path / "c"))
    from ckptflow.stages import export

    export.run(str(d), str(tmp_path / "tt-peft"), format="peft", base=os.path.join(run, "base"))
    export.run(step.uri, str(tmp_path / "step-peft"), format="peft")
    assert raw_files(tmp_path / "tt-peft") == raw_files(tmp_path / "step-peft")


def raw_files(path):
    return {n: (path / n).read_bytes() for n in ("adapter_model.safetensors",)}
