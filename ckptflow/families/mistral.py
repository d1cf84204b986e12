"""Mistral (HF model_type "mistral"): Llama's keys without biases, plus an optional sliding window.

Tune layout is Meta's (q/k rows permuted), as in torchtune.
"""
from __future__ import annotations

import ckptflow.families._hf as _hf
import ckptflow.families._litgpt as _litgpt
import ckptflow.families._meta as _meta
import ckptflow.families.llama as _llama
from ckptflow.errors import CkptError
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


# --- Mistral's own consolidated files (Meta key names, params.json with hidden_dim) ----------

META_TO_TUNE = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "layers.{}.attention_norm.weight": "layers.{}.sa_norm.scale",
    "layers.{}.attention.wq.weight": "layers.{}.attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "layers.{}.attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "layers.{}.attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "layers.{}.attn.output_proj.weight",
    "layers.{}.ffn_norm.weight": "layers.{}.mlp_norm.scale",
    "layers.{}.feed_forward.w1.weight": "layers.{}.mlp.w1.weight",
    "layers.{}.feed_forward.w2.weight": "layers.{}.mlp.w2.weight",
    "layers.{}.feed_forward.w3.weight": "layers.{}.mlp.w3.weight",
    "norm.weight": "norm.scale",
    "output.weight": "output.weight",
}

# Model-parallel split dimensions, as in llama.META_MP_DIM (Mistral ships one file; kept for symmetry).
META_MP_DIM = {
    "tok_embeddings.weight": "embedding",
    "layers.{}.attention_norm.weight": None,
    "layers.{}.attention.wq.weight": 0,
    "layers.{}.attention.wk.weight": "kv",
    "layers.{}.attention.wv.weight": "kv",
    "layers.{}.attention.wo.weight": 1,
    "layers.{}.ffn_norm.weight": None,
    "layers.{}.feed_forward.w1.weight": 0,
    "layers.{}.feed_forward.w2.weight": 1,
    "layers.{}.feed_forward.w3.weight": 0,
    "norm.weight": None,
    "output.weight": 0,
}


def is_meta_params(params: dict) -> bool:
    return "hidden_dim" in params or "sliding_window" in params


def args_from_meta(params: dict, where: str = "params.json", *, vocab_size: int | None = None,
                   rope_factor: float | None = None) -> ModelArgs:
    _meta.check(params, where)
    if not isinstance(params.get("hidden_dim"), int):
        raise CkptError(f"{where}: missing hidden_dim")
    vocab = params.get("vocab_size") or vocab_size
    if not vocab or vocab <= 0:
        raise CkptError(f"{where}: vocab_size is missing and no embedding says it")
    rope = _meta.rope_scaling(params, where, rope_factor)
    return _meta.args_from_params(params, where, vocab_size=vocab, hidden_dim=params["hidden_dim"], rope=rope,
                                  max_seq_len=None, extra={"sliding_window": params.get("sliding_window")})


def meta_params(args: ModelArgs) -> dict:
    _meta.check_writable(args, NAME)
    out = _meta.common_params(args)
    out.update(head_dim=args.hd, hidden_dim=args.hidden_dim)
    if args.extra.get("sliding_window") is not None:
        out["sliding_window"] = args.extra["sliding_window"]
    return out


# --- litgpt: the same key names as llama, so the same tables ----------------------------------

LITGPT_TO_TUNE = _llama.LITGPT_TO_TUNE
LITGPT_LEGACY_QKV = _llama.LITGPT_LEGACY_QKV


def is_litgpt_config(cfg: dict) -> bool:
    return not cfg.get("attn_bias") and cfg.get("sliding_window_size") is not None


def args_from_litgpt(cfg: dict, where: str = "model_config.yaml") -> ModelArgs:
    if cfg.get("sliding_window_indices") not in (None, [1] * cfg.get("n_layer", 0)):
        raise CkptError(f"{where}: a sliding window on some layers only is not supported")
    return _litgpt.args_from_config(cfg, where, rope_interleaved=ROPE_INTERLEAVED,
                                    extra={"sliding_window": cfg["sliding_window_size"]})


# --- GGUF (llama.cpp): upstream writes Mistral as the llama architecture, rows in Meta order ---

GGUF_ARCH = "llama"
TUNE_TO_GGUF = _llama.TUNE_TO_GGUF
