"""OLMo 2 (HF model_type "olmo2"): no pre-norms; `post_attention_layernorm` and
`post_feedforward_layernorm` normalise each block's output before the residual add (tune sa_scale,
mlp_scale); `self_attn.q_norm` / `k_norm` normalise the whole q and k projections (n_heads * head_dim
and n_kv_heads * head_dim wide), not each head, before RoPE. Its RMSNorm multiplies by the weight in
float32 and then casts (Llama casts first). No head_dim in config.json (hidden/heads); untied; rms
eps 1e-5 by default.

Tune layout keeps HF's rotate-half rows, so the projection-wide norms need no permute.
"""
from __future__ import annotations

import ckptflow.families._hf as _hf
import ckptflow.families.qwen2 as _qwen2
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "olmo2"
MODEL_TYPES = ("olmo2",)
ROPE_INTERLEAVED = False

HF_TO_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
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
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.sa_scale.scale",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_scale.scale",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}

PEFT_TARGETS = _qwen2.PEFT_TARGETS

OLMO2_ARGS = {"qk_norm": "proj", "pre_norms": False, "post_norms": True, "norm_scale_f32": True}
SEED_ARGS = dict(OLMO2_ARGS)
DEFAULTS = {"rms_norm_eps": 1e-5}


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    config = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    bias = bool(config.get("attention_bias", False))
    return _hf.args_from_config(config, where, qkv_bias=bias, attn_out_bias=bias,
                                rope_interleaved=ROPE_INTERLEAVED, **OLMO2_ARGS)


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    bad = {k: getattr(args, k) for k, v in OLMO2_ARGS.items() if getattr(args, k) != v}
    if bad or args.qkv_bias != args.attn_out_bias or args.mlp_bias:
        raise CkptError(f"olmo2 config.json implies {OLMO2_ARGS}, one attention_bias and no MLP bias; got {bad}")
    fields = {"attention_bias": args.qkv_bias}
    if like is not None:
        return _hf.update_config(like, args_from_hf(like), args, dtype=dtype, fields=fields)
    return _hf.new_config(args, model_type="olmo2", architecture="Olmo2ForCausalLM", dtype=dtype, fields=fields,
                          head_dim=False)


# --- GGUF (llama.cpp), written by ckptflow/formats/gguf.py -----------------------------------

GGUF_ARCH = "olmo2"
# As llama.cpp's converter (Olmo2Model) writes it: HF's rotate-half q/k rows (llama.cpp rotates
# olmo2 NEOX-style), the projection-wide q/k norms, and the two post-norms under gemma2's names.
TUNE_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "layers.{}.attn.q_proj.weight": "blk.{}.attn_q.weight",
    "layers.{}.attn.k_proj.weight": "blk.{}.attn_k.weight",
    "layers.{}.attn.v_proj.weight": "blk.{}.attn_v.weight",
    "layers.{}.attn.output_proj.weight": "blk.{}.attn_output.weight",
    "layers.{}.attn.q_norm.scale": "blk.{}.attn_q_norm.weight",
    "layers.{}.attn.k_norm.scale": "blk.{}.attn_k_norm.weight",
    "layers.{}.sa_scale.scale": "blk.{}.post_attention_norm.weight",
    "layers.{}.mlp.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.mlp.w2.weight": "blk.{}.ffn_down.weight",
    "layers.{}.mlp.w3.weight": "blk.{}.ffn_up.weight",
    "layers.{}.mlp_scale.scale": "blk.{}.post_ffw_norm.weight",
    "norm.scale": "output_norm.weight",
    "output.weight": "output.weight",
}


def gguf_metadata(args: ModelArgs) -> list:
    """Nothing beyond the common keys; refuses what llama.cpp's olmo2 cannot load or compute: it
    requires an `output` tensor (no tied head), adds no q/k/v/o bias, sizes the q norm by the
    hidden size (head_dim = hidden / heads) and loads no rope_freqs tensor (no llama3 scaling)."""
    rope = (args.rope_scaling or {}).get("rope_type")
    if rope not in (None, "default", "linear"):
        raise CkptError(f"olmo2 GGUF: RoPE scaling {rope!r}: llama.cpp's olmo2 loads no rope_freqs tensor "
                        "(default and linear scaling export)")
    if args.tie_embeddings:
        raise CkptError("olmo2 GGUF: tie_word_embeddings=true: llama.cpp's olmo2 needs its own output (lm_head) tensor")
    if args.qkv_bias or args.attn_out_bias:
        raise CkptError("olmo2 GGUF: attention_bias=true: llama.cpp's olmo2 adds no q/k/v/o bias")
    if args.hd * args.n_heads != args.dim:
        raise CkptError(f"olmo2 GGUF: head_dim {args.hd} is not hidden_size / num_attention_heads, "
                        "as llama.cpp's olmo2 needs")
    return []
