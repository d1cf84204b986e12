"""Gemma 2 (HF model_type "gemma2"): Gemma 1 plus four norms per layer, attention scale
`query_pre_attn_scalar**-0.5`, attention-logit and final-logit soft-caps (c * tanh(x / c)), and a
sliding window on the layers `layer_types` marks "sliding_attention" (every other one by default).

Norms: `input_layernorm` before attention (tune sa_norm), `post_attention_layernorm` on the attention
output before the residual add (sa_scale), `pre_feedforward_layernorm` before the MLP (mlp_norm),
`post_feedforward_layernorm` on the MLP output (mlp_scale), all x * (1 + w). The activation is read
from `hidden_activation`. Tune layout keeps HF's rotate-half rows.
"""
from __future__ import annotations

import ckptflow.families._hf as _hf
import ckptflow.families.gemma as _gemma
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "gemma2"
MODEL_TYPES = ("gemma2",)
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
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.sa_scale.scale",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_scale.scale",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}

PEFT_TARGETS = _gemma.PEFT_TARGETS

# What Gemma2Config assumes when config.json leaves a field out.
DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "sliding_window": 4096}
LAYER_TYPES = ("full_attention", "sliding_attention")
EXTRA_KEYS = _hf.TOKEN_KEYS + ("sliding_window",)


def seed_args(o: dict) -> dict:
    """seed://gemma2 defaults: soft-caps, post-norms, alternating sliding layers (window 4096)."""
    return {**_gemma.SEED_ARGS, "post_norms": True, "attn_scalar": 256.0, "attn_softcap": 50.0,
            "final_softcap": 30.0, "layer_types": alternating(o["n_layers"], 2),
            "extra": {"sliding_window": 4096}}


def alternating(n_layers: int, pattern: int) -> list[str]:
    """transformers' default layer_types: every `pattern`-th layer full, the others sliding."""
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]


def with_defaults(config: dict, defaults: dict) -> dict:
    """config.json with the config class's defaults filled in where a key is absent (null stays null,
    as for the soft-caps, except where null is no value at all)."""
    return {**defaults, **{k: v for k, v in config.items() if v is not None or k in ("attn_logit_softcapping",
                                                                                       "final_logit_softcapping")}}


def layer_types(config: dict, pattern: int, where: str) -> list[str]:
    types = config.get("layer_types")
    n = config["num_hidden_layers"]
    if types is None:
        return alternating(n, pattern)
    if not isinstance(types, list) or len(types) != n:
        got = len(types) if isinstance(types, list) else repr(types)
        raise CkptError(f"{where}: layer_types has {got} entries, num_hidden_layers is {n}")
    bad = [t for t in types if t not in LAYER_TYPES]
    if bad:
        raise CkptError(f"{where}: layer_types entry {bad[0]!r} is not supported ({', '.join(LAYER_TYPES)})")
    return list(types)


def gemma2_args(config: dict, where: str, pattern: int, **fixed) -> ModelArgs:
    """The ModelArgs Gemma 2 and 3 share; `config` has its defaults filled in."""
    _gemma.check_causal(config, where)
    bias = bool(config.get("attention_bias", False))
    scalar = config["query_pre_attn_scalar"]
    return _hf.args_from_config(
        config, where, extra_keys=EXTRA_KEYS, qkv_bias=bias, attn_out_bias=bias,
        mlp_act=_gemma.activation(config, "hidden_activation", where), post_norms=True,
        attn_scalar=None if scalar is None else float(scalar), attn_softcap=config["attn_logit_softcapping"],
        final_softcap=config["final_logit_softcapping"], layer_types=layer_types(config, pattern, where),
        **_gemma.GEMMA_ARGS, **fixed)


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    return gemma2_args(with_defaults(config, DEFAULTS), where, pattern=2)


def fields(args: ModelArgs) -> dict:
    """The Gemma 2/3 config.json fields beyond Llama's, from ModelArgs."""
    scalar = args.attn_scalar
    return {"attention_bias": args.qkv_bias,
            "query_pre_attn_scalar": int(scalar) if scalar is not None and scalar == int(scalar) else scalar,
            "attn_logit_softcapping": args.attn_softcap, "final_logit_softcapping": args.final_softcap,
            "layer_types": args.layer_types}


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    _gemma.check_args(args, NAME, post_norms=True, qk_norm=None, rope_local_theta=None, no_rope_layers=None)
    if like is not None:
        old = args_from_hf(like)
        return _hf.update_config(like, old, args, dtype=dtype, fields=fields(args), old_fields=fields(old),
                                 extra_keys=EXTRA_KEYS)
    return _hf.new_config(args, model_type="gemma2", architecture="Gemma2ForCausalLM", dtype=dtype,
                          fields={**fields(args), "sliding_window": args.extra.get("sliding_window")},
                          extra_keys=EXTRA_KEYS, act={"hidden_activation": "gelu_pytorch_tanh"})


# --- GGUF (llama.cpp), written by ckptflow/formats/gguf.py -----------------------------------

GGUF_ARCH = "gemma2"
TUNE_TO_GGUF = {
    **_gemma.TUNE_TO_GGUF,
    "layers.{}.sa_scale.scale": "blk.{}.post_attention_norm.weight",
    "layers.{}.mlp_scale.scale": "blk.{}.post_ffw_norm.weight",
}
GGUF_RULES = _gemma.GGUF_RULES


def gguf_window(args: ModelArgs, arch: str) -> list:
    """Sliding window and its layer pattern (llama.cpp: layer i slides iff i % n < n - 1); llama.cpp
    scales queries by head_dim ** -0.5 (hidden / heads for 46- and 62-layer models)."""
    hd = args.n_heads and args.hd
    implied = (args.dim / args.n_heads) if args.n_layers in (46, 62) else hd
    if args.attn_scalar not in (None, implied):
        raise CkptError(f"{arch} GGUF: query_pre_attn_scalar {args.attn_scalar} is not the {implied} llama.cpp uses")
    kinds = args.layer_types or ["full_attention"] * args.n_layers
    window = args.extra.get("sliding_window")
    pattern = next((n for n in range(1, args.n_layers + 2) if kinds == alternating(args.n_layers, n)), None)
    if window is None or "sliding_attention" not in kinds:
        pattern = 1
    if pattern is None:
        raise CkptError(f"{arch} GGUF: layer_types {kinds} is not a repeating pattern llama.cpp reads")
    return [("{arch}.attention.sliding_window", "u32", window or 0),
            ("{arch}.attention.sliding_window_pattern", "u32", pattern)]


def gguf_metadata(args: ModelArgs) -> list:
    _gemma.gguf_metadata(args)
    caps = [("{arch}.attn_logit_softcapping", "f32", args.attn_softcap or 0.0),
            ("{arch}.final_logit_softcapping", "f32", args.final_softcap or 0.0)]
    return gguf_window(args, GGUF_ARCH) + caps
