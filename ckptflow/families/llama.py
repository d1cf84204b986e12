"""Llama 2, 3, 3.1, 3.2 (HF model_type "llama"). Tune layout is Meta's: q/k rows are permuted."""
from __future__ import annotations

import ckptflow.families._hf as _hf
import ckptflow.families._litgpt as _litgpt
import ckptflow.families._meta as _meta
from ckptflow.errors import CkptError
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


# --- Meta's own layout (consolidated.NN.pth + params.json), formats.md 2.1 and 3 -------------

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
    "rope.freqs": None,          # Llama 1/2: a derived buffer, not a weight
}

# How Meta's reference code splits each weight across model-parallel files (fairscale layers):
# the dimension the shards are concatenated on; None = replicated (rank 0's copy is the weight);
# "kv" = dim 0 by KV head, each head copied to several ranks when there are more files than KV
# heads; "embedding" = dim 1 in Llama 1/2 (ParallelEmbedding), dim 0 in Llama 3 (VocabParallel).
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

# torchtitan after v0.2.2 (fused-QKV module, separate tensors; lm_head); v0.1-v0.2.2 use META_TO_TUNE.
TITAN_TO_TUNE = {
    **META_TO_TUNE,
    "layers.{}.attention.qkv_linear.wq.weight": "layers.{}.attn.q_proj.weight",
    "layers.{}.attention.qkv_linear.wk.weight": "layers.{}.attn.k_proj.weight",
    "layers.{}.attention.qkv_linear.wv.weight": "layers.{}.attn.v_proj.weight",
    "lm_head.weight": "output.weight",
}

# params.json says neither the llama3 RoPE factor nor the context length. The released models,
# keyed by (dim, n_layers, n_heads, n_kv_heads, vocab_size, use_scaled_rope), with the values
# of their HF config.json (meta-llama/llama-models issues #166, #241; formats.md 3.2).
META_KNOWN = {
    (4096, 32, 32, 8, 128256, False): {"model": "Llama 3 8B", "max_seq_len": 8192},
    (8192, 80, 64, 8, 128256, False): {"model": "Llama 3 70B", "max_seq_len": 8192},
    (4096, 32, 32, 8, 128256, True): {"model": "Llama 3.1 8B", "rope_factor": 8.0, "max_seq_len": 131072},
    (8192, 80, 64, 8, 128256, True): {"model": "Llama 3.1/3.3 70B", "rope_factor": 8.0, "max_seq_len": 131072},
    (16384, 126, 128, 8, 128256, True): {"model": "Llama 3.1 405B", "rope_factor": 8.0, "max_seq_len": 131072},
    (2048, 16, 32, 8, 128256, True): {"model": "Llama 3.2 1B", "rope_factor": 32.0, "max_seq_len": 131072},
    (3072, 28, 24, 8, 128256, True): {"model": "Llama 3.2 3B", "rope_factor": 32.0, "max_seq_len": 131072},
}


def is_meta_params(params: dict) -> bool:
    # Mistral's own params.json gives hidden_dim (and sliding_window); Meta's never does.
    return "hidden_dim" not in params and "sliding_window" not in params


def meta_known(params: dict) -> dict:
    key = (params.get("dim"), params.get("n_layers"), params.get("n_heads"),
           params.get("n_kv_heads", params.get("n_heads")), params.get("vocab_size"), bool(params.get("use_scaled_rope")))
    return META_KNOWN.get(key, {})


def args_from_meta(params: dict, where: str = "params.json", *, vocab_size: int | None = None,
                   rope_factor: float | None = None) -> ModelArgs:
    """ModelArgs from params.json. vocab_size: from the embedding when params says -1 (Llama 1/2);
    rope_factor: for use_scaled_rope, from the user or a manifest (else the known-model table)."""
    _meta.check(params, where)
    known = meta_known(params)
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if vocab_size is None:
            raise CkptError(f"{where}: vocab_size is {vocab} and no embedding says it")
        vocab = vocab_size
    hidden = _meta.ffn_hidden(params["dim"], int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
    rope = _meta.rope_scaling(params, where, rope_factor if rope_factor is not None else known.get("rope_factor"))
    return _meta.args_from_params(params, where, vocab_size=vocab, hidden_dim=hidden, rope=rope,
                                  max_seq_len=known.get("max_seq_len"))


def meta_params(args: ModelArgs) -> dict:
    """params.json for `args` (multiple_of / ffn_dim_multiplier chosen to give hidden_dim back)."""
    _meta.check_writable(args, NAME)
    if args.hd * args.n_heads != args.dim:
        raise CkptError(f"{NAME}: Meta's params.json cannot express head_dim {args.hd} != dim / n_heads")
    out = _meta.common_params(args)
    out.update(_meta.ffn_params(args.dim, args.hidden_dim))
    return out


# --- litgpt (lit_model.pth + model_config.yaml), formats.md 2.1 and 2.3 ----------------------

# A tuple is a fused tensor: [q; k; v] stacked on dim 0 (n_heads, n_kv, n_kv heads), rotate-half rows.
LITGPT_TO_TUNE = {
    "transformer.wte.weight": "tok_embeddings.weight",
    "transformer.h.{}.norm_1.weight": "layers.{}.sa_norm.scale",
    "transformer.h.{}.attn.qkv.weight": ("layers.{}.attn.q_proj.weight", "layers.{}.attn.k_proj.weight",
                                         "layers.{}.attn.v_proj.weight"),
    "transformer.h.{}.attn.proj.weight": "layers.{}.attn.output_proj.weight",
    "transformer.h.{}.norm_2.weight": "layers.{}.mlp_norm.scale",
    "transformer.h.{}.mlp.fc_1.weight": "layers.{}.mlp.w1.weight",
    "transformer.h.{}.mlp.fc_2.weight": "layers.{}.mlp.w3.weight",
    "transformer.h.{}.mlp.proj.weight": "layers.{}.mlp.w2.weight",
    "transformer.ln_f.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}

# litgpt <= v0.5.4: the fused key was attn.attn, its rows in KV-group order
# [q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...].
LITGPT_LEGACY_QKV = {
    "transformer.h.{}.attn.attn.weight": ("layers.{}.attn.q_proj.weight", "layers.{}.attn.k_proj.weight",
                                          "layers.{}.attn.v_proj.weight"),
}


def is_litgpt_config(cfg: dict) -> bool:
    return not cfg.get("attn_bias") and cfg.get("sliding_window_size") is None


def args_from_litgpt(cfg: dict, where: str = "model_config.yaml") -> ModelArgs:
    return _litgpt.args_from_config(cfg, where, rope_interleaved=ROPE_INTERLEAVED)


# --- GGUF (llama.cpp), written by ckptflow/formats/gguf.py -----------------------------------

GGUF_ARCH = "llama"
# tune key -> GGUF tensor name. q/k rows stay in the tune (Meta, interleaved) order, which is what
# llama.cpp's llama architecture rotates; the upstream converter permutes HF rows into it.
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
    "layers.{}.attn.output_proj.bias": "blk.{}.attn_output.bias",
    "layers.{}.mlp_norm.scale": "blk.{}.ffn_norm.weight",
    "layers.{}.mlp.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.mlp.w1.bias": "blk.{}.ffn_gate.bias",
    "layers.{}.mlp.w2.weight": "blk.{}.ffn_down.weight",
    "layers.{}.mlp.w2.bias": "blk.{}.ffn_down.bias",
    "layers.{}.mlp.w3.weight": "blk.{}.ffn_up.weight",
    "layers.{}.mlp.w3.bias": "blk.{}.ffn_up.bias",
    "norm.scale": "output_norm.weight",
    "output.weight": "output.weight",
}
