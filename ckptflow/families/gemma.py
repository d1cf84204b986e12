"""Gemma 1 (HF model_type "gemma"): Llama's keys; norms hold w and compute x * (1 + w) in float32;
embeddings multiplied by sqrt(hidden_size) cast to the activation dtype; GeGLU with tanh GELU
(`hidden_act` "gelu_pytorch_tanh", or the legacy "gelu" that GemmaConfig reads as the same);
tied; head_dim 256 when config.json leaves it out (GemmaConfig's default, not hidden/heads).

Tune layout keeps HF's rotate-half rows (no permute).
"""
from __future__ import annotations

import ckptflow.families._hf as _hf
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "gemma"
MODEL_TYPES = ("gemma",)
ROPE_INTERLEAVED = False

HF_TO_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attn.output_proj.bias",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}

PEFT_TARGETS = {
    "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj", "output": "lm_head",
}

# What GemmaConfig assumes when config.json leaves a field out.
DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh"}
# config.json activation -> ModelArgs.mlp_act ("gelu" is Gemma 1's legacy name for the tanh GELU).
ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}
GEMMA_ARGS = {"norm_offset": True, "embed_scale": True, "rope_interleaved": ROPE_INTERLEAVED}

SEED_ARGS = {**GEMMA_ARGS, "mlp_act": "gelu_tanh", "tie_embeddings": True}


def activation(config: dict, key: str, where: str) -> str:
    act = config.get(key)
    if act not in ACTS:
        raise CkptError(f"{where}: {key} {act!r} is not supported ({', '.join(ACTS)})")
    return ACTS[act]


def check_causal(config: dict, where: str) -> None:
    if config.get("use_bidirectional_attention"):
        raise CkptError(f"{where}: use_bidirectional_attention=true (an encoder) is not supported")


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    check_causal(config, where)
    config = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None or k not in DEFAULTS}}
    bias = bool(config.get("attention_bias", False))
    # v4 GemmaConfig wrote hidden_activation beside hidden_act; it wins when set.
    key = "hidden_activation" if config.get("hidden_activation") else "hidden_act"
    return _hf.args_from_config(config, where, qkv_bias=bias, attn_out_bias=bias,
                                mlp_act=activation(config, key, where), **GEMMA_ARGS)


def check_args(args: ModelArgs, family: str, **want) -> None:
    """What a Gemma config.json implies; `want` are the family's fixed ModelArgs values."""
    want = {**GEMMA_ARGS, "mlp_act": "gelu_tanh", "mlp_bias": False, **want}
    bad = {k: getattr(args, k) for k, v in want.items() if getattr(args, k) != v}
    if args.qkv_bias != args.attn_out_bias:
        bad["attn_out_bias"] = args.attn_out_bias
    if bad:
        raise CkptError(f"{family} config.json cannot express {bad} (it implies {want} and one attention_bias)")


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    check_args(args, NAME)
    fields = {"attention_bias": args.qkv_bias}
    if like is not None:
        return _hf.update_config(like, args_from_hf(like), args, dtype=dtype, fields=fields)
    return _hf.new_config(args, model_type="gemma", architecture="GemmaForCausalLM", dtype=dtype, fields=fields,
                          act={"hidden_act": "gelu_pytorch_tanh"})


# --- GGUF (llama.cpp), written by ckptflow/formats/gguf.py -----------------------------------

GGUF_ARCH = "gemma"
TUNE_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "layers.{}.sa_norm.scale": "blk.{}.attn_norm.weight",
    "layers.{}.attn.q_proj.weight": "blk.{}.attn_q.weight",
    "layers.{}.attn.k_proj.weight": "blk.{}.attn_k.weight",
    "layers.{}.attn.v_proj.weight": "blk.{}.attn_v.weight",
    "layers.{}.attn.output_proj.weight": "blk.{}.attn_output.weight",
    "layers.{}.mlp_norm.scale": "blk.{}.ffn_norm.weight",
    "layers.{}.mlp.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.mlp.w2.weight": "blk.{}.ffn_down.weight",
    "layers.{}.mlp.w3.weight": "blk.{}.ffn_up.weight",
    "norm.scale": "output_norm.weight",
}
# Gemma norms hold w for x * (1 + w); llama.cpp multiplies by the stored weight, so 1 + w is stored.
GGUF_RULES = {
    "layers.{}.sa_norm.scale": "add_one",
    "layers.{}.mlp_norm.scale": "add_one",
    "layers.{}.sa_scale.scale": "add_one",
    "layers.{}.mlp_scale.scale": "add_one",
    "layers.{}.attn.q_norm.scale": "add_one",
    "layers.{}.attn.k_norm.scale": "add_one",
    "norm.scale": "add_one",
}


def gguf_metadata(args: ModelArgs) -> list:
    """llama.cpp's gemma always ties the output head to token_embd and has no biases."""
    if not args.tie_embeddings or args.qkv_bias or args.attn_out_bias or args.mlp_bias:
        raise CkptError("gemma GGUF: llama.cpp's gemma has a tied output head and no biases")
    return []
