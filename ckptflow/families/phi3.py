"""Phi-3, Phi-3.5, Phi-4 and Phi-4-mini (HF model_type "phi3").

Llama's decoder with two fused projections (formats.md 2.5): `self_attn.qkv_proj` = [q; k; v] and
`mlp.gate_up_proj` = [gate; up], stacked on dim 0. Tune keeps them split (q/k/v_proj, w1/w3, as
torchtune does); HF_FUSED tells the converters, which split and fuse them as byte ranges.
Tune layout keeps HF's rotate-half rows. RoPE: `partial_rotary_factor` (Phi-4-mini 0.75) turns
only the first int(hd * factor) dims of each head; the long-context models use LongRoPE
(`rope_type` longrope, or the older "su"/"yarn" that transformers reads as longrope) with
`short_factor` / `long_factor` and the top-level `original_max_position_embeddings`, which
transformers prefers to the one inside the rope parameters.
"""
from __future__ import annotations

import ckptflow.families._hf as _hf
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "phi3"
MODEL_TYPES = ("phi3",)
ROPE_INTERLEAVED = False

HF_TO_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}

# One HF tensor, several tune tensors, in row order (families/_fused.py).
HF_FUSED = {
    "model.layers.{}.self_attn.qkv_proj.weight": ("layers.{}.attn.q_proj.weight", "layers.{}.attn.k_proj.weight",
                                                  "layers.{}.attn.v_proj.weight"),
    "model.layers.{}.mlp.gate_up_proj.weight": ("layers.{}.mlp.w1.weight", "layers.{}.mlp.w3.weight"),
}

# tune module -> the HF module PEFT adapts: q, k and v share qkv_proj, gate and up gate_up_proj.
PEFT_TARGETS = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "output_proj": "o_proj",
    "w1": "gate_up_proj", "w2": "down_proj", "w3": "gate_up_proj", "output": "lm_head",
}

EXTRA_KEYS = _hf.TOKEN_KEYS + ("sliding_window",)
DEFAULT_ORIGINAL_MAX = 4096      # Phi3Config.original_max_position_embeddings when absent
DEFAULT_EPS = 1e-5               # Phi3Config.rms_norm_eps when absent


def seed_args(opts: dict) -> dict:
    """seed://phi3?...: Phi-4-mini's partial rotary factor 0.75 where it leaves an even rotary width."""
    hd = opts.get("head_dim") or opts["dim"] // opts["n_heads"]
    return {"partial_rotary_factor": 0.75 if int(hd * 0.75) % 2 == 0 else 1.0}


def _rope_key(config: dict) -> str | None:
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(config.get(key), dict):
            return key
    return None


def _normalised(config: dict, where: str) -> tuple[dict, float]:
    """(config with its rope parameters as _hf reads them, partial_rotary_factor)."""
    cfg = dict(config)
    key = _rope_key(cfg)
    params = dict(cfg[key]) if key else {}
    factor = params.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor") or 1.0
    kind = params.get("rope_type") or params.get("type")
    if kind in ("su", "yarn"):      # Phi3Config.convert_rope_params_to_dict reads both as longrope
        params.pop("type", None)
        params["rope_type"] = kind = "longrope"
    if kind == "longrope":
        params["original_max_position_embeddings"] = cfg.get(
            "original_max_position_embeddings", params.get("original_max_position_embeddings", DEFAULT_ORIGINAL_MAX))
    if key:
        cfg[key] = params
    cfg.setdefault("rms_norm_eps", DEFAULT_EPS)
    return cfg, float(factor)


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    cfg, partial = _normalised(config, where)
    if cfg.get("head_dim") is not None:
        raise CkptError(f"{where}: head_dim: Phi3 derives it from hidden_size / num_attention_heads")
    args = _hf.args_from_config(cfg, where, extra_keys=EXTRA_KEYS, rope_interleaved=ROPE_INTERLEAVED,
                                partial_rotary_factor=partial)
    scaling = args.rope_scaling or {}
    for name in ("short_factor", "long_factor"):
        if name in scaling and len(scaling[name]) != args.rotary_dim // 2:
            raise CkptError(f"{where}: rope {name} has {len(scaling[name])} values; head_dim {args.hd} with "
                            f"partial_rotary_factor {partial} needs {args.rotary_dim // 2}")
    return args


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    if args.qkv_bias or args.attn_out_bias or args.mlp_bias:
        raise CkptError("phi3 config.json cannot express biases (qkv_bias, attn_out_bias, mlp_bias)")
    if like is not None:
        cfg = _hf.update_config(like, args_from_hf(like), args, dtype=dtype, fields={}, extra_keys=EXTRA_KEYS)
        if args.partial_rotary_factor != args_from_hf(like).partial_rotary_factor:
            cfg["partial_rotary_factor"] = args.partial_rotary_factor
        return cfg
    fields = {"sliding_window": args.extra.get("sliding_window"), "partial_rotary_factor": args.partial_rotary_factor}
    scaling = args.rope_scaling or {}
    if "original_max_position_embeddings" in scaling:
        fields["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return _hf.new_config(args, model_type="phi3", architecture="Phi3ForCausalLM", dtype=dtype,
                          fields=fields, extra_keys=EXTRA_KEYS, head_dim=False)


# --- GGUF (llama.cpp), written by ckptflow/formats/gguf.py -----------------------------------

GGUF_ARCH = "phi3"
TUNE_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "layers.{}.sa_norm.scale": "blk.{}.attn_norm.weight",
    "layers.{}.attn.output_proj.weight": "blk.{}.attn_output.weight",
    "layers.{}.mlp_norm.scale": "blk.{}.ffn_norm.weight",
    "layers.{}.mlp.w2.weight": "blk.{}.ffn_down.weight",
    "norm.scale": "output_norm.weight",
    "output.weight": "output.weight",
}
# llama.cpp's phi3 keeps HF's fused projections: [q; k; v] and ffn_up = [gate; up].
GGUF_FUSED = {
    "blk.{}.attn_qkv.weight": ("layers.{}.attn.q_proj.weight", "layers.{}.attn.k_proj.weight",
                               "layers.{}.attn.v_proj.weight"),
    "blk.{}.ffn_up.weight": ("layers.{}.mlp.w1.weight", "layers.{}.mlp.w3.weight"),
}


def gguf_metadata(args: ModelArgs) -> list:
    """The window is written as upstream writes it (0: none); llama.cpp runs Phi-3 without it (it
    warns), so past the window its logits differ from transformers'."""
    return [("{arch}.attention.sliding_window", "u32", args.extra.get("sliding_window") or 0)]
