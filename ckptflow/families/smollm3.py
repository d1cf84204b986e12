"""SmolLM3 (HF model_type "smollm3"): Llama's keys and math, but the layers `no_rope_layers` flags 0
apply no RoPE (every `no_rope_layer_interval`-th layer, 4, when the list is absent); tied by
default; rope_theta 2e6 in the released 3B. `no_rope_layers` in config.json holds one flag per layer
(1 = RoPE); ModelArgs.no_rope_layers holds the indices of the layers without it.

Tune layout keeps HF's rotate-half rows.
"""
from __future__ import annotations

import dataclasses

import ckptflow.families._hf as _hf
import ckptflow.families.qwen2 as _qwen2
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "smollm3"
MODEL_TYPES = ("smollm3",)
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
    "model.layers.{}.mlp.gate_proj.bias": "layers.{}.mlp.w1.bias",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.down_proj.bias": "layers.{}.mlp.w2.bias",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.layers.{}.mlp.up_proj.bias": "layers.{}.mlp.w3.bias",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}

PEFT_TARGETS = _qwen2.PEFT_TARGETS

DEFAULTS = {"tie_word_embeddings": True, "no_rope_layer_interval": 4}


def seed_args(o: dict) -> dict:
    """seed://smollm3 defaults: tied, every 4th layer without RoPE."""
    return {"tie_embeddings": True, "no_rope_layers": no_rope(o["n_layers"], 4) or None}


def no_rope(n_layers: int, interval: int) -> list[int]:
    return [i for i in range(n_layers) if (i + 1) % interval == 0]


def _no_rope_layers(config: dict, where: str) -> list[int] | None:
    flags, n = config.get("no_rope_layers"), config["num_hidden_layers"]
    if flags is None:
        return no_rope(n, config["no_rope_layer_interval"]) or None
    if not isinstance(flags, list) or len(flags) != n or any(f not in (0, 1) for f in flags):
        raise CkptError(f"{where}: no_rope_layers must be {n} flags of 0 or 1 (one per layer), got {flags!r}")
    return [i for i, f in enumerate(flags) if not f] or None


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    if config.get("use_sliding_window"):
        raise CkptError(f"{where}: smollm3 with use_sliding_window=true is not supported")
    config = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    bias = bool(config.get("attention_bias", False))
    args = _hf.args_from_config(config, where, qkv_bias=bias, attn_out_bias=bias,
                                mlp_bias=bool(config.get("mlp_bias", False)), rope_interleaved=ROPE_INTERLEAVED)
    return dataclasses.replace(args, no_rope_layers=_no_rope_layers(config, where))


def fields(args: ModelArgs) -> dict:
    skip = set(args.no_rope_layers or ())
    return {"attention_bias": args.qkv_bias, "mlp_bias": args.mlp_bias,
            "no_rope_layers": [0 if i in skip else 1 for i in range(args.n_layers)]}


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    if args.qkv_bias != args.attn_out_bias:
        raise CkptError("smollm3 config.json has one attention_bias for q/k/v/o")
    if like is not None:
        old = args_from_hf(like)
        return _hf.update_config(like, old, args, dtype=dtype, fields=fields(args), old_fields=fields(old))
    return _hf.new_config(args, model_type="smollm3", architecture="SmolLM3ForCausalLM", dtype=dtype,
                          fields={**fields(args), "use_sliding_window": False}, head_dim=False)


# --- GGUF (llama.cpp), written by ckptflow/formats/gguf.py -----------------------------------

GGUF_ARCH = "smollm3"
# Llama's tensor names. llama.cpp rotates smollm3 in the Meta (interleaved) order: its converter
# (SmolLM3Model, a LlamaModel) permutes HF's q/k rows, and so does GGUF_RULES here (tune keeps the
# rotate-half rows). A tied model has no output tensor: llama.cpp then uses token_embd.
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
    "output.weight": "output.weight",
}
GGUF_RULES = {"layers.{}.attn.q_proj.weight": "meta_rows_q", "layers.{}.attn.k_proj.weight": "meta_rows_k"}
# llama.cpp has no GGUF key for the layers without RoPE: it skips RoPE on every 4th layer
# (hparams.n_no_rope_layer_step = 4: layer i when (i + 1) % 4 == 0), SmolLM3-3B's pattern.
GGUF_NO_ROPE_INTERVAL = 4


def gguf_metadata(args: ModelArgs) -> list:
    """No extra keys. Refused: layers without RoPE other than llama.cpp's fixed every-4th, llama3
    RoPE scaling (llama.cpp's smollm3 loads no rope_freqs tensor) and biases (it loads no o_proj or
    MLP bias; attention_bias puts one on o_proj)."""
    want = no_rope(args.n_layers, GGUF_NO_ROPE_INTERVAL)
    have = list(args.no_rope_layers or [])
    if have != want:
        raise CkptError(f"smollm3 GGUF: no_rope_layers: llama.cpp skips RoPE on every {GGUF_NO_ROPE_INTERVAL}th "
                        f"layer exactly (layers {want}); this model skips it on layers {have}")
    rope = (args.rope_scaling or {}).get("rope_type")
    if rope not in (None, "default", "linear"):
        raise CkptError(f"smollm3 GGUF: RoPE scaling {rope!r}: llama.cpp's smollm3 loads no rope_freqs tensor "
                        "(default and linear scaling export)")
    if args.qkv_bias or args.attn_out_bias or args.mlp_bias:
        raise CkptError("smollm3 GGUF: attention_bias / mlp_bias = true: llama.cpp's smollm3 loads no o_proj "
                        "or MLP bias")
    if args.hd * args.n_heads != args.dim:
        raise CkptError(f"smollm3 GGUF: head_dim {args.hd} is not hidden_size / num_attention_heads, "
                        "as llama.cpp's smollm3 needs")
    return []


def gguf_chat_template(template: str) -> str:
    """SmolLM3's chat template copies lists with `[:]`, a slice llama.cpp's template engine rejects:
    the upstream converter removes it (a copy of the list or the list itself render the same)."""
    return template.replace("[:]", "")
