"""torchtune outputs across versions (docs/formats.md): file names, key namings, epochs, adapters,
recipe state. torchtune does not install beside transformers 5 here (it pins older torchao and
transformers), so every layout is built by hand from docs/formats.md and tests/foreign.py's key
tables, from a tiny transformers model whose logits are the reference."""
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

import ckptflow
from ckptflow.errors import CkptError
from ckptflow.formats import registry, torchtune
from ckptflow.stages import convert, merge
from tests import foreign


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    model = foreign.tiny("llama")
    path = str(tmp_path_factory.mktemp("base") / "hf")
    model.save_pretrained(path)
    return model, path


def same_logits(uri, hf_model, **opts):
    model, view = ckptflow.load(uri, **opts)
    x = foreign.tokens()
    torch.testing.assert_close(foreign.logits(model, x), foreign.logits(hf_model, x), atol=foreign.ATOL, rtol=0)
    return view


def halves(sd: dict) -> tuple[dict, dict]:
    keys = list(sd)
    return {k: sd[k] for k in keys[: len(keys) // 2]}, {k: sd[k] for k in keys[len(keys) // 2:]}


class _Evil:
    """A recipe_state.pt that runs code if anyone unpickles it: ckptflow must never do so."""

    def __reduce__(self):
        return (os.system, ("false",))


def recipe_state(path):
    with open(path, "wb") as f:
        pickle.dump({"optimizer": _Evil(), "epochs_run": 1, "seed": 0}, f)


def test_v01_hf_model_pt_files_need_a_config_and_then_match(tmp_path, hf):
    model, hf_dir = hf
    out = tmp_path / "out"
    out.mkdir()
    a, b = halves({k: v.clone() for k, v in model.state_dict().items()})
    torch.save(a, out / "hf_model_0001_0.pt")
    torch.save(b, out / "hf_model_0002_0.pt")
    recipe_state(out / "recipe_state.pt")
    assert registry.sniff(str(out)) == "torchtune"
    with pytest.raises(CkptError, match="--model-config"):
        ckptflow.load(str(out))
    view = same_logits(str(out), model, model_config=hf_dir)
    assert any("recipe_state.pt" in n for n in view.notes)
    convert.run(str(out), str(tmp_path / "hf"), to="hf", reader_opts={"model_config": hf_dir})
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "config.json"} <= set(os.listdir(tmp_path / "hf"))
    same_logits(str(tmp_path / "hf"), model)


def test_v02_safetensors_without_index_newest_epoch_by_default(tmp_path, hf):
    model, hf_dir = hf
    other = foreign.tiny("llama", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    for epoch, m in ((0, other), (1, model)):
        a, b = halves({k: v.clone().contiguous() for k, v in m.state_dict().items()})
        save_file(a, str(out / f"model-00001-of-00002_{epoch}.safetensors"), metadata={"format": "pt"})
        save_file(b, str(out / f"model-00002-of-00002_{epoch}.safetensors"), metadata={"format": "pt"})
    # the LoRA recipe of v0.2-v0.4 also leaves a torchtune adapter and a PEFT one in the root
    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(4, 64),
                "layers.0.attn.q_proj.lora_b.weight": torch.zeros(64, 4)}, out / "adapter_0.pt")
    torch.save({}, out / "adapter_model.bin")
    (out / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    recipe_state(out / "recipe_state.pt")
    assert registry.sniff(str(out)) == "torchtune"       # not ambiguous with the PEFT files beside it
    view = same_logits(str(out), model, model_config=str(os.path.join(hf_dir, "config.json")))
    assert any("epochs [0]" in n for n in view.notes) and any("adapter" in n for n in view.notes)
    same_logits(str(out), other, model_config=hf_dir, epoch=0)


def test_meta_model_pt_with_params_json(tmp_path, hf):
    model, _ = hf
    meta_dir = foreign.write_meta(model, str(tmp_path / "meta"))
    out = tmp_path / "out"
    out.mkdir()
    torch.save(foreign.meta_state_dict(model), out / "meta_model_0.pt")
    same_logits(str(out), model, model_config=os.path.join(meta_dir, "params.json"))


def test_torchtune_model_pt_with_config_beside_it(tmp_path, hf):
    model, hf_dir = hf
    out = tmp_path / "out"
    out.mkdir()
    torch.save(foreign.tune_state_dict(model), out / "torchtune_model_0.pt")
    shutil.copy(os.path.join(hf_dir, "config.json"), out / "config.json")
    view = same_logits(str(out), model)
    assert view.format == "torchtune"


def test_qwen2_tune_keys_keep_hf_rows(tmp_path):
    model = foreign.tiny("qwen2")
    model.save_pretrained(str(tmp_path / "hf"))
    out = tmp_path / "out"
    out.mkdir()
    torch.save(foreign.tune_state_dict(model), out / "torchtune_model_0.pt")
    same_logits(str(out), model, model_config=str(tmp_path / "hf"))


def _v05_output(tmp, model, hf_dir):
    """output_dir of torchtune 0.5/0.6 after a LoRA run: epoch_N/ HF dirs with adapters, recipe_state/."""
    out = tmp / "out"
    for epoch, m in ((0, foreign.tiny("llama", seed=2)), (1, model)):
        d = out / f"epoch_{epoch}"
        m.save_pretrained(str(d))
        os.rename(d / "model.safetensors", d / "model-00001-of-00001.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": 0}, "weight_map": {k: "model-00001-of-00001.safetensors"
                                                           for k in m.state_dict()}}))
        torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(4, 64),
                    "layers.0.attn.q_proj.lora_b.weight": torch.zeros(64, 4)}, d / "adapter_model.pt")
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
                  str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA",
                                                           "target_modules": ["q_proj"]}))
    (out / "recipe_state").mkdir()
    recipe_state(out / "recipe_state" / "recipe_state.pt")
    return out


def test_v05_output_dir_reads_the_last_epoch(tmp_path, hf):
    model, hf_dir = hf
    out = _v05_output(tmp_path, model, hf_dir)
    assert registry.sniff(str(out)) == "torchtune"
    assert registry.sniff(str(out / "epoch_1")) == "torchtune"   # HF + PEFT + adapter_model.pt: torchtune's
    view = same_logits(str(out), model)
    text = " ".join(view.notes)
    assert "epoch_0" in text and "recipe_state/recipe_state.pt" in text and "adapter" in text
    same_logits(str(out / "epoch_1"), model)


def test_step_dir_of_torchtune_main(tmp_path, hf):
    model, _ = hf
    d = tmp_path / "out" / "step_20"
    model.save_pretrained(str(d))
    recipe_state(d / "recipe_state.pt")
    view = same_logits(str(tmp_path / "out"), model)
    assert any("recipe_state.pt" in n for n in view.notes)


def test_v05_meta_checkpointer_bin_in_epoch_dir(tmp_path, hf):
    model, _ = hf
    d = tmp_path / "out" / "epoch_0"
    foreign.write_meta(model, str(d))          # params.json and tokenizer.model copied in
    os.rename(d / "consolidated.00.pth", d / "model-00001-of-00001.bin")
    assert registry.sniff(str(d)) == "torchtune"
    same_logits(str(tmp_path / "out"), model)


def test_adapter_tensors_and_merge(tmp_path, hf):
    model, hf_dir = hf
    out = tmp_path / "out"
    out.mkdir()
    g = torch.Generator().manual_seed(3)
    lora = {"layers.0.attn.q_proj.lora_a.weight": torch.randn(4, 64, generator=g),
            "layers.0.attn.q_proj.lora_b.weight": torch.randn(64, 4, generator=g),
            "layers.1.mlp.w2.lora_a.weight": torch.randn(4, 128, generator=g),
            "layers.1.mlp.w2.lora_b.weight": torch.randn(64, 4, generator=g)}
    torch.save(lora, out / "adapter_1.pt")
    items, info = torchtune.adapter_tensors(str(out))
    assert sorted(items) == sorted(lora) and info == {"rank": 4, "alpha": None}
    with pytest.raises(CkptError, match="lora_alpha"):
        registry.open_adapter(str(out), hf_dir)
    (out / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16}))
    assert torchtune.is_adapter(str(out))
    ad, base = registry.open_adapter(str(out), hf_dir)
    assert ad.format == "torchtune" and sorted(ad.modules) == ["layers.0.attn.q_proj", "layers.1.mlp.w2"]
    merged, _ = ckptflow.load_state_dict(str(out), base=hf_dir)        # adapter-only dir: merged on the base
    want, _ = ckptflow.load_state_dict(hf_dir)
    for mod in ("layers.0.attn.q_proj", "layers.1.mlp.w2"):
        delta = 16 / 4 * lora[mod + ".lora_b.weight"] @ lora[mod + ".lora_a.weight"]
        torch.testing.assert_close(merged[mod + ".weight"], want[mod + ".weight"] + delta, atol=1e-6, rtol=0)
    assert torch.equal(merged["layers.0.attn.k_proj.weight"], want["layers.0.attn.k_proj.weight"])
    m = merge.run(str(out), hf_dir, str(tmp_path / "merged"))
    assert m.extra["merged"]["format"] == "torchtune"


def test_adapter_only_dir_without_a_base_is_an_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(4, 64),
                "layers.0.attn.q_proj.lora_b.weight": torch.zeros(64, 4)}, out / "adapter_0.pt")
    with pytest.raises(CkptError, match="only a torchtune LoRA adapter"):
        ckptflow.load(str(out))


def test_unknown_keys_are_named(tmp_path, hf):
    model, hf_dir = hf
    out = tmp_path / "out"
    out.mkdir()
    sd = foreign.tune_state_dict(model)
    sd["layers.0.attn.qkv.weight"] = sd.pop("layers.0.attn.q_proj.weight")
    torch.save(sd, out / "torchtune_model_0.pt")
    with pytest.raises(CkptError, match="layers.0.attn.qkv.weight"):
        ckptflow.load(str(out), model_config=hf_dir)


def test_detect_reports_the_model_it_would_read(tmp_path, hf):
    model, hf_dir = hf
    out = _v05_output(tmp_path, model, hf_dir)
    d = registry.detect(str(out))
    assert (d.format, d.family, d.dtype) == ("torchtune", "llama", "float32")
    assert d.num_params == sum(v.numel() for v in model.state_dict().values())
    assert d.details["recipe_state"] and d.details["adapter"]
