"""Fused HF tensors: one HF tensor that is several tune tensors stacked on dim 0.

Phi-3's `self_attn.qkv_proj` is [q; k; v] and `mlp.gate_up_proj` is [gate; up]. A family lists
them in HF_FUSED ({HF template: (tune template, ...)}, in stacking order). Rows on dim 0 are
contiguous bytes, so a part is a byte range of the fused tensor and fusing is concatenation: both
directions stay raw byte copies, bit for bit, one tensor at a time.

A leaf module beside _base: family modules and formats import it without the package root.
"""
from __future__ import annotations

import functools

import ckptflow.families._base as _base
from ckptflow.errors import CkptError


def _template(key: str) -> tuple[str, list[str]]:
    template = _base.template_of(key)
    return template, [p for p, t in zip(key.split("."), template.split(".")) if t == "{}"]


def parts_of(family, hf_key: str) -> tuple[str, ...] | None:
    """The tune keys a fused HF key holds, in row order; None for a key that is not fused."""
    table = getattr(family, "HF_FUSED", None)
    if not table:
        return None
    template, index = _template(hf_key)
    parts = table.get(template)
    return None if parts is None else tuple(p.format(*index) for p in parts)


@functools.lru_cache(maxsize=None)
def _reverse(family) -> dict[str, tuple[str, int]]:
    return {part: (hf, i) for hf, parts in getattr(family, "HF_FUSED", {}).items() for i, part in enumerate(parts)}


def fused_key(family, tune_key: str) -> tuple[str, int] | None:
    """(the fused HF key, this part's position) for a tune key that lives inside a fused tensor."""
    if not getattr(family, "HF_FUSED", None):
        return None
    template, index = _template(tune_key)
    found = _reverse(family).get(template)
    return None if found is None else (found[0].format(*index), found[1])


def rows(args, parts: tuple[str, ...]) -> list[int]:
    """Rows of each part, as the config says (q: n_heads*hd, k and v: n_kv*hd, gate and up: hidden)."""
    from ckptflow.model_args import expected_shapes

    shapes = expected_shapes(args)
    return [shapes[p][0] for p in parts]


def check_rows(args, hf_key: str, shape: list, parts: tuple[str, ...], where: str) -> list[int]:
    """The row split of a fused tensor; one error naming the key when the rows do not add up."""
    want = rows(args, parts)
    if not shape or shape[0] != sum(want):
        short = ", ".join(f"{p.rsplit('.', 2)[-2]} {n}" for p, n in zip(parts, want))
        raise CkptError(f"{where}: tensor {hf_key!r} has shape {list(shape)}; the config splits its rows into "
                        f"{short} = {sum(want)}")
    return want


def hf_state_dict_to_tune(sd: dict, family, args, where: str | None = None) -> dict:
    """families.hf_state_dict_to_tune with fused tensors split (torch tensors, views)."""
    plain, out = {}, {}
    for key, value in sd.items():
        parts = parts_of(family, key)
        if parts is None:
            plain[key] = value
            continue
        for part, t in zip(parts, value.split(check_rows(args, key, list(value.shape), parts, where or "state dict"))):
            out[part] = t
    return {**_base.hf_state_dict_to_tune(plain, family, args, where), **out}


def tune_state_dict_to_hf(sd: dict, family, args, where: str | None = None) -> dict:
    """families.tune_state_dict_to_hf with the parts of a fused tensor concatenated again."""
    import torch

    plain, fused = {}, {}
    for key, value in sd.items():
        found = fused_key(family, key)
        if found is None:
            plain[key] = value
        else:
            fused.setdefault(found[0], {})[found[1]] = value
    out = _base.tune_state_dict_to_hf(plain, family, args, where)
    for hf_key, parts in fused.items():
        if len(parts) != len(parts_of(family, hf_key)):
            raise CkptError(f"{where or 'state dict'}: {hf_key!r} lacks some of its parts {parts_of(family, hf_key)}")
        out[hf_key] = torch.cat([parts[i] for i in sorted(parts)])
    return out
