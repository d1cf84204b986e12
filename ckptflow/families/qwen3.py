"""Qwen3 (HF model_type "qwen3"): Llama's keys plus `self_attn.q_norm` / `k_norm`, an RMSNorm over
head_dim applied to each head of q and k before RoPE; no q/k/v bias by default (`attention_bias`
puts one on q, k, v and o alike); `head_dim` written in every config (128, not hidden/heads for
0.6B and 4B); tied embeddings up to 4B.

Tune layout keeps HF's rotate-half rows (torchtune's Qwen3 converter does not permute), so the
per-head norms need no permute either.
"""
from __future__ import annotations

import ckptflow.families._hf as _hf
import ckptflow.families.qwen2 as _qwen2
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "qwen3"
MODEL_TYPES = ("qwen3",)
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
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.scale",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.scale",
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

# seed://qwen3 defaults: the per-head q/k norms; tied like 0.6B-4B.
SEED_ARGS = {"qk_norm": "head", "tie_embeddings": True}


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    if config.get("use_sliding_window"):
        raise CkptError(f"{where}: qwen3 with use_sliding_window=true is not supported")
    bias = bool(config.get("attention_bias", False))
    return _hf.args_from_config(config, where, qkv_bias=bias, attn_out_bias=bias, qk_norm="head",
                                rope_interleaved=ROPE_INTERLEAVED)


def _check(args: ModelArgs) -> None:
    if args.qk_norm != "head" or args.qkv_bias != args.attn_out_bias or args.mlp_bias:
        raise CkptError("qwen3 config.json implies per-head q/k norms, one attention_bias for q/k/v/o and no "
                        f"MLP bias; got qk_norm={args.qk_norm}, qkv_bias={args.qkv_bias}, "
                        f"attn_out_bias={args.attn_out_bias}, mlp_bias={args.mlp_bias}")


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    _check(args)
    fields = {"attention_bias": args.qkv_bias}
    if like is not None:
        return _hf.update_config(like, args_from_hf(like), args, dtype=dtype, fields=fields)
    fields.update(use_sliding_window=False, sliding_window=None)
    return _hf.new_config(args, model_type="qwen3", architecture="Qwen3ForCausalLM", dtype=dtype, fields=fields)


# --- GGUF (llama.cpp), written by ckptflow/formats/gguf.py -----------------------------------

GGUF_ARCH = "qwen3"
# q/k rows (and the per-head norms) in HF's rotate-half order: llama.cpp rotates qwen3 NEOX-style.
TUNE_TO_GGUF = {
    **_qwen2.TUNE_TO_GGUF,
    "layers.{}.attn.output_proj.bias": "blk.{}.attn_output.bias",
    "layers.{}.attn.q_norm.scale": "blk.{}.attn_q_norm.weight",
    "layers.{}.attn.k_norm.scale": "blk.{}.attn_k_norm.weight",
}
