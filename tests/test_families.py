"""Family registry, key tables, the q/k permute and config.json <-> ModelArgs."""
import copy
import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from ckptflow import families
from ckptflow.errors import CkptError
from ckptflow.families import UnknownKeyError
from tests.hfmodels import DENSE


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, intermediate_size=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
HF_CONFIGS = {
    "llama": ("llama", {}),
    "llama3_2": ("llama", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    **DENSE,
}


def hf_config(name: str) -> dict:
    model_type, kw = HF_CONFIGS[name]
    return transformers.AutoConfig.for_model(model_type, **{**TINY, **kw})


def saved_json(name: str, tmp_path) -> dict:
    """config.json as the installed transformers saves it (v5 schema on 5.x, v4 schema on 4.x)."""
    config = hf_config(name)
    config.torch_dtype = torch.bfloat16  # saved only when set ("dtype" on >= 4.56)
    config.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def to_v4(cfg: dict) -> dict:
    """The same config in the transformers 4.x schema: top-level rope_theta / rope_scaling, torch_dtype."""
    if "rope_parameters" not in cfg:
        return {k: v for k, v in cfg.items() if k != "dtype"} | {"torch_dtype": cfg.get("torch_dtype") or cfg["dtype"]}
    out = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(cfg["rope_parameters"])
    if "full_attention" in rope:  # gemma3: per layer type; 4.x named the sliding layers' theta apart
        out["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = dict(rope["full_attention"])
    out["rope_theta"] = rope.pop("rope_theta")
    out["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    return out | {"torch_dtype": cfg["dtype"]}


def to_v5(cfg: dict) -> dict:
    """The same config in the transformers 5.x schema: rope_parameters holding rope_theta, dtype."""
    if "rope_parameters" in cfg:
        return cfg
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    rope = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
    rope["rope_type"] = rope.pop("type", None) or rope["rope_type"]
    out["rope_parameters"] = rope | {"rope_theta": cfg.get("rope_theta", 10000.0)}
    return out | {"dtype": cfg.get("dtype") or cfg["torch_dtype"]}


# A Llama 3.1 config.json as transformers 4.x wrote it (rope_scaling, torch_dtype, null head_dim-free).
LLAMA31_V4 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
QWEN25_V4 = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
MISTRAL_V01_V4 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
LLAMA2_OLD = {  # before head_dim, rope_theta and rope_type existed; linear scaling spelled with "type"
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "float16", "vocab_size": 32000,
}
# The newer families' released config.json files as transformers 4.x wrote them (sizes as released).
QWEN3_06B_V4 = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
GEMMA_2B_V4 = {
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0",
    "use_cache": True, "vocab_size": 256000,
}
GEMMA2_2B_V4 = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
    "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000,
}
GEMMA3_1B_V4 = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}
OLMO2_1B_V4 = {
    "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 16,
    "num_hidden_layers": 16, "num_key_value_heads": 16, "pad_token_id": 100277, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.48.0", "use_cache": True, "vocab_size": 100352,
}
SMOLLM3_3B_V4 = {
    "architectures": ["SmolLM3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "eos_token_id": 128012, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 65536, "max_window_layers": 28, "mlp_bias": False,
    "model_type": "smollm3", "no_rope_layer_interval": 4, "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)],
    "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 4, "pad_token_id": 128004,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000.0, "sliding_window": None,
    "torch_dtype": "bfloat16", "transformers_version": "4.54.0.dev0", "use_cache": False, "use_sliding_window": False,
    "vocab_size": 128256,
}
V4_CONFIGS = {"llama3.1": LLAMA31_V4, "qwen2.5": QWEN25_V4, "mistral-v0.1": MISTRAL_V01_V4, "llama2": LLAMA2_OLD,
              "qwen3-0.6b": QWEN3_06B_V4, "gemma-2b": GEMMA_2B_V4, "gemma-2-2b": GEMMA2_2B_V4,
              "gemma-3-1b": GEMMA3_1B_V4, "olmo-2-1b": OLMO2_1B_V4, "smollm3-3b": SMOLLM3_3B_V4}


# --- config.json <-> ModelArgs -------------------------------------------------------------------


def test_args_from_v4_llama31():
    args = families.for_hf_config(LLAMA31_V4).args_from_hf(LLAMA31_V4)
    shape = (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.hd, args.hidden_dim)
    assert shape == (4096, 32, 32, 8, 128, 14336)
    assert args.rope_theta == 500000.0 and args.rope_scaling == {**LLAMA31_V4["rope_scaling"]}
    assert args.rope_interleaved and not args.qkv_bias and not args.tie_embeddings
    assert args.extra == {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}


def test_family_specific_args():
    qwen = families.for_hf_config(QWEN25_V4).args_from_hf(QWEN25_V4)
    assert qwen.qkv_bias and not qwen.attn_out_bias and qwen.tie_embeddings and not qwen.rope_interleaved
    assert qwen.hd == 64 and qwen.head_dim is None
    assert families.get("mistral").args_from_hf(MISTRAL_V01_V4).extra["sliding_window"] == 4096
    old = families.get("llama").args_from_hf(LLAMA2_OLD)
    assert old.rope_theta == 10000.0 and old.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert old.n_kv_heads is None and old.kv_heads == 32


def test_released_configs_of_the_newer_families_read_as_released():
    qwen3 = families.for_hf_config(QWEN3_06B_V4).args_from_hf(QWEN3_06B_V4)
    assert (qwen3.hd, qwen3.dim // qwen3.n_heads, qwen3.qk_norm, qwen3.tie_embeddings) == (128, 64, "head", True)
    gemma = families.for_hf_config(GEMMA_2B_V4).args_from_hf(GEMMA_2B_V4)
    assert (gemma.mlp_act, gemma.norm_offset, gemma.embed_scale, gemma.tie_embeddings) == ("gelu_tanh", True, True, True)
    g2 = families.for_hf_config(GEMMA2_2B_V4).args_from_hf(GEMMA2_2B_V4)
    assert (g2.attn_softcap, g2.final_softcap, g2.attn_scalar, g2.extra["sliding_window"]) == (50.0, 30.0, 256.0, 4096)
    assert g2.layer_types[:3] == ["sliding_attention", "full_attention", "sliding_attention"] and g2.post_norms
    g3 = families.for_hf_config(GEMMA3_1B_V4).args_from_hf(GEMMA3_1B_V4)
    assert g3.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"] and len(g3.layer_types) == 26
    assert (g3.rope_theta, g3.rope_local_theta, g3.extra["sliding_window"], g3.final_softcap) == (1e6, 1e4, 512, None)
    olmo = families.for_hf_config(OLMO2_1B_V4).args_from_hf(OLMO2_1B_V4)
    assert (olmo.qk_norm, olmo.pre_norms, olmo.post_norms, olmo.head_dim) == ("proj", False, True, None)
    smol = families.for_hf_config(SMOLLM3_3B_V4).args_from_hf(SMOLLM3_3B_V4)
    assert smol.no_rope_layers == list(range(3, 36, 4)) and smol.tie_embeddings


@pytest.mark.parametrize("change, match", [
    ({"layer_types": ["sliding_attention"] * 3}, r"layer_types has 3 entries, num_hidden_layers is 26"),
    ({"layer_types": ["chunked_attention"] * 26}, r"layer_types entry 'chunked_attention'"),
    ({"hidden_activation": "relu"}, r"hidden_activation 'relu' is not supported"),
    ({"use_bidirectional_attention": True}, r"use_bidirectional_attention"),
])
def test_bad_gemma3_configs_name_the_key(change, match):
    with pytest.raises(CkptError, match=match):
        families.get("gemma3_text").args_from_hf({**GEMMA3_1B_V4, **change})


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_v4_and_v5_schemas_give_the_same_args(name, tmp_path):
    v4, v5 = to_v4(saved_json(name, tmp_path)), to_v5(saved_json(name, tmp_path))
    assert "rope_parameters" in v5 and "rope_theta" in v4 and "torch_dtype" in v4
    family = families.for_hf_config(v5)
    assert family.args_from_hf(v4) == family.args_from_hf(v5)


@pytest.mark.parametrize("name", list(V4_CONFIGS))
def test_hf_config_like_v4_is_unchanged(name):
    config = V4_CONFIGS[name]
    family = families.for_hf_config(config)
    assert family.hf_config(family.args_from_hf(config), like=config) == config


@pytest.mark.parametrize("schema", [to_v4, to_v5])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_config_like_saved_is_unchanged(name, schema, tmp_path):
    config = schema(saved_json(name, tmp_path))
    family = families.for_hf_config(config)
    assert family.hf_config(family.args_from_hf(config), like=copy.deepcopy(config)) == config


def test_hf_config_like_changes_only_what_changed(tmp_path):
    llama = families.get("llama")
    args = llama.args_from_hf(LLAMA31_V4)
    out = llama.hf_config(dataclasses.replace(args, n_layers=3, rope_theta=1e6), like=LLAMA31_V4, dtype="float16")
    changed = {k for k in out if out[k] != LLAMA31_V4.get(k)}
    assert changed == {"num_hidden_layers", "rope_theta", "torch_dtype"} and "dtype" not in out
    v5 = to_v5(saved_json("llama3_2", tmp_path))
    args = llama.args_from_hf(v5)
    out = llama.hf_config(dataclasses.replace(args, rope_theta=1e6), like=v5, dtype="float16")
    assert {k for k in out if out[k] != v5.get(k)} == {"rope_parameters", "dtype"}
    assert out["rope_parameters"] == {**v5["rope_parameters"], "rope_theta": 1e6} and "rope_theta" not in out
    no_dtype = {k: v for k, v in v5.items() if k != "dtype"}
    assert llama.hf_config(args, like=no_dtype, dtype="float16") == {**no_dtype, "dtype": "float16"}


def test_importing_families_does_not_import_torch():
    code = "import sys, ckptflow.families; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def resolved(args):
    """None head_dim / n_kv_heads mean derived values; compare what the model will use."""
    return dataclasses.replace(args, head_dim=args.hd, n_kv_heads=args.kv_heads)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_config_from_scratch_reads_back_in_transformers(name, tmp_path):
    family = families.for_hf_config({"model_type": HF_CONFIGS[name][0]})
    args = family.args_from_hf(saved_json(name, tmp_path))
    written = family.hf_config(args, dtype="bfloat16")
    assert written["rope_theta"] == args.rope_theta and written["torch_dtype"] == written["dtype"] == "bfloat16"
    read = transformers.AutoConfig.for_model(**written)
    assert resolved(family.args_from_hf(read.to_dict())) == resolved(args)
    assert str(getattr(read, "dtype", None) or read.torch_dtype).endswith("bfloat16")


def test_config_errors_name_the_file_and_field():
    with pytest.raises(CkptError, match=r"x/config\.json: rope_type 'yarn' is not supported"):
        families.get("qwen2").args_from_hf({**QWEN25_V4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                                           where="x/config.json")
    with pytest.raises(CkptError, match=r"config\.json: missing \['intermediate_size'\]"):
        families.get("llama").args_from_hf({k: v for k, v in LLAMA31_V4.items() if k != "intermediate_size"})
    with pytest.raises(CkptError, match=r"needs \['low_freq_factor'\]"):
        rope = {k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}
        families.get("llama").args_from_hf({**LLAMA31_V4, "rope_scaling": rope})
    with pytest.raises(CkptError, match="qkv_bias"):
        qwen2 = families.get("qwen2")
        qwen2.hf_config(dataclasses.replace(qwen2.args_from_hf(QWEN25_V4), qkv_bias=False))


# --- registry -----------------------------------------------------------------------------------


def test_dispatch_is_on_model_type_and_unknowns_are_named():
    assert families.for_hf_config({"model_type": "qwen2", "architectures": ["LlamaForCausalLM"]}).NAME == "qwen2"
    with pytest.raises(CkptError, match=r"runs/a/config\.json: model_type 'gpt2' is not supported"):
        families.for_hf_config({"model_type": "gpt2"}, where="runs/a/config.json")
    with pytest.raises(CkptError, match="unknown model family 'falcon'"):
        families.get("falcon")
    with pytest.raises(KeyError):
        families.get("falcon")


def toy_family():
    """A family written the way a user would: a module with the required names."""
    toy = types.ModuleType("toy")
    toy.NAME, toy.MODEL_TYPES, toy.ROPE_INTERLEAVED = "toy", ("toy_lm",), True
    toy.HF_TO_TUNE = {
        "wte.weight": "tok_embeddings.weight",
        "h.{}.ln1.weight": "layers.{}.sa_norm.scale",
        "h.{}.attn.wq.weight": "layers.{}.attn.q_proj.weight",
        "h.{}.attn.wk.weight": "layers.{}.attn.k_proj.weight",
        "h.{}.attn.wv.weight": "layers.{}.attn.v_proj.weight",
        "h.{}.attn.rope.freqs": None,
    }
    toy.PEFT_TARGETS = {"q_proj": "wq", "v_proj": "wv"}
    toy.args_from_hf = lambda config, where="config.json": None
    toy.hf_config = lambda args, like=None, dtype=None: {}
    return toy


@pytest.fixture
def toy():
    module = toy_family()
    families.register(module)
    yield module
    families.FAMILIES.pop(module.NAME)


def test_registering_a_family_makes_it_dispatchable(toy):
    assert families.for_hf_config({"model_type": "toy_lm"}) is toy and families.get("toy") is toy
    assert families.hf_key_to_tune(toy, "h.11.attn.wq.weight") == ("layers.11.attn.q_proj.weight", "q")
    assert families.hf_key_to_tune(toy, "h.3.attn.wv.weight") == ("layers.3.attn.v_proj.weight", None)
    assert families.hf_key_to_tune(toy, "h.0.attn.rope.freqs") == (None, None)
    assert families.tune_key_to_hf(toy, "layers.7.attn.k_proj.weight") == ("h.7.attn.wk.weight", "k")
    with pytest.raises(UnknownKeyError, match=r"'h\.0\.mlp\.fc\.weight' in shard-1\.safetensors is not in the toy"):
        families.hf_key_to_tune(toy, "h.0.mlp.fc.weight", where="shard-1.safetensors")


def test_registry_refuses_incomplete_or_clashing_families():
    incomplete = types.ModuleType("half")
    incomplete.NAME = "half"
    with pytest.raises(CkptError, match="lacks"):
        families.register(incomplete)
    clash = toy_family()
    clash.NAME, clash.MODEL_TYPES = "llama_fork", ("llama",)
    with pytest.raises(CkptError, match="already belongs to 'llama'"):
        families.register(clash)
    assert "llama_fork" not in families.FAMILIES


# --- key tables and state dicts -----------------------------------------------------------------


def hf_state_dict(name: str, dtype=torch.float32) -> dict:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name))
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # save_pretrained stores the tied head once
        sd.pop("lm_head.weight")
    return sd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_tune_hf_round_trip_is_bit_exact(name, dtype):
    sd = hf_state_dict(name, dtype)
    family = families.for_hf_config({"model_type": HF_CONFIGS[name][0]})
    args = family.args_from_hf(hf_config(name).to_dict())
    tune = families.hf_state_dict_to_tune(sd, family, args)
    assert "output.weight" not in tune if args.tie_embeddings else "output.weight" in tune
    back = families.tune_state_dict_to_hf(tune, family, args)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == dtype for k in sd)
    q = tune["layers.0.attn.q_proj.weight"]
    assert torch.equal(q, sd["model.layers.0.self_attn.q_proj.weight"]) is (not family.ROPE_INTERLEAVED)


def test_tied_hf_state_dict_drops_lm_head_and_old_inv_freq():
    family = families.get("qwen2")
    args = family.args_from_hf(hf_config("qwen2_tied").to_dict())
    sd = {"model.embed_tokens.weight": torch.ones(2), "lm_head.weight": torch.ones(2),
          "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}
    assert list(families.hf_state_dict_to_tune(sd, family, args)) == ["tok_embeddings.weight"]


def test_unknown_key_names_the_key_and_file():
    family = families.get("llama")
    args = family.args_from_hf(LLAMA31_V4)
    named = r"'model\.layers\.3\.self_attn\.qkv_proj\.weight' in a\.safetensors"
    with pytest.raises(UnknownKeyError, match=named) as e:
        families.hf_state_dict_to_tune({"model.layers.3.self_attn.qkv_proj.weight": torch.ones(1)}, family, args,
                                       where="a.safetensors")
    assert isinstance(e.value, ValueError) and isinstance(e.value, CkptError)
    with pytest.raises(UnknownKeyError, match=r"'layers\.0\.attn\.q_proj\.lora_a\.weight'"):
        families.tune_key_to_hf(family, "layers.0.attn.q_proj.lora_a.weight")


def test_peft_targets_cover_the_lora_modules():
    attention = {"q_proj", "k_proj", "v_proj", "output_proj", "output"}
    for family in families.FAMILIES.values():
        # MoE families: PEFT's LoRA layers do not wrap transformers' grouped expert parameters.
        mlp = set() if family.NAME in ("mixtral", "qwen3_moe") else {"w1", "w2", "w3"}
        assert set(family.PEFT_TARGETS) >= attention | mlp, family.NAME


# --- the q/k permute ----------------------------------------------------------------------------


def test_permute_matches_the_documented_index_map():
    n, hd = 2, 8
    hf = torch.arange(n * hd * 3, dtype=torch.float32).reshape(n * hd, 3)
    meta = families.permute_hf_to_tune(hf, n)
    for h in range(n):
        for j in range(hd // 2):  # HF_row[h*hd + j] = Meta_row[h*hd + 2j], HF_row[h*hd + hd/2 + j] = Meta_row[.. + 1]
            assert torch.equal(hf[h * hd + j], meta[h * hd + 2 * j])
            assert torch.equal(hf[h * hd + hd // 2 + j], meta[h * hd + 2 * j + 1])
    assert torch.equal(families.permute_tune_to_hf(meta, n), hf)


def test_permute_on_bf16_bytes_and_numpy_equals_permute_on_tensor():
    w = torch.randn(4 * 16, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = families.permute_hf_to_tune(w, 4)
    raw = w.view(torch.uint8).numpy()  # [rows, row_bytes]
    got = families.permute_hf_to_tune(raw, 4)
    assert isinstance(got, np.ndarray) and got.flags.c_contiguous and got.shape == raw.shape
    assert np.array_equal(got, want.view(torch.uint8).numpy())
    assert np.array_equal(families.permute_tune_to_hf(got, 4), raw)
    bias = torch.randn(2 * 16)
    assert np.array_equal(families.permute_hf_to_tune(bias.numpy(), 2), families.permute_hf_to_tune(bias, 2).numpy())
    assert families.permute_hf_to_tune(w.t().contiguous().t(), 4).is_contiguous()


def test_permute_refuses_rows_that_do_not_split_into_heads():
    with pytest.raises(CkptError, match="cannot permute 30 rows into 4 heads"):
        families.permute_hf_to_tune(torch.ones(30, 2), 4)


# --- phi3, mixtral, qwen3_moe: config.json both ways ------------------------------------------

NEW = ["phi3", "mixtral", "qwen3_moe"]


def new_family_config(name: str, tmp_path) -> dict:
    from tests import hfmodels

    hfmodels.config(name).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("name", NEW)
def test_new_family_config_like_saved_is_unchanged_and_from_scratch_reads_back(name, tmp_path):
    saved = new_family_config(name, tmp_path)
    family = families.for_hf_config(saved)
    args = family.args_from_hf(saved)
    assert family.hf_config(args, like=copy.deepcopy(saved)) == saved
    written = family.hf_config(args, dtype="float32")
    read = transformers.AutoConfig.for_model(**written)
    assert resolved(family.args_from_hf(read.to_dict())) == resolved(args)


def test_new_family_args():
    from tests import hfmodels

    phi3 = families.get("phi3").args_from_hf(hfmodels.config("phi3").to_dict())
    assert (phi3.partial_rotary_factor, phi3.rotary_dim, phi3.rope_scaling["rope_type"]) == (0.75, 12, "longrope")
    assert phi3.rope_scaling["original_max_position_embeddings"] == 8 and phi3.extra["sliding_window"] == 6
    mixtral = families.get("mixtral").args_from_hf(hfmodels.config("mixtral").to_dict())
    assert (mixtral.n_experts, mixtral.n_active_experts, mixtral.norm_topk_prob, mixtral.dense_layers) == (4, 2, True, [])
    qwen = families.get("qwen3_moe").args_from_hf(hfmodels.config("qwen3_moe", decoder_sparse_step=2,
                                                                   num_hidden_layers=4).to_dict())
    assert (qwen.expert_dim, qwen.hd, qwen.qk_norm, qwen.norm_topk_prob) == (48, 32, "head", False)
    assert qwen.dense_layers == [0, 1, 2]    # mlp_only_layers [1], and every layer but each 2nd
    with pytest.raises(CkptError, match="short_factor has 6 values.*needs 8"):
        families.get("phi3").args_from_hf({**hfmodels.config("phi3").to_dict(), "partial_rotary_factor": 1.0,
                                           "rope_parameters": {**hfmodels.LONGROPE, "rope_theta": 1e4}})
