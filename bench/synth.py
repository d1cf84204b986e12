"""Synthetic Hugging Face Llama checkpoints of any size, written fast (random bytes, no torch),
for the conversion benchmark and the peak-memory test."""
from __future__ import annotations

import json
import os

import numpy as np

from ckptflow.formats import st


def llama_config(dim: int, n_layers: int, vocab: int, hidden: int, heads: int, kv_heads: int, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
            "intermediate_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
            "torch_dtype": dtype, "hidden_act": "silu"}


def tensors(c: dict) -> list[tuple[str, list[int]]]:
    d, h, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", [v, d])]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", [d]), (p + "self_attn.q_proj.weight", [d, d]),
                (p + "self_attn.k_proj.weight", [kv, d]), (p + "self_attn.v_proj.weight", [kv, d]),
                (p + "self_attn.o_proj.weight", [d, d]), (p + "post_attention_layernorm.weight", [d]),
                (p + "mlp.gate_proj.weight", [h, d]), (p + "mlp.up_proj.weight", [h, d]),
                (p + "mlp.down_proj.weight", [d, h])]
    return out + [("model.norm.weight", [d]), ("lm_head.weight", [v, d])]


def write(path: str, *, dim=1024, n_layers=8, vocab=32000, hidden=2816, heads=16, kv_heads=4,
          dtype="bfloat16", shard_bytes=64 * 10**6, seed=0) -> dict:
    """Write config.json + shards + index into `path`; returns {total_bytes, largest_shard, shards}."""
    os.makedirs(path, exist_ok=True)
    c = llama_config(dim, n_layers, vocab, hidden, heads, kv_heads, dtype)
    code, size = st.ST_NAME[dtype], st.DTYPE_SIZE[st.ST_NAME[dtype]]
    groups, cur, cur_bytes = [], [], 0
    for name, shape in tensors(c):
        n = int(np.prod(shape)) * size
        if cur and cur_bytes + n > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape, n))
        cur_bytes += n
    groups.append(cur)
    rng = np.random.default_rng(seed)
    weight_map, sizes = {}, []
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        with open(os.path.join(path, fname), "wb") as f:
            f.write(st.header_bytes([(n, code, s, b) for n, s, b in g], {"format": "pt"}))
            for name, _, b in g:
                f.write(rng.integers(0, 256, size=b, dtype=np.uint8).tobytes())
                weight_map[name] = fname
        sizes.append(os.path.getsize(os.path.join(path, fname)))
    total = sum(b for g in groups for _, _, b in g)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    return {"total_bytes": total, "largest_shard": max(sizes), "shards": len(groups)}


def layers_for(size_bytes: int, *, dim, vocab, hidden, heads, kv_heads, itemsize: int = 2) -> int:
    """The fewest layers that make a checkpoint of at least size_bytes."""
    n = 1
    while True:
        c = llama_config(dim, n, vocab, hidden, heads, kv_heads, "bfloat16")
        if sum(int(np.prod(s)) for _, s in tensors(c)) * itemsize >= size_bytes:
            return n
        n += 1
