"""Mistral (HF model_type "mistral"): Llama's keys without biases, plus an optional sliding window.

Tune layout is Meta's (q/k rows permuted), as in torchtune.
"""
from __future__ import annotations

from ckptflow.errors import CkptError
from ckptflow.families import _hf
from ckptflow.model_args import ModelArgs

NAME = "mistral"
MODEL_TYPES = ("mistral",)
ROPE_INTERLEAVED = True

HF_TO_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
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

# sliding_window lives in ModelArgs.extra; the model reads it from there.
EXTRA_KEYS = _hf.TOKEN_KEYS + ("sliding_window",)
DEFAULT_SLIDING_WINDOW = 4096  # MistralConfig's default when the field is absent (v4 and v5)


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    if "sliding_window" not in config:
        config = {**config, "sliding_window": DEFAULT_SLIDING_WINDOW}
    return _hf.args_from_config(config, where, extra_keys=EXTRA_KEYS, rope_interleaved=ROPE_INTERLEAVED)


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    if args.qkv_bias or args.attn_out_bias or args.mlp_bias:
        raise CkptError("mistral config.json cannot express biases (qkv_bias, attn_out_bias, mlp_bias)")
    if like is not None:
        return _hf.update_config(like, args_from_hf(like), args, dtype=dtype, fields={}, extra_keys=EXTRA_KEYS)
    # Written even when null: an absent sliding_window means 4096 to transformers.
    fields = {"sliding_window": args.extra.get("sliding_window")}
    return _hf.new_config(args, model_type="mistral", architecture="MistralForCausalLM", dtype=dtype,
                          fields=fields, extra_keys=EXTRA_KEYS)
