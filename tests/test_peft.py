"""PEFT adapters: read what peft itself saves (scales, ranks, q/k layout), write what peft loads."""
import json
import os

import pytest
import peft as peft_lib
import torch
import transformers

from ckptflow import families, lora, manifest
from ckptflow.commit import Output
from ckptflow.errors import CkptError
from ckptflow.formats import adapter, registry
from ckptflow.manifest import Manifest
from ckptflow.model_args import ModelArgs
from ckptflow.stages import convert, export
from tests import hfmodels


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=ATTN),
    "rslora": dict(r=4, lora_alpha=8, target_modules=ATTN, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=ATTN + ["gate_proj"],
                     rank_pattern={"k_proj": 2, "model.layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3}),
}


# --- helpers shared with test_merge / test_export -------------------------------------------

def peft_adapter(base_dir: str, out: str, seed: int = 0, **lora_kw):
    """An adapter made and saved by peft on the HF model at base_dir, with random (non-zero) A and B."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    pm = peft_lib.get_peft_model(model, peft_lib.LoraConfig(**lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(out)
    return pm


def lora_step(run: str, step: int, cfg: dict, seed: int = 0) -> Manifest:
    """A LoRA step checkpoint as training commits it: model.safetensors holds only the adapter."""
    from ckptflow import checkpointer

    base = manifest.require(os.path.join(run, "base"))
    args = ModelArgs.from_dict(base.model_args)
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in lora.adapter_shapes(args, lora.LoraConfig(**cfg)).items()}
    uri = os.path.join(run, "train", f"step-{step:06d}")
    out = Output(uri)
    checkpointer.write_tensors(out, "model.safetensors", sd)
    cfg = lora.LoraConfig(**cfg).to_dict()
    lineage = dict(base.lineage)
    lineage["stages"] = list(lineage.get("stages", [])) + [{"stage": "train", "method": "lora", "step": step, "uri": uri}]
    m = Manifest(kind="train_state", format="tune", family=base.family, model_args=base.model_args, dtype="float32",
                 step=step, inputs={"base": manifest.input_ref(base)}, lineage=lineage,
                 extra={"lora": cfg, "base": base.uri, "run": run})
    return out.commit(m)


def make_run(root: str, family: str = "llama", hf_dir: str | None = None, **over) -> str:
    """{run}/source (HF, saved by transformers) and {run}/base (tune)."""
    run = os.path.join(root, f"run-{family}")
    src = hf_dir or hfmodels.save(family, os.path.join(run, "source"), shard="40KB", **over)
    convert.run(src, os.path.join(run, "base"))
    return run


def own_model(run: str, step_uri: str | None):
    """ckptflow's own model at a step: the base Transformer with ckptflow.lora applied and the step's adapter."""
    from ckptflow import api, checkpointer

    model, view = api.load(os.path.join(run, "base"))
    if step_uri is not None:
        m = manifest.require(step_uri)
        lora.apply_lora(model, lora.LoraConfig.from_dict(m.extra["lora"]))
        missing = model.load_state_dict(checkpointer.read_tensors(step_uri, "model.safetensors"), strict=False)
        assert not missing.unexpected_keys
    return model.eval()


def tokens(vocab: int = 256):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


# --- reading ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hfmodels.save("llama", str(tmp_path_factory.mktemp("peft") / "llama"))


def _adapter_for(adapter_dir: str, base_dir: str):
    ad, _ = registry.open_adapter(adapter_dir, base_dir)
    return ad


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_scales_and_ranks_equal_peft_per_module(tmp_path, llama_dir, variant):
    pm = peft_adapter(llama_dir, str(tmp_path / "ad"), **VARIANTS[variant])
    ad = _adapter_for(str(tmp_path / "ad"), llama_dir)
    fam = families.get("llama")
    seen = 0
    for name, module in pm.named_modules():
        if not isinstance(getattr(module, "scaling", None), dict) or "default" not in module.scaling:
            continue
        hf_key = name.removeprefix("base_model.model.") + ".weight"
        tune_path = families.hf_key_to_tune(fam, hf_key)[0].removesuffix(".weight")
        got = ad.modules[tune_path]
        assert got.rank == module.r["default"] and got.scale == module.scaling["default"], name
        seen += 1
    assert seen == len(ad.modules) > 0


def test_qk_lora_b_rows_follow_the_base_layout(tmp_path, llama_dir):
    pm = peft_adapter(llama_dir, str(tmp_path / "ad"), **VARIANTS["plain"])
    ad = _adapter_for(str(tmp_path / "ad"), llama_dir)
    sd = pm.state_dict()
    handles = {}
    for path, heads in (("layers.0.attn.q_proj", 4), ("layers.1.attn.k_proj", 2)):
        hf_b = sd[f"base_model.model.model.{path.replace('attn', 'self_attn')}.lora_B.default.weight"]
        assert torch.equal(adapter.tensor(ad.modules[path].b, handles), families.permute_hf_to_tune(hf_b, heads))
    hf_b = sd["base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"]
    assert torch.equal(adapter.tensor(ad.modules["layers.0.attn.v_proj"].b, handles), hf_b)


def test_qwen2_lora_b_is_never_permuted(tmp_path):
    base = hfmodels.save("qwen2", str(tmp_path / "qwen"))
    pm = peft_adapter(base, str(tmp_path / "ad"), r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
    ad = _adapter_for(str(tmp_path / "ad"), base)
    hf_b = pm.state_dict()["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert ad.modules["layers.0.attn.q_proj"].b.permute is None
    assert torch.equal(adapter.tensor(ad.modules["layers.0.attn.q_proj"].b, {}), hf_b)


def _edit_config(adapter_dir: str, **changes) -> None:
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is ...]:
        del cfg[k]
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_target_modules_forms_and_tolerated_keys(tmp_path, llama_dir):
    ad_dir = str(tmp_path / "ad")
    peft_adapter(llama_dir, ad_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for tm in ("all-linear", r".*\.(q_proj|v_proj)", ["q_proj", "v_proj"]):
        _edit_config(ad_dir, target_modules=tm, some_future_key={"x": 1}, fan_in_fan_out=True)
        assert len(_adapter_for(ad_dir, llama_dir).modules) == 4
    # What torchtune writes: only peft_type, r, lora_alpha, target_modules, base_model_name_or_path.
    with open(os.path.join(ad_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, f)
    assert _adapter_for(ad_dir, llama_dir).modules["layers.0.attn.q_proj"].scale == 2.0
    _edit_config(ad_dir, target_modules=r".*\.q_proj")
    with pytest.raises(CkptError, match="v_proj.*target_modules"):
        _adapter_for(ad_dir, llama_dir)


def test_bin_adapter_reads_like_safetensors(tmp_path, llama_dir):
    pm = peft_adapter(llama_dir, str(tmp_path / "st"), **VARIANTS["plain"])
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(tmp_path / "bin")
    a, b = _adapter_for(str(tmp_path / "st"), llama_dir), _adapter_for(str(tmp_path / "bin"), llama_dir)
    assert a.content_fingerprint() == b.content_fingerprint()


def test_detect_reports_the_adapter_and_its_base(tmp_path, llama_dir):
    peft_adapter(llama_dir, str(tmp_path / "ad"), **VARIANTS["rslora"])
    d = registry.detect(str(tmp_path / "ad"))
    assert (d.format, d.family, d.dtype) == ("peft", "llama", "float32")
    assert d.details["base_model"] == llama_dir and d.details["r"] == 4 and d.details["use_rslora"] is True
    assert d.num_params == 2 * 2 * (4 * 64 + 4 * 64) + 2 * 2 * (4 * 64 + 4 * 32)


@pytest.mark.parametrize("change, match", [
    ({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "only LORA"), ({"r": 8}, "shape"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_bad_adapters_name_the_problem(tmp_path, llama_dir, change, match):
    peft_adapter(llama_dir, str(tmp_path / "ad"), **VARIANTS["plain"])
    _edit_config(str(tmp_path / "ad"), **change)
    with pytest.raises(CkptError, match=match):
        _adapter_for(str(tmp_path / "ad"), llama_dir)


def test_no_base_is_an_error_naming_it(tmp_path, llama_dir):
    peft_adapter(llama_dir, str(tmp_path / "ad"), **VARIANTS["plain"])
    _edit_config(str(tmp_path / "ad"), base_model_name_or_path="org/not-here")
    with pytest.raises(CkptError, match="org/not-here"):
        registry.open_adapter(str(tmp_path / "ad"))


# --- writing ----------------------------------------------------------------------------------

# The tune modules a LoRA run adapts per family, and how many PEFT modules that makes per layer
# (phi3: q/k/v are one fused qkv_proj, w1/w3 one gate_up_proj; MoE families: attention only).
FIVE = (["q_proj", "k_proj", "v_proj", "output_proj", "w2"], 5)
RUN_TARGETS = {
    "llama": FIVE, "qwen2": FIVE, **{f: FIVE for f in hfmodels.DENSE},
    "phi3": (["q_proj", "v_proj", "output_proj", "w1", "w3", "w2"], 4),
    "mixtral": (["q_proj", "k_proj", "v_proj", "o_proj"], 4),
    "qwen3_moe": (["all-linear"], 4),    # a mixture-of-experts model: attention only, dense layer 1 too
}


@pytest.mark.parametrize("family", list(RUN_TARGETS))
def test_written_adapter_loads_in_peft_with_ckptflow_logits(tmp_path, family):
    run = make_run(str(tmp_path), family)
    targets, per_layer = RUN_TARGETS[family]
    step = lora_step(run, 5, {"rank": 4, "alpha": 8.0, "targets": targets, "use_rslora": family in ("qwen2", "phi3")})
    export.run(step.uri, str(tmp_path / "peft"), format="peft")
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors", "ckptflow.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(run, "source"))
    pm = peft_lib.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    x = tokens()
    with torch.no_grad():
        want = own_model(run, step.uri)(x)
        got = pm(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    export.run(step.uri, str(tmp_path / "hf"), format="hf")           # ckptflow's merged HF export
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(got, merged(x).logits, atol=1e-5, rtol=0)
    with torch.no_grad(), pm.disable_adapter():
        assert (pm(x).logits - got).abs().max() > 1e-3     # the adapter is really there
    assert sum(1 for k in pm.state_dict() if "lora_" in k) == 2 * per_layer * 2


def test_convert_of_an_adapter_merges_and_records_it(tmp_path, llama_dir):
    peft_adapter(llama_dir, str(tmp_path / "a1"), seed=1, **VARIANTS["plain"])
    peft_adapter(llama_dir, str(tmp_path / "a2"), seed=2, **VARIANTS["plain"])   # same shapes, other numbers
    first = convert.run(str(tmp_path / "a1"), str(tmp_path / "out"), to="hf")
    assert [s["stage"] for s in first.lineage["stages"]] == ["merge", "convert"]
    with pytest.raises(CkptError, match="made from source .*a1.*pass --overwrite"):   # a committed model stays
        convert.run(str(tmp_path / "a2"), str(tmp_path / "out"), to="hf")
    second = convert.run(str(tmp_path / "a2"), str(tmp_path / "out"), to="hf", overwrite=True)
    assert second.inputs != first.inputs and second.files != first.files
