"""Meta params.json <-> ModelArgs, shared by the families that have a Meta layout (llama, mistral).

params.json (formats.md 3.2) names the architecture in Meta's own terms: the FFN size is derived
from `multiple_of` / `ffn_dim_multiplier` (or given as `hidden_dim` in Mistral's files),
`vocab_size` is -1 in Llama 1/2 (the tokenizer decides it), and llama3 RoPE scaling is only the
boolean `use_scaled_rope`: the factor (8 for Llama 3.1/3.3, 32 for Llama 3.2 1B/3B) is not in the
file, so it must come from the user, from a ckptflow manifest, or from a table of released models.
"""
from __future__ import annotations

from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

# What Meta's reference code hard-codes for use_scaled_rope (llama-models apply_scaling);
# only the factor differs between releases.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
REQUIRED = ("dim", "n_layers", "n_heads")
META_DEFAULT_EPS = 1e-5      # llama ModelArgs.norm_eps default
META_DEFAULT_SEQ = 2048      # llama ModelArgs.max_seq_len default


def ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    h = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, hidden: int) -> dict:
    """multiple_of / ffn_dim_multiplier that give `hidden` back through ffn_hidden."""
    base = int(2 * (4 * dim) / 3)
    for multiple_of in (4096, 1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if hidden % multiple_of:
            continue
        if ffn_hidden(dim, multiple_of, None) == hidden:
            return {"multiple_of": multiple_of}
        for digits in (1, 2, 3, 4, 6):
            mult = round(hidden / base, digits)
            if ffn_hidden(dim, multiple_of, mult) == hidden:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    # Always possible: rounding up to `hidden` itself from just below it.
    return {"multiple_of": hidden, "ffn_dim_multiplier": hidden / base}


def rope_scaling(params: dict, where: str, factor: float | None) -> dict | None:
    """ModelArgs.rope_scaling for params.json; `factor` is what the caller could find out."""
    if not params.get("use_scaled_rope"):
        if factor is not None and params.get("rope_scaling_factor") is None:
            raise CkptError(f"{where}: a RoPE scaling factor was given but use_scaled_rope is not set")
        return None
    factor = params.get("rope_scaling_factor") or factor
    if factor is None:
        raise CkptError(f"{where}: use_scaled_rope is true but params.json cannot say the scaling factor "
                        "(8 for Llama 3.1/3.3, 32 for Llama 3.2 1B/3B) and this model is not one ckptflow "
                        "knows; pass --rope-scaling-factor")
    return {"rope_type": "llama3", "factor": float(factor), **LLAMA3_ROPE}


def check(params: dict, where: str) -> None:
    if not isinstance(params, dict):
        raise CkptError(f"{where}: not a JSON object")
    missing = [k for k in REQUIRED if not isinstance(params.get(k), int)]
    if missing:
        raise CkptError(f"{where}: missing {missing}")


def args_from_params(params: dict, where: str, *, vocab_size: int, hidden_dim: int, rope: dict | None,
                     max_seq_len: int | None, **fixed) -> ModelArgs:
    """ModelArgs from params.json fields Llama and Mistral share; sizes the file may leave out
    (vocab, FFN) are resolved by the caller."""
    check(params, where)
    return ModelArgs(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                     n_kv_heads=params.get("n_kv_heads"), head_dim=params.get("head_dim"),
                     vocab_size=vocab_size, hidden_dim=hidden_dim,
                     norm_eps=float(params.get("norm_eps", META_DEFAULT_EPS)),
                     rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=rope,
                     max_seq_len=int(params.get("max_seq_len") or max_seq_len or META_DEFAULT_SEQ),
                     rope_interleaved=True, **fixed)


def check_writable(args: ModelArgs, family: str) -> None:
    """What params.json and Meta's model cannot express."""
    if args.qkv_bias or args.attn_out_bias or args.mlp_bias:
        raise CkptError(f"{family}: the Meta format has no biases (qkv_bias/attn_out_bias/mlp_bias)")
    if not args.rope_interleaved:
        raise CkptError(f"{family}: the Meta format needs interleaved q/k rows")
    kind = (args.rope_scaling or {}).get("rope_type", "default")
    if kind not in ("default", "llama3"):
        raise CkptError(f"{family}: params.json cannot express rope_type {kind!r}")
    if kind == "llama3":
        other = {k: args.rope_scaling.get(k) for k in LLAMA3_ROPE if args.rope_scaling.get(k) != LLAMA3_ROPE[k]}
        if other:
            raise CkptError(f"{family}: Meta's use_scaled_rope fixes {LLAMA3_ROPE}; this model has {other}")


def common_params(args: ModelArgs) -> dict:
    out = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}
    if args.kv_heads != args.n_heads:
        out["n_kv_heads"] = args.kv_heads
    out.update(vocab_size=args.vocab_size, norm_eps=args.norm_eps, rope_theta=args.rope_theta)
    if args.rope_scaling:
        out["use_scaled_rope"] = True
    return out
