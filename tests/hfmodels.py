"""Tiny Hugging Face checkpoints written by transformers itself (the tool that defines the format)."""
from __future__ import annotations

import copy
import json
import os

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
# The newer dense families at tiny sizes, every feature on and strong enough to move the logits: a head_dim
# that is not hidden/heads, a sliding window (5) shorter than the test inputs, small soft-caps, an
# attention scale that is not head_dim's, per-layer-type RoPE with linear scaling, a layer without RoPE.
DENSE = {
    "qwen3": ("qwen3", dict(head_dim=32, **IDS)),
    "gemma": ("gemma", dict(head_dim=32, **IDS)),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=0.1,
                              final_logit_softcapping=1.0, **IDS)),
    "gemma3_text": ("gemma3_text", dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                                        final_logit_softcapping=1.0, rope_parameters=GEMMA3_ROPE,
                                        layer_types=["sliding_attention", "full_attention"], **IDS)),
    "smollm3": ("smollm3", dict(no_rope_layer_interval=2, **IDS)),
    "olmo2": ("olmo2", dict(**IDS)),
}


# Per family, what makes every feature move the logits at tiny sizes: a sliding window shorter
# than the test inputs, LongRoPE whose original context (8) the inputs outgrow, partial rotary,
# 4 experts with top-2 routing, a dense layer among the sparse ones.
LONGROPE = {"rope_type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(6)],
            "short_factor": [1.0 + 0.1 * i for i in range(6)]}
FAMILY_KW = {
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=6, original_max_position_embeddings=8,
                 rope_scaling=LONGROPE, partial_rotary_factor=0.75),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6, intermediate_size=96),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=32,
                      mlp_only_layers=[1], norm_topk_prob=False),
}


def config(family: str, **over):
    import transformers

    if family in DENSE:
        model_type, kw = DENSE[family]
        return transformers.AutoConfig.for_model(model_type, **{**TINY, **kw, **over})
    kw = dict(TINY)
    if family == "qwen2":
        kw["tie_word_embeddings"] = True
    kw.update(copy.deepcopy(FAMILY_KW.get(family, {})))   # transformers edits rope dicts in place
    kw.update(over)
    return transformers.AutoConfig.for_model(family, **kw)


def model(family: str, seed: int = 0, dtype=None, **over):
    import torch
    import transformers

    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(config(family, **over))
    with torch.no_grad():   # norms are ones at init; perturb so a wrong mapping cannot hide
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m.to(dtype) if dtype is not None else m


def save(family: str, path: str, *, shard: str | None = None, dtype=None, seed: int = 0, **over) -> str:
    """save_pretrained a tiny random model (sharded when `shard` is like "50KB")."""
    m = model(family, seed=seed, dtype=dtype, **over)
    kw = {"max_shard_size": shard} if shard else {}
    m.save_pretrained(path, **kw)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return path
