"""litgpt model_config.yaml (`asdict(litgpt.Config)`) -> ModelArgs, shared by llama, mistral, qwen2.

litgpt has no model_type: a config is one of ours when its structure is a pre-norm RMSNorm decoder
with a SwiGLU MLP, full rotary, no extra norms, soft-capping, experts or embedding scale. Anything
else is refused naming the field, never guessed.
"""
from __future__ import annotations

from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

# Field -> the value ckptflow's decoder implements; missing fields take litgpt's Config default
# (second element) so an incomplete file is judged as litgpt would read it.
STRUCTURE = {
    "norm_class_name": ("RMSNorm", "LayerNorm"),
    "mlp_class_name": ("LLaMAMLP", "GptNeoxMLP"),
    "parallel_residual": (False, True),
    "shared_attention_norm": (False, False),
    "bias": (False, True),
    "lm_head_bias": (False, False),
    "rotary_percentage": (1.0, 0.25),
    "rope_condense_ratio": (1, 1),
    "scale_embeddings": (False, False),
    "norm_qk": (False, False),
    "post_attention_norm": (False, False),
    "post_mlp_norm": (False, False),
    "norm_1": (True, True),
    "norm_2": (True, True),
    "n_expert": (0, 0),
    "latent_attention": (None, None),
    "attention_logit_softcapping": (None, None),
    "final_logit_softcapping": (None, None),
    "attention_scores_scalar": (None, None),
    "rope_local_base_freq": (None, None),
}


def check(cfg: dict, where: str) -> None:
    if not isinstance(cfg, dict):
        raise CkptError(f"{where}: not a mapping")
    for field, (want, default) in STRUCTURE.items():
        got = cfg.get(field, default)
        if got != want and not (isinstance(want, float) and isinstance(got, (int, float)) and float(got) == want):
            raise CkptError(f"{where}: {field}={got!r} is not supported (ckptflow's decoder needs {want!r})")
    for field in ("n_layer", "n_head", "n_embd", "intermediate_size"):
        if not isinstance(cfg.get(field), int):
            raise CkptError(f"{where}: missing {field}")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def rope_scaling(cfg: dict, where: str) -> dict | None:
    adj = cfg.get("rope_adjustments")
    if not adj:
        return None
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len") if k not in adj]
    if missing:
        raise CkptError(f"{where}: rope_adjustments lacks {missing}")
    return {"rope_type": "llama3", "factor": float(adj["factor"]), "low_freq_factor": float(adj["low_freq_factor"]),
            "high_freq_factor": float(adj["high_freq_factor"]),
            "original_max_position_embeddings": int(adj["original_max_seq_len"])}


def args_from_config(cfg: dict, where: str, **fixed) -> ModelArgs:
    check(cfg, where)
    n_head = cfg["n_head"]
    head = cfg.get("head_size") or cfg["n_embd"] // n_head
    vocab = cfg.get("padded_vocab_size") or find_multiple(cfg.get("vocab_size", 50254), cfg.get("padding_multiple", 512))
    return ModelArgs(dim=cfg["n_embd"], n_layers=cfg["n_layer"], n_heads=n_head,
                     n_kv_heads=cfg.get("n_query_groups") or n_head,
                     head_dim=head if head * n_head != cfg["n_embd"] else None,
                     vocab_size=vocab, hidden_dim=cfg["intermediate_size"],
                     norm_eps=float(cfg.get("norm_eps", 1e-5)), rope_theta=float(cfg.get("rope_base", 10000)),
                     rope_scaling=rope_scaling(cfg, where), max_seq_len=int(cfg.get("block_size", 4096)), **fixed)
