"""What every format reads into and writes from: a View of lazy tensors.

A reader turns a directory into a View: tune-named Items (one tensor each, read only when asked)
plus what export needs to write the original back. A writer turns a View into files through
FilePlans. `tensor_bytes` / `tensor` read one Item, transformed and cast as it asks; nothing here
holds more than one tensor at a time.

Each format module provides some of: a sniff over a directory listing, an open (directory ->
View), a write (View -> files) and a describe (for `ckptflow detect`); formats.registry lists
them as one Format record per format.

Items may be shared between views (a merged view reuses its base's items), so nothing changes
an Item in place: `cast` returns a copy with another output dtype.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from ckptflow import storage
from ckptflow.formats import st
from ckptflow.manifest import Manifest


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

    @property
    def is_raw_copy(self) -> bool:
        """Its output bytes are its source bytes: safetensors, no transform, no cast."""
        return self.info is not None and self.permute is None and self.out_dtype in (None, self.dtype) \
            and self.parts is None


@dataclass
class FilePlan:
    name: str
    items: list[Item]
    metadata: dict = field(default_factory=lambda: {"format": "pt"})


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


def is_asset(uri: str, name: str, not_assets, weight_suffixes) -> bool:
    """A non-weight file of directory `uri` that travels with the weights (config, tokenizer):
    a file, not hidden, not in the format's `not_assets`, not ending in one of `weight_suffixes`."""
    if name in not_assets or name.startswith(".") or name.endswith(weight_suffixes):
        return False
    return storage.isfile(storage.join(uri, name))


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


def cast(it: Item, out_dtype: str | None) -> Item:
    """A copy of `it` written as `out_dtype` (None: its source dtype); `it` itself is unchanged."""
    parts = None if it.parts is None else [cast(p, out_dtype) for p in it.parts]
    return dataclasses.replace(it, out_dtype=out_dtype, parts=parts)


def tensor_bytes(it: Item, handles: dict) -> bytes:
    """The output bytes of one Item: read, permuted and cast as it asks. `handles` caches open
    source files (file URI -> file object) across calls; the caller closes them."""
    if it.parts is not None:
        return b"".join(tensor_bytes(p, handles) for p in it.parts)
    if it.info is not None and (it.out_dtype in (None, it.dtype)):
        return _permute_bytes(st.read_tensor_bytes(it.info, _handle(it.info.file, handles)), it)
    t = _source_tensor(it, handles)
    if it.permute is not None:
        t = _permute(t, it.permute)
    if it.out_dtype and it.out_dtype != it.dtype:
        import torch

        t = t.to(getattr(torch, st.TORCH_NAME[it.out_dtype]))
    return st.from_torch(t)[2]


def tensor(it: Item, handles: dict):
    """One Item as a torch tensor of its final dtype (see tensor_bytes)."""
    return st.to_torch(tensor_bytes(it, handles), it.final_dtype, it.shape)


def _handle(uri: str, handles: dict):
    return handles.get(uri) or handles.setdefault(uri, storage.open_read(uri))


def _source_tensor(it: Item, handles: dict):
    if it.load is not None:
        return it.load()
    return st.to_torch(st.read_tensor_bytes(it.info, _handle(it.info.file, handles)), it.dtype, it.shape)


def _permute_bytes(data: bytes, it: Item) -> bytes:
    """Rows of raw bytes in the order `it.permute` asks (no numpy: conversion imports none)."""
    if it.permute is None:
        return data
    from ckptflow.families import _base

    direction, n_heads = it.permute
    rows = it.shape[0]
    width = len(data) // max(rows, 1)
    view = memoryview(data)
    return b"".join(view[r * width:(r + 1) * width] for r in _base.row_order(rows, n_heads, direction == "to_tune"))


def _permute(x, permute: tuple):
    from ckptflow import families

    direction, n_heads = permute
    fn = families.permute_hf_to_tune if direction == "to_tune" else families.permute_tune_to_hf
    return fn(x, n_heads)


@dataclass
class View:
    uri: str
    format: str
    family: object                      # the family module
    args: object                        # ModelArgs
    items: dict[str, Item]              # tune key -> lazy tensor, in checkpoint order
    original: dict | None = None        # how the source laid itself out (for export)
    assets: dict[str, str] = field(default_factory=dict)   # non-weight files: name -> URI
    manifest: Manifest | None = None    # when the source is a committed ckptflow directory
    partition: list[list[str]] | None = None   # tune keys grouped as the source grouped them
    notes: list[str] = field(default_factory=list)  # what was left out (training state, ...)
    adapter: object | None = None       # formats.adapter.Adapter when the view is base + LoRA, merged lazily

    def state_dict(self, dtype=None) -> dict:
        """Every tensor materialised in tune names (a lazily merged LoRA weight included), one
        source file handle open at a time; for loading a model; conversion never does this."""
        import torch

        handles: dict = {}
        sd = {}
        try:
            for key, it in self.items.items():
                t = tensor(it, handles)
                sd[key] = t.to(dtype) if dtype is not None and torch.is_floating_point(t) else t
        finally:
            for h in handles.values():
                h.close()
        return sd

    def read_uris(self) -> set[str] | None:
        """The files its tensors and assets are read from; None when a tensor comes from a loader
        (.bin/.pth/DCP), whose files a View does not name."""
        uris = {a for a in self.assets.values() if isinstance(a, str)}
        todo = list(self.items.values())
        while todo:
            it = todo.pop()
            if it.parts is not None:
                todo.extend(it.parts)
            elif it.info is None:
                return None
            else:
                uris.add(it.info.file)
        return uris

    def plans(self, max_shard: int | None = None, out_dtype: str | None = None) -> list[FilePlan]:
        """The tune shards of copies of the items cast to out_dtype: the source's own grouping, or
        shards of at most max_shard bytes. The view's own items are left as they are."""
        items = {k: cast(it, out_dtype) for k, it in self.items.items()}
        if max_shard or not self.partition:
            return repartition(list(items.values()), max_shard or 5 * 10**9)
        groups = [[items[k] for k in keys if k in items] for keys in self.partition]
        groups = [g for g in groups if g]
        if len(groups) == 1:
            return [FilePlan("model.safetensors", groups[0])]
        n = len(groups)
        return [FilePlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


@dataclass
class Detection:
    """What `ckptflow detect` reports of a directory."""
    format: str
    uri: str
    family: str | None = None
    dtype: str | None = None
    num_params: int | None = None
    files: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": self.format, "uri": self.uri, "family": self.family, "dtype": self.dtype,
                "num_params": self.num_params, "files": self.files, **({"details": self.details} if self.details else {})}


def summarize(shapes_and_dtypes) -> tuple[str | None, int]:
    """(dominant dtype name, parameter count) of (shape, safetensors dtype code) pairs."""
    counts: dict[str, int] = {}
    for shape, code in shapes_and_dtypes:
        numel = 1
        for s in shape:
            numel *= s
        counts[code] = counts.get(code, 0) + numel
    dtype = st.TORCH_NAME.get(max(counts, key=counts.get)) if counts else None
    return dtype, sum(counts.values())


@dataclass(frozen=True)
class Format:
    """One on-disk format: its entry in formats.registry. A format that is only written (an export
    target) has no sniff, open or describe; one only read has no write."""
    name: str
    sniff: Callable[[list[str]], bool] | None = None   # does this directory listing hold the format?
    open: Callable[..., View] | None = None            # open(uri, *, opener, **reader options) -> View
    write: Callable[..., Manifest] | None = None       # write(view, out, *, out_dtype, max_shard, progress)
    describe: Callable[[str], Detection] | None = None # uri -> Detection (default: its files)
    claims: tuple[str, ...] = ()    # formats whose files its directories hold by design (its match wins)
