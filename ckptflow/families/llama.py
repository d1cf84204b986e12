"""Llama 2, 3, 3.1, 3.2 (HF model_type "llama"). Tune layout is Meta's: q/k rows are permuted."""
from __future__ import annotations

from ckptflow.errors import CkptError
from ckptflow.families import _hf
from ckptflow.model_args import ModelArgs

NAME = "llama"
MODEL_TYPES = ("llama",)
ROPE_INTERLEAVED = True

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
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.gate_proj.bias": "layers.{}.mlp.w1.bias",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.down_proj.bias": "layers.{}.mlp.w2.bias",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.layers.{}.mlp.up_proj.bias": "layers.{}.mlp.w3.bias",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}

PEFT_TARGETS = {
    "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj", "output": "lm_head",
}


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    # attention_bias puts a bias on q, k, v and o alike.
    bias = bool(config.get("attention_bias", False))
    return _hf.args_from_config(config, where, qkv_bias=bias, attn_out_bias=bias,
                                mlp_bias=bool(config.get("mlp_bias", False)), rope_interleaved=ROPE_INTERLEAVED)


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    if args.qkv_bias != args.attn_out_bias:
        raise CkptError(f"llama config.json has one attention_bias for q/k/v/o, not qkv_bias={args.qkv_bias} "
                        f"with attn_out_bias={args.attn_out_bias}")
    fields = {"attention_bias": args.qkv_bias, "mlp_bias": args.mlp_bias}
    if like is not None:
        return _hf.update_config(like, args_from_hf(like), args, dtype=dtype, fields=fields)
    return _hf.new_config(args, model_type="llama", architecture="LlamaForCausalLM", dtype=dtype, fields=fields)
