"""Qwen3-MoE (HF model_type "qwen3_moe", Qwen3-30B-A3B, 235B-A22B): Qwen3's attention with a
mixture-of-experts MLP.

Attention: no q/k/v bias (`attention_bias`), `self_attn.q_norm` / `k_norm` = RMSNorm over head_dim
on each head before RoPE (ModelArgs.qk_norm "head"), head_dim from config.json when given.
MoE, on disk as transformers 5 writes it (grouped in memory only): router `mlp.gate.weight`
[experts, hidden], experts `mlp.experts.N.{gate,up,down}_proj` of `moe_intermediate_size`. Routing:
softmax in float32, top `num_experts_per_tok`, renormalised only with `norm_topk_prob`, then cast to
the activations' dtype. Layer i is dense (a plain MLP of `intermediate_size`, keys `mlp.gate_proj`...)
when it is in `mlp_only_layers` or (i + 1) % `decoder_sparse_step` != 0. Tune layout keeps HF's
rotate-half rows. LoRA: attention and the head (see PEFT_TARGETS).
"""
from __future__ import annotations

import ckptflow.families._hf as _hf
import ckptflow.families.mixtral as _mixtral
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "qwen3_moe"
MODEL_TYPES = ("qwen3_moe",)
ROPE_INTERLEAVED = False

HF_TO_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.scale",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.mlp.gate.weight": "layers.{}.mlp.router.weight",
    "model.layers.{}.mlp.experts.{}.gate_proj.weight": "layers.{}.mlp.experts.{}.w1.weight",
    "model.layers.{}.mlp.experts.{}.down_proj.weight": "layers.{}.mlp.experts.{}.w2.weight",
    "model.layers.{}.mlp.experts.{}.up_proj.weight": "layers.{}.mlp.experts.{}.w3.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",    # the dense layers
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}

# Attention and the head: peft reads gate/up/down_proj targets of a Qwen3-MoE model as the experts'
# grouped parameters, dense layers included (ckptflow.lora.adaptable).
PEFT_TARGETS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj",
                "output": "lm_head"}

MOE_FIELDS = {"n_experts": "num_experts", "n_active_experts": "num_experts_per_tok",
              "moe_hidden_dim": "moe_intermediate_size", "norm_topk_prob": "norm_topk_prob",
              "router_aux_loss_coef": "router_aux_loss_coef"}
# Qwen3MoeConfig's values for absent fields ("num_local_experts" is what transformers 5 writes).
DEFAULTS = {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
            "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1, "rms_norm_eps": 1e-6}


def seed_args(opts: dict) -> dict:
    """seed://qwen3_moe?n_experts=4&n_active_experts=2&moe_hidden_dim=32: layer 1 stays dense when
    there are more than one (as mlp_only_layers allows), q/k norms per head."""
    return {"n_experts": opts.get("n_experts") or 4, "n_active_experts": opts.get("n_active_experts") or 2,
            "moe_hidden_dim": opts.get("moe_hidden_dim") or opts["dim"] // 2, "norm_topk_prob": True,
            "router_aux_loss_coef": 0.001, "qk_norm": "head", "dense_layers": [1] if opts["n_layers"] > 1 else []}


def _dense_layers(cfg: dict, n_layers: int, where: str) -> list[int]:
    only = cfg.get("mlp_only_layers") or []
    step = cfg.get("decoder_sparse_step") or 1
    bad = [i for i in only if not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise CkptError(f"{where}: mlp_only_layers names layer {bad[0]!r}, not one of 0..{n_layers - 1}")
    return [i for i in range(n_layers) if i in only or (i + 1) % step != 0]


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    if config.get("use_sliding_window"):
        raise CkptError(f"{where}: qwen3_moe with use_sliding_window=true is not supported")
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if "num_local_experts" in config and "num_experts" not in config:
        cfg["num_experts"] = config["num_local_experts"]
    moe = {field: cfg[key] for field, key in MOE_FIELDS.items()}
    if not 0 < moe["n_active_experts"] <= moe["n_experts"]:
        raise CkptError(f"{where}: num_experts_per_tok {moe['n_active_experts']} must be 1 .. "
                        f"num_experts {moe['n_experts']}")
    bias = bool(cfg.get("attention_bias", False))
    return _hf.args_from_config(cfg, where, rope_interleaved=ROPE_INTERLEAVED, qkv_bias=bias, attn_out_bias=bias,
                                qk_norm="head", dense_layers=_dense_layers(cfg, cfg.get("num_hidden_layers", 0), where),
                                **moe)


def _moe_fields(args: ModelArgs, old: ModelArgs | None) -> dict:
    out = {name: getattr(args, field) for field, name in MOE_FIELDS.items()
           if old is None or getattr(old, field) != getattr(args, field)}
    if old is None or old.dense_layers != args.dense_layers:
        out.update({"mlp_only_layers": list(args.dense_layers), "decoder_sparse_step": 1})
    return out


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    if args.qkv_bias != args.attn_out_bias or args.mlp_bias or args.qk_norm != "head":
        raise CkptError("qwen3_moe config.json has one attention_bias for q/k/v/o, no MLP bias, and q/k norms per head")
    if like is not None:
        old = args_from_hf(like)
        fields = _moe_fields(args, old)
        if "num_experts" in fields and "num_local_experts" in like:
            fields["num_local_experts"] = fields.pop("num_experts")
        if old.qkv_bias != args.qkv_bias:
            fields["attention_bias"] = args.qkv_bias
        return _hf.update_config(like, old, args, dtype=dtype, fields=fields)
    fields = {**_moe_fields(args, None), "attention_bias": args.qkv_bias, "use_sliding_window": False,
              "sliding_window": None}
    return _hf.new_config(args, model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", dtype=dtype,
                          fields=fields)


# --- GGUF (llama.cpp), written by ckptflow/formats/gguf.py -----------------------------------

GGUF_ARCH = "qwen3moe"
TUNE_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "layers.{}.sa_norm.scale": "blk.{}.attn_norm.weight",
    "layers.{}.attn.q_proj.weight": "blk.{}.attn_q.weight",
    "layers.{}.attn.k_proj.weight": "blk.{}.attn_k.weight",
    "layers.{}.attn.v_proj.weight": "blk.{}.attn_v.weight",
    "layers.{}.attn.output_proj.weight": "blk.{}.attn_output.weight",
    "layers.{}.attn.q_norm.scale": "blk.{}.attn_q_norm.weight",
    "layers.{}.attn.k_norm.scale": "blk.{}.attn_k_norm.weight",
    "layers.{}.mlp_norm.scale": "blk.{}.ffn_norm.weight",
    "layers.{}.mlp.router.weight": "blk.{}.ffn_gate_inp.weight",
    "norm.scale": "output_norm.weight",
    "output.weight": "output.weight",
}
# Each layer's experts stacked into one [experts, rows, cols] tensor.
GGUF_EXPERTS = _mixtral.GGUF_EXPERTS


def gguf_metadata(args: ModelArgs) -> list:
    """llama.cpp's qwen3moe has experts in every layer and always renormalises the top-k weights."""
    if args.dense_layers or not args.norm_topk_prob:
        raise CkptError("qwen3_moe GGUF: llama.cpp's qwen3moe needs experts in every layer (mlp_only_layers "
                        f"{args.dense_layers}) and norm_topk_prob true ({args.norm_topk_prob})")
    return [("{arch}.expert_count", "u32", args.n_experts), ("{arch}.expert_used_count", "u32", args.n_active_experts),
            ("{arch}.expert_feed_forward_length", "u32", args.expert_dim)]
