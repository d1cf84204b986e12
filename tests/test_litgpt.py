"""litgpt checkpoints: fused qkv (current and <= v0.5.4 layouts), {"model": ...} wrappers, LoRA
files, configs. litgpt cannot share a virtualenv with transformers 5 here, so lit_model.pth and
model_config.yaml are built by tests/foreign.py from docs/formats.md."""
import os

import pytest
import torch
import yaml

import ckptflow
from ckptflow.errors import CkptError
from ckptflow.formats import registry
from ckptflow.stages import convert
from tests import foreign


def same_logits(uri, hf_model, **opts):
    model, view = ckptflow.load(uri, **opts)
    x = foreign.tokens()
    torch.testing.assert_close(foreign.logits(model, x), foreign.logits(hf_model, x), atol=foreign.ATOL, rtol=0)
    return view


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("legacy", [False, True], ids=["qkv", "legacy-attn.attn"])
def test_logits_equal_transformers(tmp_path, family, legacy):
    hf = foreign.tiny(family)
    src = foreign.write_lit(hf, str(tmp_path / "lit"), legacy=legacy)
    view = same_logits(src, hf)
    assert view.format == "litgpt" and view.family.NAME == family


def test_llama3_rope_adjustments(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = foreign.tiny("llama", rope_scaling=scaling)
    src = foreign.write_lit(hf, str(tmp_path / "lit"))
    view = same_logits(src, hf)
    assert view.args.rope_scaling == {k: v for k, v in scaling.items() if k != "rope_theta"}


def test_finetune_wrapper_and_lora_file_are_noted(tmp_path):
    hf = foreign.tiny("llama")
    src = foreign.write_lit(hf, str(tmp_path / "lit"))
    sd = torch.load(os.path.join(src, "lit_model.pth"), weights_only=True)
    torch.save({"model": sd, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}, "iter_num": 30},
               os.path.join(src, "lit_model.pth"))
    torch.save({"model": {"transformer.h.0.attn.qkv.lora_A": torch.zeros(8, 64)}}, os.path.join(src, "lit_model.pth.lora"))
    view = same_logits(src, hf)
    text = " ".join(view.notes)
    assert "optimizer" in text and "iter_num" in text and "lit_model.pth.lora" in text


def test_lora_only_directory_is_an_error(tmp_path):
    hf = foreign.tiny("llama")
    src = foreign.write_lit(hf, str(tmp_path / "lit"))
    os.rename(os.path.join(src, "lit_model.pth"), os.path.join(src, "lit_model.pth.lora"))
    assert registry.sniff(src) == "litgpt"
    with pytest.raises(CkptError, match="merge_lora"):
        ckptflow.load(src)


def test_litgpt_tune_hf_loads_in_transformers(tmp_path):
    import transformers

    hf = foreign.tiny("llama")
    src = foreign.write_lit(hf, str(tmp_path / "lit"), legacy=True)
    convert.run(src, str(tmp_path / "tune"))
    convert.run(str(tmp_path / "tune"), str(tmp_path / "hf"), to="hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = foreign.tokens()
    torch.testing.assert_close(foreign.logits(loaded, x), foreign.logits(hf, x), atol=foreign.ATOL, rtol=0)


def _config(src) -> dict:
    with open(os.path.join(src, "model_config.yaml")) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("field,value", [("parallel_residual", True), ("norm_class_name", "LayerNorm"),
                                         ("rotary_percentage", 0.25), ("n_expert", 8)])
def test_unsupported_structure_names_the_field(tmp_path, field, value):
    src = foreign.write_lit(foreign.tiny("llama"), str(tmp_path / "lit"))
    cfg = _config(src)
    cfg[field] = value
    with open(os.path.join(src, "model_config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with pytest.raises(CkptError, match=field):
        ckptflow.load(src)


def test_unknown_key_is_named(tmp_path):
    src = foreign.write_lit(foreign.tiny("llama"), str(tmp_path / "lit"))
    sd = torch.load(os.path.join(src, "lit_model.pth"), weights_only=True)
    sd["transformer.h.0.attn.norm_q.weight"] = torch.ones(16)
    torch.save(sd, os.path.join(src, "lit_model.pth"))
    with pytest.raises(CkptError, match="norm_q"):
        ckptflow.load(src)


def test_detect_reports_litgpt(tmp_path):
    hf = foreign.tiny("qwen2")
    src = foreign.write_lit(hf, str(tmp_path / "lit"), legacy=True)
    d = registry.detect(src)
    assert (d.format, d.family, d.dtype) == ("litgpt", "qwen2", "float32")
    # litgpt stores lm_head even for tied models; HF's state_dict lists the tied head too
    assert "lm_head.weight" in hf.state_dict() and hf.config.tie_word_embeddings
    want = sum(v.numel() for v in hf.state_dict().values())
    assert d.num_params == want and d.details["qkv_layout"].startswith("attn.attn")
