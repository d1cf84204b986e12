"""Mixtral (HF model_type "mixtral"): Mistral's attention with a mixture-of-experts MLP.

On disk, as transformers 5 writes it (it groups the experts in memory only): the router
`block_sparse_moe.gate.weight` [experts, hidden] and one tensor per expert,
`block_sparse_moe.experts.N.w1` (gate), `w3` (up), `w2` (down). Routing: softmax in float32,
top `num_experts_per_tok`, always renormalised over the chosen experts, weights kept in float32.
Tune layout keeps HF's rotate-half rows. LoRA reaches attention and the head, not the experts
(transformers holds them as 3-D parameters, which PEFT's LoRA layers do not wrap).
"""
from __future__ import annotations

import ckptflow.families._hf as _hf
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "mixtral"
MODEL_TYPES = ("mixtral",)
ROPE_INTERLEAVED = False

HF_TO_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.block_sparse_moe.gate.weight": "layers.{}.mlp.router.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w1.weight": "layers.{}.mlp.experts.{}.w1.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w2.weight": "layers.{}.mlp.experts.{}.w2.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w3.weight": "layers.{}.mlp.experts.{}.w3.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}

PEFT_TARGETS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj",
                "output": "lm_head"}

EXTRA_KEYS = _hf.TOKEN_KEYS + ("sliding_window",)
MOE_FIELDS = {"n_experts": "num_local_experts", "n_active_experts": "num_experts_per_tok",
              "router_aux_loss_coef": "router_aux_loss_coef"}
DEFAULTS = {"num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001,
            "rope_theta": 1e6, "rms_norm_eps": 1e-5}     # MixtralConfig's, when a field is absent


def seed_args(opts: dict) -> dict:
    """seed://mixtral?n_experts=4&n_active_experts=2 (defaults 4 and 2, each expert hidden_dim wide)."""
    return {"n_experts": opts.get("n_experts") or 4, "n_active_experts": opts.get("n_active_experts") or 2,
            "norm_topk_prob": True, "router_aux_loss_coef": 0.02, "extra": {"moe_weights_float32": True}}


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None or k == "sliding_window"}}
    moe = {field: cfg[key] for field, key in MOE_FIELDS.items()}
    if not 0 < moe["n_active_experts"] <= moe["n_experts"]:
        raise CkptError(f"{where}: num_experts_per_tok {moe['n_active_experts']} must be 1 .. "
                        f"num_local_experts {moe['n_experts']}")
    args = _hf.args_from_config(cfg, where, extra_keys=EXTRA_KEYS, rope_interleaved=ROPE_INTERLEAVED,
                                norm_topk_prob=True, **moe)
    args.extra["moe_weights_float32"] = True
    return args


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    if args.qkv_bias or args.attn_out_bias or args.mlp_bias or args.dense_layers or not args.norm_topk_prob:
        raise CkptError("mixtral config.json cannot express biases, dense layers or norm_topk_prob=false")
    fields = {key: getattr(args, field) for field, key in MOE_FIELDS.items()}
    if like is not None:
        old = args_from_hf(like)
        changed = {key: v for (field, key), v in zip(MOE_FIELDS.items(), fields.values()) if getattr(old, field) != v}
        return _hf.update_config(like, old, args, dtype=dtype, fields=changed, extra_keys=EXTRA_KEYS)
    fields["sliding_window"] = args.extra.get("sliding_window")
    return _hf.new_config(args, model_type="mixtral", architecture="MixtralForCausalLM", dtype=dtype,
                          fields=fields, extra_keys=EXTRA_KEYS)


# --- GGUF (llama.cpp): upstream writes Mixtral as the llama architecture with experts ---------

GGUF_ARCH = "llama"
TUNE_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "layers.{}.sa_norm.scale": "blk.{}.attn_norm.weight",
    "layers.{}.attn.q_proj.weight": "blk.{}.attn_q.weight",
    "layers.{}.attn.k_proj.weight": "blk.{}.attn_k.weight",
    "layers.{}.attn.v_proj.weight": "blk.{}.attn_v.weight",
    "layers.{}.attn.output_proj.weight": "blk.{}.attn_output.weight",
    "layers.{}.mlp_norm.scale": "blk.{}.ffn_norm.weight",
    "layers.{}.mlp.router.weight": "blk.{}.ffn_gate_inp.weight",
    "norm.scale": "output_norm.weight",
    "output.weight": "output.weight",
}
# Each layer's experts stacked into one [experts, rows, cols] tensor.
GGUF_EXPERTS = {
    "blk.{}.ffn_gate_exps.weight": "layers.{}.mlp.experts.{}.w1.weight",
    "blk.{}.ffn_down_exps.weight": "layers.{}.mlp.experts.{}.w2.weight",
    "blk.{}.ffn_up_exps.weight": "layers.{}.mlp.experts.{}.w3.weight",
}
# Tune keeps HF's rotate-half q/k rows; llama.cpp's llama architecture rotates Meta's order.
GGUF_RULES = {"layers.{}.attn.q_proj.weight": "meta_rows_q", "layers.{}.attn.k_proj.weight": "meta_rows_k"}


def gguf_metadata(args: ModelArgs) -> list:
    """llama.cpp's llama runs Mixtral without its sliding window: a model that has one is refused."""
    if args.extra.get("sliding_window"):
        raise CkptError(f"mixtral GGUF: llama.cpp's llama architecture has no sliding window "
                        f"({args.extra['sliding_window']})")
    return [("{arch}.expert_count", "u32", args.n_experts), ("{arch}.expert_used_count", "u32", args.n_active_experts)]
