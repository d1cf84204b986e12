"""Checkpoints in other tools' layouts, built from a tiny transformers model's weights.

Meta, torchtune and litgpt do not install beside transformers 5 here (torchtune pins an older
torchao/transformers; litgpt pins lightning and an older transformers), so these fixtures follow
the exact layouts of docs/formats.md (key names, Meta model-parallel files, tool outputs) written out by hand,
independently of ckptflow's own readers: key tables, the q/k permute, the model-parallel split
dimensions, litgpt's fused qkv, torchtune's file names. DCP fixtures are written by
torch.distributed.checkpoint itself.
"""
from __future__ import annotations

import json
import os

import torch

from tests import hfmodels

ATOL = 1e-5

# docs/formats.md: HF -> Meta (also torchtitan <= v0.2.2) names, per layer and global.
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
HF_TO_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "sa_norm.scale",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
}
HF_TO_LIT = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
    "input_layernorm.weight": "norm_1.weight",
    "self_attn.o_proj.weight": "attn.proj.weight",
    "post_attention_layernorm.weight": "norm_2.weight",
    "mlp.gate_proj.weight": "mlp.fc_1.weight",
    "mlp.up_proj.weight": "mlp.fc_2.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
}
# docs/formats.md: concatenation dim of each Meta weight across model-parallel files.
MP_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def rename(key: str, table: dict, prefix: str = "layers") -> str:
    if key in table:
        return table[key]
    _, _, i, rest = key.split(".", 3)          # model.layers.{i}.{rest}
    return f"{prefix}.{i}.{table[rest]}"


def hf_to_meta_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """docs/formats.md, HF -> Meta: view [n, 2, hd/2, ...], swap axes 1 and 2."""
    rows = w.shape[0]
    return w.reshape(n, 2, rows // n // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tiny(family: str = "llama", seed: int = 0, **over):
    """(transformers model in float32, eval mode)."""
    return hfmodels.model(family, seed=seed, **over).eval()


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def tokens(vocab: int = 256, n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (2, n), generator=g)


# --- Meta ------------------------------------------------------------------------------------

def meta_state_dict(hf) -> dict:
    cfg = hf.config
    out = {}
    for k, v in hf.state_dict().items():
        name = rename(k, HF_TO_META)
        if name.endswith("wq.weight"):
            v = hf_to_meta_rows(v, cfg.num_attention_heads)
        elif name.endswith("wk.weight"):
            v = hf_to_meta_rows(v, cfg.num_key_value_heads)
        out[name] = v.clone()
    return out


def meta_params(hf, llama3: bool = True) -> dict:
    cfg = hf.config
    # dim 64 -> int(2*4*64/3) = 170; * 0.75 = 127; rounded up to a multiple of 128 -> 128.
    assert (cfg.hidden_size, cfg.intermediate_size) == (64, 128)
    p = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
         "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size if llama3 else -1,
         "multiple_of": 128, "ffn_dim_multiplier": 0.75, "norm_eps": cfg.rms_norm_eps}
    if llama3:
        p["rope_theta"] = 10000.0
    return p


def split_meta(sd: dict, mp: int, embedding_dim: int, n_kv: int) -> list[dict]:
    """docs/formats.md: one dict per model-parallel rank; norms replicated; KV heads replicated
    (repeat_interleave) when mp > n_kv."""
    ranks = [{} for _ in range(mp)]
    for k, v in sd.items():
        kind = k.split(".")[-2]
        if kind in ("wk", "wv") and mp > n_kv:
            rows = v.shape[0] // n_kv
            v = v.reshape(n_kv, rows, -1).repeat_interleave(mp // n_kv, dim=0).reshape(mp * rows, -1)
        dim = embedding_dim if kind == "tok_embeddings" else MP_DIM.get(kind)
        for r in range(mp):
            ranks[r][k] = v.clone() if dim is None else v.chunk(mp, dim=dim)[r].clone()
    return ranks


def write_meta(hf, path: str, mp: int = 1, llama3: bool = True, **params) -> str:
    os.makedirs(path, exist_ok=True)
    sd = meta_state_dict(hf)
    for r, part in enumerate(split_meta(sd, mp, 0 if llama3 else 1, hf.config.num_key_value_heads)):
        torch.save(part, os.path.join(path, f"consolidated.{r:02d}.pth"))
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump({**meta_params(hf, llama3), **params}, f)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(b"not a real sentencepiece model, copied as is")
    return path


# --- torchtune ---------------------------------------------------------------------------------

def tune_state_dict(hf) -> dict:
    """torchtune's own keys and layout (Meta rows for llama/mistral, HF rows for qwen2; docs/formats.md)."""
    cfg = hf.config
    permute = cfg.model_type in ("llama", "mistral")
    out = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = rename(k, HF_TO_TUNE)
        if permute and ".q_proj." in name:
            v = hf_to_meta_rows(v, cfg.num_attention_heads)
        elif permute and ".k_proj." in name:
            v = hf_to_meta_rows(v, cfg.num_key_value_heads)
        out[name] = v.clone()
    return out


# --- litgpt ------------------------------------------------------------------------------------

def lit_state_dict(hf, legacy: bool = False) -> dict:
    """docs/formats.md: attn.qkv = cat(q, k, v) (rotate-half rows, no permute); legacy attn.attn in
    KV-group order [q-group0, k0, v0, ...]; lm_head present even when tied."""
    cfg = hf.config
    sd = hf.state_dict()
    hd = cfg.hidden_size // cfg.num_attention_heads
    out = {}
    for k, v in sd.items():
        if ".self_attn.q_proj." in k or ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        out[rename(k, HF_TO_LIT, prefix="transformer.h")] = v.clone()
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    for i in range(cfg.num_hidden_layers):
        for kind in ("weight", "bias"):
            p = f"model.layers.{i}.self_attn."
            if p + f"q_proj.{kind}" not in sd:
                continue
            q, k, v = (sd[p + f"{x}_proj.{kind}"] for x in "qkv")
            if legacy:
                per = cfg.num_attention_heads // cfg.num_key_value_heads
                qs, ks, vs = q.split(per * hd), k.split(hd), v.split(hd)
                out[f"transformer.h.{i}.attn.attn.{kind}"] = torch.cat([t for g in zip(qs, ks, vs) for t in g])
            else:
                out[f"transformer.h.{i}.attn.qkv.{kind}"] = torch.cat((q, k, v))
    return out


def lit_config(hf) -> dict:
    """model_config.yaml as asdict(litgpt.Config) writes it for a Llama/Qwen2-style model."""
    cfg = hf.config
    qwen = cfg.model_type == "qwen2"
    scaling = getattr(cfg, "rope_scaling", None) or {}
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return {
        "name": "tiny", "hf_config": {"org": "test", "name": "tiny"}, "block_size": cfg.max_position_embeddings,
        "n_layer": cfg.num_hidden_layers, "n_embd": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "padding_multiple": 64, "padded_vocab_size": cfg.vocab_size, "norm_class_name": "RMSNorm",
        "norm_eps": cfg.rms_norm_eps, "norm_qk": False, "post_attention_norm": False, "post_mlp_norm": False,
        "parallel_residual": False, "shared_attention_norm": False, "n_head": cfg.num_attention_heads,
        "head_size": cfg.hidden_size // cfg.num_attention_heads, "n_query_groups": cfg.num_key_value_heads,
        "attn_bias": qwen, "attention_scores_scalar": None, "sliding_window_size": None,
        "sliding_window_indices": None, "attention_logit_softcapping": None, "rope_base": int(theta),
        "rotary_percentage": 1.0, "rope_condense_ratio": 1,
        "rope_adjustments": ({"factor": scaling["factor"], "low_freq_factor": scaling["low_freq_factor"],
                              "high_freq_factor": scaling["high_freq_factor"],
                              "original_max_seq_len": scaling["original_max_position_embeddings"]}
                             if scaling.get("rope_type") == "llama3" else None),
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": None, "bias": False,
        "mlp_class_name": "LLaMAMLP", "gelu_approximate": "none", "n_expert": 0, "n_expert_per_token": 0,
        "scale_embeddings": False, "lm_head_bias": False, "final_logit_softcapping": None, "norm_1": True,
        "norm_2": True, "latent_attention": None, "rope_local_base_freq": None, "rope_indices": None,
    }


def write_lit(hf, path: str, legacy: bool = False, wrap: bool = False) -> str:
    import yaml

    os.makedirs(path, exist_ok=True)
    sd = lit_state_dict(hf, legacy)
    torch.save({"model": sd} if wrap else sd, os.path.join(path, "lit_model.pth"))
    with open(os.path.join(path, "model_config.yaml"), "w") as f:
        yaml.safe_dump(lit_config(hf), f)
    return path
