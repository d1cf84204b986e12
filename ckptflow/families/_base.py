"""The helpers family modules and the rest of ckptflow use to map keys through a family's tables.

A leaf module: it imports nothing from `ckptflow.families`, so family modules import it (and
_hf, _meta, _litgpt) without going through the package root, whose registry imports them.
"""
from __future__ import annotations

import functools
import re

from ckptflow.errors import CkptError
from ckptflow.model_args import ModelArgs

# Tune keys whose rows follow the q/k head layout (weights and biases). The tune names are the
# model's own and the same for every family; n_heads rows for "q", n_kv_heads rows for "k".
QK_ROWS = {
    "layers.{}.attn.q_proj.weight": "q",
    "layers.{}.attn.q_proj.bias": "q",
    "layers.{}.attn.k_proj.weight": "k",
    "layers.{}.attn.k_proj.bias": "k",
}

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


class UnknownKeyError(CkptError, ValueError):
    """A checkpoint key that the family's table does not map."""

    def __init__(self, key: str, family: str, where: str | None = None):
        self.key, self.family, self.where = key, family, where
        place = f" in {where}" if where else ""
        super().__init__(f"key {key!r}{place} is not in the {family} key table")


class UnknownFamilyError(CkptError, KeyError):
    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def _template(key: str) -> tuple[str, list[str]]:
    return _INDEX.sub("{}", key), _INDEX.findall(key)


@functools.lru_cache(maxsize=None)
def _tune_to_hf_table(family) -> dict[str, str]:
    return {tune: hf for hf, tune in family.HF_TO_TUNE.items() if tune is not None}


def _lookup(table: dict, key: str, family, where: str | None):
    template, index = _template(key)
    if template not in table:
        raise UnknownKeyError(key, family.NAME, where)
    target = table[template]
    return None if target is None else target.format(*index)


def hf_key_to_tune(family, key: str, where: str | None = None) -> tuple[str | None, str | None]:
    """(tune key or None to drop, transform): transform "q"/"k" means permute_hf_to_tune the rows.

    A family's optional HF_DROP_PREFIXES drops whole sub-models (a vision tower) on import."""
    if key.startswith(getattr(family, "HF_DROP_PREFIXES", ())):
        return None, None
    tune = _lookup(family.HF_TO_TUNE, key, family, where)
    if tune is None:
        return None, None
    return tune, _transform(family, tune)


def tune_key_to_hf(family, key: str, where: str | None = None) -> tuple[str, str | None]:
    """(HF key, transform): transform "q"/"k" means permute_tune_to_hf the rows."""
    return _lookup(_tune_to_hf_table(family), key, family, where), _transform(family, key)


def _transform(family, tune_key: str) -> str | None:
    if not family.ROPE_INTERLEAVED:
        return None
    return QK_ROWS.get(_template(tune_key)[0])


def _permute(x, n_heads: int, forward: bool):
    rows = x.shape[0]
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise CkptError(f"cannot permute {rows} rows into {n_heads} heads of even size")
    half, rest = rows // n_heads // 2, tuple(x.shape[1:])
    inner = (n_heads, 2, half) if forward else (n_heads, half, 2)
    y = x.reshape(inner + rest).swapaxes(1, 2).reshape((rows,) + rest)
    if hasattr(y, "contiguous"):  # torch
        return y.contiguous()
    import numpy as np

    return np.ascontiguousarray(y)


def row_order(rows: int, n_heads: int, forward: bool) -> list[int]:
    """The source row of every output row of `_permute` (for raw bytes, without numpy)."""
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise CkptError(f"cannot permute {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    if forward:
        return [h * 2 * half + j * half + i for h in range(n_heads) for i in range(half) for j in range(2)]
    return [h * 2 * half + i * 2 + j for h in range(n_heads) for j in range(2) for i in range(half)]


def permute_hf_to_tune(x, n_heads: int):
    """Rows of q/k (or their bias, or a raw byte view [rows, row_bytes]): HF rotate-half -> Meta interleaved.

    Works on torch tensors and numpy arrays; a pure index permutation, so bit-exact in any dtype.
    """
    return _permute(x, n_heads, forward=True)


def permute_tune_to_hf(x, n_heads: int):
    """Inverse of permute_hf_to_tune: Meta interleaved -> HF rotate-half."""
    return _permute(x, n_heads, forward=False)


def _heads(args: ModelArgs, transform: str) -> int:
    return args.n_heads if transform == "q" else args.kv_heads


def hf_state_dict_to_tune(sd: dict, family, args: ModelArgs, where: str | None = None) -> dict:
    """An HF state dict (torch tensors) in tune names and layout; the tied head is dropped."""
    out = {}
    for key, value in sd.items():
        tune, transform = hf_key_to_tune(family, key, where)
        if tune is None or (args.tie_embeddings and tune == "output.weight"):
            continue
        out[tune] = permute_hf_to_tune(value, _heads(args, transform)) if transform else value
    return out


def tune_state_dict_to_hf(sd: dict, family, args: ModelArgs, where: str | None = None) -> dict:
    """A tune state dict in HF names and layout, as save_pretrained stores it (no tied lm_head)."""
    out = {}
    for key, value in sd.items():
        if args.tie_embeddings and key == "output.weight":
            continue
        hf, transform = tune_key_to_hf(family, key, where)
        out[hf] = permute_tune_to_hf(value, _heads(args, transform)) if transform else value
    return out


def template_of(key: str) -> str:
    """The `{}`-templated form of a key ("layers.3.attn.q_proj.weight" -> "layers.{}.attn.q_proj.weight")."""
    return _template(key)[0]


def table(family, name: str) -> dict:
    """A family's key table for another tool's layout ("META_TO_TUNE", "LITGPT_TO_TUNE", ...)."""
    found = getattr(family, name, None)
    if found is None:
        raise CkptError(f"family {family.NAME!r} has no {name} table: that format is not supported for it")
    return found


@functools.lru_cache(maxsize=None)
def _reverse(family, name: str) -> dict[str, str]:
    return {tune: other for other, tune in table(family, name).items() if isinstance(tune, str)}


def foreign_key_to_tune(family, name: str, key: str, where: str | None = None):
    """`key` of another tool's layout in tune names through table `name`: a tune key, None (drop),
    or a tuple of tune keys (a fused tensor, e.g. litgpt's qkv). Unmapped keys raise UnknownKeyError."""
    template, index = _template(key)
    found = table(family, name)
    if template not in found:
        raise UnknownKeyError(key, family.NAME, where)
    target = found[template]
    if isinstance(target, tuple):
        return tuple(t.format(*index) for t in target)
    return None if target is None else target.format(*index)


def tune_key_to_foreign(family, name: str, key: str, where: str | None = None) -> str:
    """The inverse of foreign_key_to_tune for one-to-one entries."""
    return _lookup(_reverse(family, name), key, family, where)


def hf_dtype(config: dict) -> str | None:
    """The weights' dtype a config.json declares: "dtype" (transformers >= 4.56) or "torch_dtype"."""
    return config.get("dtype") or config.get("torch_dtype")
