"""Tiny seed:// checkpoints for the storage tests: an HF directory as one file and as shards."""
from __future__ import annotations

SEED = "seed://llama?dim=64&n_layers=2&vocab_size=512"
SHARD = "60KB"


def hf_dirs(root: str) -> dict[str, str]:
    """{"single": HF dir with model.safetensors, "sharded": the same weights in shards + index}."""
    from ckptflow.stages import convert, download

    single, sharded = f"{root}/single", f"{root}/sharded"
    download.run(SEED, single)
    convert.run(single, sharded, to="hf", max_shard_size=SHARD)
    return {"single": single, "sharded": sharded}


def data_files(uri: str) -> dict[str, bytes]:
    """Every file of a directory but ckptflow.json, by relative name."""
    from ckptflow import storage

    return {n: storage.read_bytes(storage.join(uri, n)) for n in storage.list_files(uri) if n != "ckptflow.json"}
