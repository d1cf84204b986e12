"""config.json <-> ModelArgs for the Llama-like families, shared by llama.py, mistral.py and qwen2.py.

Reads both schemas: transformers v4 (top-level rope_theta / rope_scaling with "type" or
"rope_type", torch_dtype) and v5 (rope_parameters holding rope_theta and rope_type, dtype).
Writes v4 style from scratch (4.x and 5.x both read it), or edits an original config in place
of its own schema so that an unchanged model exports the very config.json it came with.
"""
from __future__ import annotations

import copy

from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

# ModelArgs field -> config.json field, where every Llama-like config spells it the same.
FIELDS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "hidden_dim": "intermediate_size",
    "head_dim": "head_dim",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
}
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
# Token ids kept in ModelArgs.extra so an export can write them back.
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
ROPE_PARAMS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               # Phi-3 long-context models (phi3.py brings the top-level original_max_position_embeddings in)
               "longrope": ("long_factor", "short_factor", "original_max_position_embeddings")}
HF_DEFAULT_EPS = 1e-6  # LlamaConfig/MistralConfig/Qwen2Config default when rms_norm_eps is absent


def rope_from_config(config: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either schema."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        params = dict(params)
        theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    else:
        params = dict(config.get("rope_scaling") or {})
        theta = config.get("rope_theta", 10000.0)
    kind = params.pop("rope_type", None) or params.get("type") or "default"
    params.pop("type", None)
    if kind not in ROPE_PARAMS:
        raise CkptError(f"{where}: rope_type {kind!r} is not supported (supported: {sorted(ROPE_PARAMS)})")
    missing = [p for p in ROPE_PARAMS[kind] if p not in params]
    if missing:
        raise CkptError(f"{where}: rope_type {kind!r} needs {missing}")
    return float(theta), None if kind == "default" else {"rope_type": kind, **params}


def args_from_config(config: dict, where: str, *, extra_keys: tuple = TOKEN_KEYS, **fixed) -> ModelArgs:
    """ModelArgs from the fields every Llama-like config shares; `fixed` sets the family's constants.
    A family that reads its activation itself passes `mlp_act`; otherwise hidden_act must be silu."""
    missing = [k for k in REQUIRED if config.get(k) is None]
    if missing:
        raise CkptError(f"{where}: missing {missing}")
    act = config.get("hidden_act", "silu")
    if "mlp_act" not in fixed and act != "silu":
        raise CkptError(f"{where}: hidden_act {act!r} is not supported (silu)")
    theta, scaling = rope_from_config(config, where)
    kw = {field: config[key] for field, key in FIELDS.items() if config.get(key) is not None}
    kw.setdefault("norm_eps", HF_DEFAULT_EPS)
    extra = {k: config[k] for k in extra_keys if config.get(k) is not None}
    return ModelArgs(**kw, rope_theta=theta, rope_scaling=scaling, extra=extra, **fixed)


def _field_value(args: ModelArgs, field: str):
    # None in ModelArgs means "derived"; config.json gets the derived number.
    return {"n_kv_heads": args.kv_heads, "head_dim": args.hd}.get(field, getattr(args, field))


def write_rope(cfg: dict, args: ModelArgs, v5: bool) -> None:
    scaling = dict(args.rope_scaling or {"rope_type": "default"})
    if v5:
        cfg["rope_parameters"] = {**scaling, "rope_theta": args.rope_theta}
    else:
        cfg["rope_theta"] = args.rope_theta
        cfg["rope_scaling"] = args.rope_scaling and dict(args.rope_scaling)


def write_dtype(cfg: dict, dtype: str | None, like: dict | None) -> None:
    if dtype is None:
        return
    like = like or {}
    keys = [k for k in ("dtype", "torch_dtype") if k in like]
    if not keys:  # v5 schema gets v5's name; otherwise both, for transformers before and after 4.56
        keys = ["dtype"] if "rope_parameters" in like else ["dtype", "torch_dtype"]
    for k in keys:
        cfg[k] = dtype


def new_config(args: ModelArgs, *, model_type: str, architecture: str, dtype: str | None,
               fields: dict, extra_keys: tuple = TOKEN_KEYS, head_dim: bool = True,
               act: dict | None = None) -> dict:
    """A v4-style config.json; `fields` are the family's own (bias flags and the like); `act` the
    activation's key and value where it is not {"hidden_act": "silu"}."""
    cfg = {"architectures": [architecture], "model_type": model_type, **(act or {"hidden_act": "silu"})}
    for field, key in FIELDS.items():
        if field != "head_dim" or head_dim or args.head_dim is not None:
            cfg[key] = _field_value(args, field)
    write_rope(cfg, args, v5=False)
    cfg.update(fields)
    cfg.update({k: args.extra[k] for k in extra_keys if k in args.extra})
    write_dtype(cfg, dtype, None)
    return cfg


def update_config(like: dict, old: ModelArgs, args: ModelArgs, *, dtype: str | None,
                  fields: dict, extra_keys: tuple = TOKEN_KEYS, old_fields: dict | None = None) -> dict:
    """`like` with only what differs between `old` (read from it) and `args` rewritten, in its schema.
    With `old_fields` (the family's `fields` computed from `old`), a family field is rewritten only
    where it changed, so a key `like` leaves to its default stays absent."""
    cfg = copy.deepcopy(like)
    for field, key in FIELDS.items():
        if getattr(old, field) != getattr(args, field):
            cfg[key] = _field_value(args, field)
    if (old.rope_theta, old.rope_scaling) != (args.rope_theta, args.rope_scaling):
        write_rope(cfg, args, v5="rope_parameters" in like)
    for key, value in fields.items():
        if (cfg.get(key, False) if old_fields is None else old_fields.get(key)) != value:
            cfg[key] = value
    for key in extra_keys:
        if old.extra.get(key) != args.extra.get(key):
            cfg[key] = args.extra.get(key)
    write_dtype(cfg, dtype, like)
    return cfg
