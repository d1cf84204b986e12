"""Export: HF that transformers loads with ckptflow's logits, PEFT that peft loads, exact dtype casts,
tied Qwen2 without lm_head, lineage in ckptflow.json, Meta <-> HF round trips."""
import json
import os

import pytest
import peft as peft_lib
import torch
import transformers
from safetensors import safe_open

from ckptflow import api, cli, families, manifest
from ckptflow.errors import CkptError
from ckptflow.stages import download, export, merge
from tests.test_convert import flip_a_byte
from tests.test_peft import lora_step, make_run, own_model, tokens


LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "output_proj", "w1"]}


def hf_logits(path, x):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(x).logits


def st_keys(path):
    """{file: [keys in header order]} of every safetensors file in an HF directory."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out[name] = list(f.keys())
    return out


def tensors(path):
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = make_run(str(tmp_path_factory.mktemp("export")))
    lora_step(r, 10, LORA, seed=1)
    lora_step(r, 20, LORA, seed=2)
    return r


def test_hf_export_of_a_lora_run_loads_with_ckptflow_logits(tmp_path, run):
    m = export.run(run, str(tmp_path / "hf"), format="hf")
    assert (m.kind, m.format, m.step) == ("export", "hf", 20)        # the newest step
    src, out = os.path.join(run, "source"), str(tmp_path / "hf")
    assert st_keys(out) == st_keys(src)                              # same partition and key order
    assert sorted(set(os.listdir(src)) - {"ckptflow.json"}) == sorted(set(os.listdir(out)) - {"ckptflow.json"})
    with open(os.path.join(src, "model.safetensors.index.json")) as f, \
            open(os.path.join(out, "model.safetensors.index.json")) as g:
        assert json.load(f)["weight_map"] == json.load(g)["weight_map"]
    x = tokens()
    with torch.no_grad():
        want = own_model(run, os.path.join(run, "train", "step-000020"))(x)
        base = own_model(run, None)(x)
    got = hf_logits(out, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-3                           # the step's adapter is in there


def test_step_option_original_format_and_lineage(tmp_path, run, capsys):
    m = export.run(run, str(tmp_path / "e"), step=10)
    assert (m.format, m.step) == ("hf", 10)
    x = tokens()
    with torch.no_grad():
        want = own_model(run, os.path.join(run, "train", "step-000010"))(x)
    torch.testing.assert_close(hf_logits(str(tmp_path / "e"), x), want, atol=1e-5, rtol=0)
    lin = manifest.require(str(tmp_path / "e")).lineage
    assert lin["source"] == os.path.join(run, "source") and "revision" in lin
    assert (lin["run"], lin["step"], lin["dtype"]) == (run, 10, "float32")
    assert [s["stage"] for s in lin["stages"]] == ["convert", "train", "merge", "export"]
    assert lin["stages"][-1]["to"] == "hf"
    assert cli.main(["inspect", str(tmp_path / "e")]) == 0
    text = capsys.readouterr().out
    assert f"run: {run} step: 10 dtype: float32" in text and "stage=merge" in text and "stage=export" in text
    with pytest.raises(CkptError, match="no committed checkpoint for step 30"):
        export.run(run, str(tmp_path / "x"), step=30)
    again = export.run(run, str(tmp_path / "e"), step=10)
    assert again.created == m.created                                # idempotent


def test_peft_export_merges_in_peft_like_ckptflow_merge(tmp_path, run):
    step = os.path.join(run, "train", "step-000020")
    export.run(run, str(tmp_path / "peft"), format="peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(run, "source"))
    pm = peft_lib.PeftModel.from_pretrained(hf, str(tmp_path / "peft"))
    peft_merged = pm.merge_and_unload().state_dict()
    merge.run(step, "-", str(tmp_path / "merged"))
    export.run(str(tmp_path / "merged"), str(tmp_path / "merged-hf"))
    ours = tensors(str(tmp_path / "merged-hf"))
    assert ours.keys() == peft_merged.keys()
    for k, v in ours.items():
        torch.testing.assert_close(peft_merged[k], v, atol=1e-6, rtol=0, msg=k)
    cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == os.path.join(run, "source") and cfg["r"] == 4


def test_bfloat16_export_is_the_exact_cast(tmp_path, run):
    export.run(run, str(tmp_path / "f32"), format="hf")
    m = export.run(run, str(tmp_path / "bf16"), format="hf", dtype="bfloat16")
    assert m.dtype == "bfloat16" and m.lineage["dtype"] == "bfloat16"
    f32, bf16 = tensors(str(tmp_path / "f32")), tensors(str(tmp_path / "bf16"))
    assert f32.keys() == bf16.keys()
    for k in f32:
        assert bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], f32[k].bfloat16()), k
    cfg = json.load(open(tmp_path / "bf16" / "config.json"))
    assert families.hf_dtype(cfg) == "bfloat16"
    x = tokens()
    got = hf_logits(str(tmp_path / "bf16"), x)
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa; through 2 layers the logits (|x| < 1) move by a few 1e-3.
    torch.testing.assert_close(got.float(), hf_logits(str(tmp_path / "f32"), x), atol=2e-2, rtol=0)


def test_tied_qwen2_export_has_no_lm_head_and_loads(tmp_path):
    r = make_run(str(tmp_path), "qwen2")
    step = lora_step(r, 3, {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "w2"]}, seed=4)
    export.run(step.uri, str(tmp_path / "hf"))
    keys = [k for ks in st_keys(str(tmp_path / "hf")).values() for k in ks]
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert json.load(open(tmp_path / "hf" / "config.json"))["tie_word_embeddings"] is True
    x = tokens()
    with torch.no_grad():
        want = own_model(r, step.uri)(x)
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf"), x), want, atol=1e-5, rtol=0)


def test_full_finetune_step_exports_in_its_own_dtype(tmp_path):
    from ckptflow import checkpointer
    from ckptflow.commit import Output
    from ckptflow.manifest import Manifest

    r = make_run(str(tmp_path), dtype=torch.bfloat16)
    base = manifest.require(os.path.join(r, "base"))
    sd = {k: v.float() + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
          for k, v in api.load_state_dict(base.uri)[0].items()}
    uri = os.path.join(r, "train", "step-000004")
    out = Output(uri)
    checkpointer.write_tensors(out, "model.safetensors", sd)
    out.commit(Manifest(kind="train_state", format="tune", family=base.family, model_args=base.model_args,
                        dtype="float32", step=4, inputs={"base": manifest.input_ref(base)}, lineage=base.lineage,
                        extra={"lora": None, "base": base.uri, "run": r,
                               "layout": [{"name": "model.safetensors", "keys": list(sd)}],
                               "original": base.extra["original"]}))
    m = export.run(r, str(tmp_path / "hf"))
    assert m.dtype == "float32"
    assert families.hf_dtype(json.load(open(tmp_path / "hf" / "config.json"))) == "float32"
    from ckptflow.model import Transformer

    ours = Transformer.from_state_dict(api.load_state_dict(base.uri)[1].args, sd).eval()
    x = tokens()
    with torch.no_grad():
        want = ours(x)
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf"), x), want, atol=1e-5, rtol=0)


def test_seed_lineage_names_the_source_and_revision(tmp_path):
    src = str(tmp_path / "src")
    download.run("seed://llama?dim=64&n_layers=2", src)
    r = make_run(str(tmp_path), hf_dir=src)
    lora_step(r, 2, {"rank": 2, "alpha": 2.0, "targets": ["v_proj"]})
    m = export.run(r, str(tmp_path / "out"), dtype="bfloat16")
    lin = m.lineage
    assert (lin["source"], lin["revision"], lin["step"], lin["dtype"]) == ("seed://llama?dim=64&n_layers=2", "seed",
                                                                          2, "bfloat16")
    assert [s["stage"] for s in lin["stages"]] == ["convert", "train", "merge", "export"]
    names = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))


def test_bad_requests_are_one_clear_error(tmp_path, run):
    with pytest.raises(CkptError, match="peft format needs a LoRA adapter"):
        export.run(os.path.join(run, "base"), str(tmp_path / "p"), format="peft")
    with pytest.raises(CkptError, match="no tokenizer.json or tokenizer.model"):   # GGUF carries the tokenizer
        export.run(run, str(tmp_path / "g"), format="gguf")
    assert not os.path.exists(tmp_path / "g")
    with pytest.raises(CkptError, match="--step 10 needs a run"):
        export.run(os.path.join(run, "base"), str(tmp_path / "s"), step=10)
    assert cli.main(["export", run, str(tmp_path / "c"), "--format", "peft", "--json"]) == 0
    assert manifest.require(str(tmp_path / "c")).format == "peft"


def test_meta_and_hf_round_trip_to_the_same_tensors(tmp_path, run):
    hf = os.path.join(run, "source")
    export.run(hf, str(tmp_path / "meta"), format="meta")
    export.run(str(tmp_path / "meta"), str(tmp_path / "hf"), format="hf")
    want, got = tensors(hf), tensors(str(tmp_path / "hf"))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # and the tune tensors read from the Meta files equal those read from HF
    a, b = api.load_state_dict(str(tmp_path / "meta"))[0], api.load_state_dict(hf)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_peft_adapter_exports_as_itself_or_merged(tmp_path):
    from tests import hfmodels
    from tests.test_peft import peft_adapter

    base = hfmodels.save("mistral", str(tmp_path / "base"))
    pm = peft_adapter(base, str(tmp_path / "ad"), r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                      rank_pattern={"down_proj": 2}, use_rslora=True)
    m = export.run(str(tmp_path / "ad"), str(tmp_path / "same"))              # original = peft
    assert m.format == "peft"
    assert tensors(str(tmp_path / "ad")).keys() == tensors(str(tmp_path / "same")).keys()
    for k, v in tensors(str(tmp_path / "ad")).items():
        assert torch.equal(v, tensors(str(tmp_path / "same"))[k]), k       # q/k lora_B un-permuted exactly
    cfg = json.load(open(tmp_path / "same" / "adapter_config.json"))
    assert (cfg["r"], cfg["use_rslora"], cfg["rank_pattern"]) == (4, True, {f"model.layers.{i}.mlp.down_proj": 2
                                                                             for i in range(2)})
    export.run(str(tmp_path / "ad"), str(tmp_path / "hf"), format="hf")      # base from base_model_name_or_path
    x = tokens()
    with torch.no_grad():
        want = pm.eval()(x).logits
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf"), x), want, atol=1e-5, rtol=0)


def test_a_meta_sourced_lora_run_exports_meta_as_original(tmp_path, run):
    export.run(os.path.join(run, "source"), str(tmp_path / "meta"), format="meta")
    r = make_run(str(tmp_path), hf_dir=str(tmp_path / "meta"))
    step = lora_step(r, 6, LORA, seed=6)
    m = export.run(r, str(tmp_path / "out"))
    assert m.format == "meta" and m.lineage["stages"][-1]["to"] == "meta"
    merged = merge.run(step.uri, "-", str(tmp_path / "merged"))
    got, want = api.load_state_dict(str(tmp_path / "out"))[0], api.load_state_dict(merged.uri)[0]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    x = tokens()
    export.run(r, str(tmp_path / "hf"), format="hf")
    with torch.no_grad():
        ref = own_model(r, step.uri)(x)
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf"), x), ref, atol=1e-5, rtol=0)


def test_export_refuses_to_merge_a_step_into_a_model_that_has_it(tmp_path, run):
    step = os.path.join(run, "train", "step-000010")
    merge.run(step, "-", str(tmp_path / "merged"))
    with pytest.raises(CkptError, match="already has adapter"):
        export.run(step, str(tmp_path / "out"), base=str(tmp_path / "merged"))


# --- the fused and mixture-of-experts families ---------------------------------------------------

FAMILY_LORA = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj"], "mixtral": ["q_proj", "v_proj", "o_proj"],
               "qwen3_moe": ["all-linear"]}


@pytest.mark.parametrize("family", list(FAMILY_LORA))
def test_peft_export_loads_in_peft_with_the_merged_hf_export_logits(tmp_path, family):
    r = make_run(str(tmp_path), family)
    lora_step(r, 10, {"rank": 4, "alpha": 8.0, "targets": FAMILY_LORA[family]}, seed=1)
    export.run(r, str(tmp_path / "peft"), format="peft")
    export.run(r, str(tmp_path / "hf"), format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(r, "source"))
    pm = peft_lib.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    x = tokens()
    with torch.no_grad():
        got = pm(x).logits
    want = hf_logits(str(tmp_path / "hf"), x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - hf_logits(os.path.join(r, "source"), x)).abs().max() > 1e-3     # the adapter is in there


def test_a_fused_phi3_peft_adapter_exports_as_itself(tmp_path):
    from tests import hfmodels
    from tests.test_peft import peft_adapter

    base = hfmodels.save("phi3", str(tmp_path / "base"))
    pm = peft_adapter(base, str(tmp_path / "ad"), r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"],
                      rank_pattern={"model.layers.1.self_attn.qkv_proj": 2})
    export.run(str(tmp_path / "ad"), str(tmp_path / "same"), format="peft")
    want, got = tensors(str(tmp_path / "ad")), tensors(str(tmp_path / "same"))
    assert want.keys() == got.keys() and all(torch.equal(v, got[k]) for k, v in want.items())   # shared lora_A
    cfg = json.load(open(tmp_path / "same" / "adapter_config.json"))
    assert cfg["rank_pattern"] == {"model.layers.1.self_attn.qkv_proj": 2}
    export.run(str(tmp_path / "ad"), str(tmp_path / "hf"), format="hf")
    x = tokens()
    with torch.no_grad():
        want_logits = pm.eval()(x).logits
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf"), x), want_logits, atol=1e-5, rtol=0)


def test_a_damaged_committed_model_is_not_exported(tmp_path):
    r = make_run(str(tmp_path / "run"))
    base = manifest.require(os.path.join(r, "base"))
    shard = next(n for n in base.files if n.endswith(".safetensors"))
    flip_a_byte(os.path.join(base.uri, shard))
    with pytest.raises(CkptError, match=rf"{shard}: sha256 mismatch: the source does not match"):
        export.run(base.uri, str(tmp_path / "hf"), format="hf")
    assert not os.path.exists(tmp_path / "hf")


def test_a_runs_damaged_newest_step_is_skipped_for_the_one_before(tmp_path, caplog):
    r = make_run(str(tmp_path / "run"))
    lora_step(r, 10, LORA, seed=1)
    lora_step(r, 20, LORA, seed=2)
    newest = manifest.require(os.path.join(r, "train", "step-000020"))
    name = next(n for n in newest.files if n.endswith(".safetensors"))
    flip_a_byte(os.path.join(newest.uri, name))
    m = export.run(r, str(tmp_path / "hf"), format="hf")
    assert m.step == 10
    assert "step-000020: skipping a damaged checkpoint" in caplog.text
    with pytest.raises(CkptError, match="sha256 mismatch"):      # asked for by number: no substitute
        export.run(r, str(tmp_path / "hf20"), format="hf", step=20)
    assert not os.path.exists(tmp_path / "hf20")
