"""Qwen2 and Qwen2.5 (HF model_type "qwen2"): q/k/v always have a bias, o and the MLP never.

Tune layout keeps HF's rotate-half rows (torchtune's Qwen2 converter does not permute).
"""
from __future__ import annotations

import ckptflow.families._hf as _hf
import ckptflow.families._litgpt as _litgpt
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "qwen2"
MODEL_TYPES = ("qwen2",)
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
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
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

# seed://qwen2 defaults (ckptflow.seed): q/k/v biases as every Qwen2 has, tied like the small models.
SEED_ARGS = {"qkv_bias": True, "tie_embeddings": True}


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    if config.get("use_sliding_window"):
        raise CkptError(f"{where}: qwen2 with use_sliding_window=true is not supported")
    return _hf.args_from_config(config, where, qkv_bias=True, rope_interleaved=ROPE_INTERLEAVED)


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    if not args.qkv_bias or args.attn_out_bias or args.mlp_bias:
        raise CkptError("qwen2 config.json implies qkv_bias=True, attn_out_bias=False, mlp_bias=False; "
                        f"got {args.qkv_bias}, {args.attn_out_bias}, {args.mlp_bias}")
    if like is not None:
        return _hf.update_config(like, args_from_hf(like), args, dtype=dtype, fields={})
    fields = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": args.n_layers}
    return _hf.new_config(args, model_type="qwen2", architecture="Qwen2ForCausalLM", dtype=dtype,
                          fields=fields, head_dim=False)


# --- litgpt (qkv weight and bias fused as [q; k; v]) -----------------------------------------

LITGPT_TO_TUNE = {
    "transformer.wte.weight": "tok_embeddings.weight",
    "transformer.h.{}.norm_1.weight": "layers.{}.sa_norm.scale",
    "transformer.h.{}.attn.qkv.weight": ("layers.{}.attn.q_proj.weight", "layers.{}.attn.k_proj.weight",
                                         "layers.{}.attn.v_proj.weight"),
    "transformer.h.{}.attn.qkv.bias": ("layers.{}.attn.q_proj.bias", "layers.{}.attn.k_proj.bias",
                                       "layers.{}.attn.v_proj.bias"),
    "transformer.h.{}.attn.proj.weight": "layers.{}.attn.output_proj.weight",
    "transformer.h.{}.norm_2.weight": "layers.{}.mlp_norm.scale",
    "transformer.h.{}.mlp.fc_1.weight": "layers.{}.mlp.w1.weight",
    "transformer.h.{}.mlp.fc_2.weight": "layers.{}.mlp.w3.weight",
    "transformer.h.{}.mlp.proj.weight": "layers.{}.mlp.w2.weight",
    "transformer.ln_f.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}

LITGPT_LEGACY_QKV = {
    "transformer.h.{}.attn.attn.weight": ("layers.{}.attn.q_proj.weight", "layers.{}.attn.k_proj.weight",
                                          "layers.{}.attn.v_proj.weight"),
    "transformer.h.{}.attn.attn.bias": ("layers.{}.attn.q_proj.bias", "layers.{}.attn.k_proj.bias",
                                        "layers.{}.attn.v_proj.bias"),
}


def is_litgpt_config(cfg: dict) -> bool:
    # q/k/v bias without an output or MLP bias is Qwen2's structure.
    return bool(cfg.get("attn_bias")) and not cfg.get("bias") and cfg.get("sliding_window_size") is None


def args_from_litgpt(cfg: dict, where: str = "model_config.yaml") -> ModelArgs:
    return _litgpt.args_from_config(cfg, where, qkv_bias=True, rope_interleaved=ROPE_INTERLEAVED)


# --- GGUF (llama.cpp), written by ckptflow/formats/gguf.py -----------------------------------

GGUF_ARCH = "qwen2"
# q/k rows stay in HF's rotate-half order: llama.cpp rotates qwen2 NEOX-style.
TUNE_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "layers.{}.sa_norm.scale": "blk.{}.attn_norm.weight",
    "layers.{}.attn.q_proj.weight": "blk.{}.attn_q.weight",
    "layers.{}.attn.q_proj.bias": "blk.{}.attn_q.bias",
    "layers.{}.attn.k_proj.weight": "blk.{}.attn_k.weight",
    "layers.{}.attn.k_proj.bias": "blk.{}.attn_k.bias",
    "layers.{}.attn.v_proj.weight": "blk.{}.attn_v.weight",
    "layers.{}.attn.v_proj.bias": "blk.{}.attn_v.bias",
    "layers.{}.attn.output_proj.weight": "blk.{}.attn_output.weight",
    "layers.{}.mlp_norm.scale": "blk.{}.ffn_norm.weight",
    "layers.{}.mlp.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.mlp.w2.weight": "blk.{}.ffn_down.weight",
    "layers.{}.mlp.w3.weight": "blk.{}.ffn_up.weight",
    "norm.scale": "output_norm.weight",
    "output.weight": "output.weight",
}
