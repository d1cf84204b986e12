"""Tiny Hugging Face checkpoints written by transformers itself (the tool that defines the format)."""
from __future__ import annotations

import json
import os

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


def config(family: str, **over):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    kw = dict(TINY)
    if family == "qwen2":
        kw["tie_word_embeddings"] = True
    kw.update(over)
    return cls(**kw)


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
