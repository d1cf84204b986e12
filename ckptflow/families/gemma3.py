"""Gemma 3 text (HF model_type "gemma3_text"): Gemma 2 without the soft-caps by default, plus
`self_attn.q_norm` / `k_norm` (x * (1 + w) over head_dim, per head, before RoPE), a 5:1 sliding
pattern (`layer_types`; older configs give `sliding_window_pattern`, 6), and RoPE per layer type:
the sliding layers use `rope_parameters["sliding_attention"]` (theta 1e4, no scaling), the full ones
`rope_parameters["full_attention"]` (theta 1e6, linear scaling factor 8 on 4B+). Transformers 4.x
configs say the same with `rope_local_base_freq` (sliding), `rope_theta` and `rope_scaling` (full).

The local theta and scaling live in ModelArgs.rope_local_theta / rope_local_scaling; rope_theta /
rope_scaling are the full layers'. Tune layout keeps HF's rotate-half rows.
"""
from __future__ import annotations

import copy
import dataclasses

import ckptflow.families._hf as _hf
import ckptflow.families.gemma as _gemma
import ckptflow.families.gemma2 as _gemma2
from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

NAME = "gemma3_text"
MODEL_TYPES = ("gemma3_text",)
ROPE_INTERLEAVED = False

HF_TO_TUNE = {
    **_gemma2.HF_TO_TUNE,
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.scale",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.scale",
}

PEFT_TARGETS = _gemma.PEFT_TARGETS

# What Gemma3TextConfig assumes when config.json leaves a field out.
DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 256, "attn_logit_softcapping": None, "final_logit_softcapping": None,
            "sliding_window": 4096}
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
DEFAULT_PATTERN = 6


def seed_args(o: dict) -> dict:
    """seed://gemma3_text defaults: q/k norms, the 5:1 pattern, per-layer-type RoPE."""
    return {**_gemma.SEED_ARGS, "post_norms": True, "qk_norm": "head", "attn_scalar": 256.0,
            "layer_types": _gemma2.alternating(o["n_layers"], DEFAULT_PATTERN),
            "rope_local_theta": 10_000.0, "extra": {"sliding_window": 4096}}


def ropes(config: dict, where: str) -> tuple[dict, dict]:
    """(full, sliding) RoPE parameters as flat v5 dicts {"rope_type", "rope_theta", ...}, either schema."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and set(params) & set(DEFAULT_THETA):
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:  # v4: rope_theta / rope_scaling are the full layers', rope_local_base_freq the sliding ones'
        full = {**(config.get("rope_scaling") or {})}
        if "rope_theta" in config:
            full["rope_theta"] = config["rope_theta"]
        local = {} if config.get("rope_local_base_freq") is None else {"rope_theta": config["rope_local_base_freq"]}
    for kind, p in (("full_attention", full), ("sliding_attention", local)):
        p.setdefault("rope_theta", DEFAULT_THETA[kind])
        p.setdefault("rope_type", p.pop("type", "default"))
    return full, local


def args_from_hf(config: dict, where: str = "config.json") -> ModelArgs:
    config = _gemma2.with_defaults(config, DEFAULTS)
    full, local = ropes(config, where)
    pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or DEFAULT_PATTERN
    flat = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta")}
    local_theta, local_scaling = _hf.rope_from_config({"rope_parameters": local}, where)
    args = _gemma2.gemma2_args({**flat, "rope_parameters": full}, where, pattern=pattern, qk_norm="head")
    return dataclasses.replace(args, rope_local_theta=local_theta, rope_local_scaling=local_scaling)


def _rope_of(args: ModelArgs, local: bool) -> dict:
    theta, scaling = (args.rope_local_theta, args.rope_local_scaling) if local else (args.rope_theta, args.rope_scaling)
    return {**(scaling or {"rope_type": "default"}), "rope_theta": theta}


def write_ropes(cfg: dict, args: ModelArgs, v5: bool) -> None:
    if v5:
        cfg["rope_parameters"] = {"full_attention": _rope_of(args, False), "sliding_attention": _rope_of(args, True)}
        return
    if args.rope_local_scaling:
        raise CkptError("gemma3_text: a transformers 4.x config.json cannot scale the sliding layers' RoPE")
    cfg.update(rope_theta=args.rope_theta, rope_local_base_freq=args.rope_local_theta,
               rope_scaling=args.rope_scaling and dict(args.rope_scaling))


def _rope_fields(args: ModelArgs) -> tuple:
    return args.rope_theta, args.rope_scaling, args.rope_local_theta, args.rope_local_scaling


def hf_config(args: ModelArgs, like: dict | None = None, dtype: str | None = None) -> dict:
    _gemma.check_args(args, NAME, post_norms=True, qk_norm="head", no_rope_layers=None)
    if args.rope_local_theta is None:
        raise CkptError("gemma3_text: the sliding layers' RoPE (rope_local_theta) is not set")
    if like is None:
        cfg = _hf.new_config(args, model_type="gemma3_text", architecture="Gemma3ForCausalLM", dtype=dtype,
                             fields={**_gemma2.fields(args), "sliding_window": args.extra.get("sliding_window")},
                             extra_keys=_gemma2.EXTRA_KEYS, act={"hidden_activation": "gelu_pytorch_tanh"})
        write_ropes(cfg, args, v5=False)
        return cfg
    old = args_from_hf(like)
    same_rope = dataclasses.replace(args, **dict(zip(("rope_theta", "rope_scaling", "rope_local_theta",
                                                      "rope_local_scaling"), _rope_fields(old))))
    cfg = _hf.update_config(like, old, same_rope, dtype=dtype, fields=_gemma2.fields(args),
                            old_fields=_gemma2.fields(old), extra_keys=_gemma2.EXTRA_KEYS)
    if _rope_fields(old) != _rope_fields(args):
        cfg = copy.deepcopy(cfg)
        write_ropes(cfg, args, v5=isinstance(like.get("rope_parameters"), dict))
    return cfg


# --- GGUF (llama.cpp), written by ckptflow/formats/gguf.py -----------------------------------

GGUF_ARCH = "gemma3"
TUNE_TO_GGUF = {
    **_gemma2.TUNE_TO_GGUF,
    "layers.{}.attn.q_norm.scale": "blk.{}.attn_q_norm.weight",
    "layers.{}.attn.k_norm.scale": "blk.{}.attn_k_norm.weight",
}
GGUF_RULES = _gemma.GGUF_RULES


def gguf_metadata(args: ModelArgs) -> list:
    """The sliding layers' RoPE base; llama.cpp has no attention soft-cap for gemma3."""
    _gemma.gguf_metadata(args)
    if args.attn_softcap:
        raise CkptError("gemma3 GGUF: attn_logit_softcapping: llama.cpp has no attention soft-cap for gemma3")
    if args.rope_local_scaling:     # llama.cpp scales only the full layers' RoPE (Gemma 3 4B+: linear 8)
        raise CkptError("gemma3 GGUF: RoPE scaling on the sliding layers is not exported (llama.cpp has none)")
    out = _gemma2.gguf_window(args, GGUF_ARCH)
    if args.rope_local_theta is not None:
        out.append(("{arch}.rope.freq_base_swa", "f32", args.rope_local_theta))
    if args.final_softcap:
        out.append(("{arch}.final_logit_softcapping", "f32", args.final_softcap))
    return out
