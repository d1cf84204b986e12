"""Write plans: which tensors go into which output file, from where, with which transform.

Every conversion is a plan executed one tensor at a time, so peak memory is about the largest
tensor, never the model. A tensor that needs no transform is copied as raw bytes in chunks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from ckptflow import storage
from ckptflow.errors import CkptError
from ckptflow.formats import st

log = logging.getLogger(__name__)


@dataclass
class Item:
    name: str                    # the key in the output file
    dtype: str                   # safetensors code of the source
    shape: list
    info: st.TensorInfo | None = None        # raw bytes on storage (safetensors)
    load: Callable | None = None             # or a callable returning a torch tensor (.bin/.pth/DCP)
    permute: tuple | None = None             # ("to_tune" | "to_hf", n_heads)
    out_dtype: str | None = None             # cast to this safetensors code
    parts: list | None = None                # or the concatenation (dim 0) of these Items (a fused tensor)

    @property
    def final_dtype(self) -> str:
        return self.out_dtype or self.dtype

    @property
    def out_nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * st.DTYPE_SIZE[self.final_dtype]


@dataclass
class FilePlan:
    name: str
    items: list[Item]
    metadata: dict = field(default_factory=lambda: {"format": "pt"})


def split_rows(it: Item, names: list[str], rows: list[int], out_dtype: str | None = None) -> list[Item]:
    """Items for consecutive row blocks of `it` (dim 0): byte ranges of its bytes on storage, or
    slices of the loaded tensor. A fused tensor (Phi-3 qkv_proj) is split this way, bit for bit."""
    row_bytes = st.DTYPE_SIZE[it.dtype]
    for s in it.shape[1:]:
        row_bytes *= s
    out, start = [], 0
    for name, n in zip(names, rows):
        shape = [n, *it.shape[1:]]
        if it.info is not None:
            i = it.info
            info = st.TensorInfo(name, i.dtype, shape, i.start + start * row_bytes, i.start + (start + n) * row_bytes,
                                 i.file)
            out.append(Item(name, it.dtype, shape, info=info, out_dtype=out_dtype))
        else:
            out.append(Item(name, it.dtype, shape, load=_rows(it.load, start, n), out_dtype=out_dtype))
        start += n
    return out


def _rows(load, start: int, n: int):
    return lambda: load()[start:start + n].contiguous()


def repartition(items: list[Item], max_bytes: int, pattern: str = "model") -> list[FilePlan]:
    """Split items, in order, into shards of at most max_bytes (a larger tensor gets its own),
    named like transformers does: model.safetensors, or model-0000i-of-0000N.safetensors."""
    groups: list[list[Item]] = [[]]
    size = 0
    for it in items:
        if groups[-1] and size + it.out_nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += it.out_nbytes
    if len(groups) == 1:
        return [FilePlan(f"{pattern}.safetensors", groups[0])]
    n = len(groups)
    return [FilePlan(f"{pattern}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def parse_size(text: str | int | None) -> int | None:
    """'5GB' -> 5e9 (decimal units, as huggingface_hub uses)."""
    if text is None or isinstance(text, int):
        return text
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    s = text.strip().upper()
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise CkptError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2000000") from None


def write_file(out, plan: FilePlan, progress=None) -> None:
    """Stream one planned safetensors file into Output `out`."""
    entries = [(it.name, it.final_dtype, it.shape, it.out_nbytes) for it in plan.items]
    handles: dict[str, object] = {}
    try:
        with out.open(plan.name) as f:
            f.write(st.header_bytes(entries, plan.metadata))
            for it in plan.items:
                _write_item(f, it, handles)
                if progress is not None:
                    progress(it.out_nbytes)
    finally:
        for h in handles.values():
            h.close()


def _write_item(f, it: Item, handles: dict) -> None:
    if it.parts is not None:    # rows on dim 0 are contiguous: a fused tensor is its parts' bytes in turn
        for part in it.parts:
            _write_item(f, part, handles)
        return
    if it.info is not None and it.permute is None and it.out_dtype in (None, it.dtype):
        src = handles.get(it.info.file) or handles.setdefault(it.info.file, storage.open_read(it.info.file))
        for chunk in st.iter_tensor_chunks(it.info, src):
            f.write(chunk)
        return
    data = _transformed_bytes(it, handles)
    if len(data) != it.out_nbytes:
        raise CkptError(f"tensor {it.name!r}: produced {len(data)} bytes, expected {it.out_nbytes}")
    f.write(data)


def _transformed_bytes(it: Item, handles: dict) -> bytes:
    if it.parts is not None:
        return b"".join(_transformed_bytes(p, handles) for p in it.parts)
    if it.info is not None and (it.out_dtype in (None, it.dtype)):
        src = handles.get(it.info.file) or handles.setdefault(it.info.file, storage.open_read(it.info.file))
        return _permute_bytes(st.read_tensor_bytes(it.info, src), it)
    tensor = _source_tensor(it, handles)
    if it.permute is not None:
        tensor = _permute(tensor, it.permute)
    if it.out_dtype and it.out_dtype != it.dtype:
        import torch

        tensor = tensor.to(getattr(torch, st.TORCH_NAME[it.out_dtype]))
    return st.from_torch(tensor)[2]


def _source_tensor(it: Item, handles: dict):
    if it.load is not None:
        return it.load()
    src = handles.get(it.info.file) or handles.setdefault(it.info.file, storage.open_read(it.info.file))
    return st.to_torch(st.read_tensor_bytes(it.info, src), it.dtype, it.shape)


def _permute_bytes(data: bytes, it: Item) -> bytes:
    if it.permute is None:
        return data
    import numpy as np

    rows = it.shape[0]
    arr = np.frombuffer(data, dtype=np.uint8).reshape(rows, len(data) // max(rows, 1))
    return _permute(arr, it.permute).tobytes()


def _permute(x, permute: tuple):
    from ckptflow import families

    direction, n_heads = permute
    fn = families.permute_hf_to_tune if direction == "to_tune" else families.permute_tune_to_hf
    return fn(x, n_heads)
