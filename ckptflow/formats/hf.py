"""Hugging Face transformers checkpoints: config.json + model.safetensors, sharded safetensors
with model.safetensors.index.json, or legacy pytorch_model*.bin (read with weights_only=True).

Reading yields a plan of tune-named tensors plus what export needs to write the same files
back: key order, file partition, per-file metadata, the index and every non-weight file.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field

from ckptflow import families, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.families import _fused
from ckptflow.formats.view import FilePlan, Item, is_asset, repartition, split_rows

log = logging.getLogger(__name__)

CONFIG = "config.json"
ST_SINGLE, ST_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".distcp")
NOT_ASSETS = {"ckptflow.json", ".ckptflow-writing", ST_INDEX, BIN_INDEX}
DEFAULT_SHARD = 5 * 10**9


@dataclass
class Source:
    uri: str
    config: dict
    family: object
    args: object
    weights: str                       # "safetensors" | "bin"
    index: str | None                  # index file name, if sharded
    files: list[str]                   # weight files in order
    tensors: dict[str, list[Item]]     # file -> items with HF names, in data order
    metadata: dict[str, dict]          # file -> safetensors __metadata__
    assets: list[str] = field(default_factory=list)


def is_hf(names: list[str]) -> bool:
    return CONFIG in names and any(n in names for n in (ST_SINGLE, ST_INDEX, BIN_SINGLE, BIN_INDEX))


def open_source(uri: str) -> Source:
    uri = storage.normalize(uri)
    names = storage.listdir(uri)
    if CONFIG not in names:
        raise CkptError(f"{storage.join(uri, CONFIG)}: missing (not a Hugging Face checkpoint)")
    config = storage.read_json(storage.join(uri, CONFIG))
    family = families.for_hf_config(config, where=storage.join(uri, CONFIG))
    args = family.args_from_hf(config, storage.join(uri, CONFIG))
    weights, index, files = _weight_files(uri, names)
    read = {f: _file_items(uri, f, weights) for f in files}
    tensors = {f: items for f, (_, items) in read.items()}
    if index:
        _check_index(uri, index, tensors)
    assets = [n for n in names if is_asset(uri, n, NOT_ASSETS, WEIGHT_SUFFIXES)]
    return Source(uri, config, family, args, weights, index, files, tensors,
                  {f: meta for f, (meta, _) in read.items()}, assets)


def _weight_files(uri: str, names: list[str]) -> tuple[str, str | None, list[str]]:
    for weights, index, single in (("safetensors", ST_INDEX, ST_SINGLE), ("bin", BIN_INDEX, BIN_SINGLE)):
        if index in names:
            data = storage.read_json(storage.join(uri, index))
            wm = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise CkptError(f"{storage.join(uri, index)}: no weight_map")
            files = sorted({storage.safe_relpath(f, storage.join(uri, index)) for f in wm.values()})
            for f in files:
                if not storage.isfile(storage.join(uri, f)):
                    raise CkptError(f"{storage.join(uri, index)}: lists shard {f!r}, which is missing")
            return weights, index, files
        if single in names:
            return weights, None, [single]
    raise CkptError(f"{uri}: config.json but no model.safetensors, index, or pytorch_model.bin")


def _file_items(uri: str, name: str, weights: str) -> tuple[dict, list[Item]]:
    path = storage.join(uri, name)
    if weights == "safetensors":
        meta, infos = st.read_header(path)
        return meta, [Item(t.name, t.dtype, t.shape, info=t) for t in infos]
    sd = load_pickle_weights(path)
    return {"format": "pt"}, [Item(k, st.ST_NAME[str(v.dtype).removeprefix("torch.")], list(v.shape),
                 load=bin_loader(path, k)) for k, v in sd.items()]


def _check_index(uri: str, index: str, tensors: dict[str, list[Item]]) -> None:
    wm = storage.read_json(storage.join(uri, index))["weight_map"]
    for f, items in tensors.items():
        for it in items:
            if wm.get(it.name) != f:
                raise CkptError(f"{storage.join(uri, f)}: tensor {it.name!r} is not mapped to this file by {index}")
    present = {it.name for items in tensors.values() for it in items}
    for key, f in wm.items():
        if key not in present:
            raise CkptError(f"{storage.join(uri, index)}: maps {key!r} to {f}, which does not hold it")


# --- pickle (.bin/.pt/.pth): tensors only -------------------------------------------------

_BIN_CACHE: dict[str, dict] = {}


def load_pickle_weights(uri: str) -> dict:
    """A flat {name: tensor} from a torch.save file, with weights_only=True and mmap where local.
    Anything other than tensors in the pickle is refused, naming the file."""
    import pickle

    import torch

    if uri in _BIN_CACHE:
        return _BIN_CACHE[uri]
    path = local_copy(uri)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CkptError(f"{uri}: not a tensors-only torch file ({first})") from e
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict) and len(sd) <= 2:
        sd = sd["model"]   # torch.save({"model": sd}) wrappers (litgpt, some trainers)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), "?") if isinstance(sd, dict) else "?"
        raise CkptError(f"{uri}: holds a non-tensor value at key {bad!r}; only tensors are read")
    _BIN_CACHE.clear()  # keep at most one mapped file alive
    _BIN_CACHE[uri] = sd
    return sd


def bin_loader(uri: str, key: str):
    return lambda: load_pickle_weights(uri)[key]


_COPIES: dict[str, object] = {}   # remote URI -> its local copy: an anonymous temp file, open


def local_copy(uri: str) -> str:
    """A local path of `uri`. A remote file is fetched once per process into an anonymous temp
    file (no name on disk, so nothing is left behind even after SIGKILL), opened by its
    /proc/self/fd path; drop_copies() frees them."""
    if storage.is_local(uri):
        return storage.local_path(uri)
    f = _COPIES.get(uri)
    if f is None:
        f = tempfile.TemporaryFile(dir=storage.SPOOL_DIR)
        with storage.open_read(uri) as fin:
            while chunk := fin.read(storage.CHUNK):
                f.write(chunk)
        f.flush()
        _COPIES[uri] = f
    return f"/proc/self/fd/{f.fileno()}"


def drop_copies() -> None:
    """Close the local copies of remote pickle files (their space is freed once unmapped)."""
    _BIN_CACHE.clear()
    while _COPIES:
        _COPIES.popitem()[1].close()


# --- HF -> tune plan ----------------------------------------------------------------------

def open_view(uri: str, **_):
    """An HF directory as a View: tune names, the original partition, config and tokenizer as assets."""
    from ckptflow.formats.view import View

    src = open_source(uri)
    plans, original = tune_plan(src)
    items = {it.name: it for p in plans for it in p.items}
    assets = {name: storage.join(src.uri, name) for name in src.assets}
    if src.index:
        assets[src.index] = storage.join(src.uri, src.index)
    return View(src.uri, "hf", src.family, src.args, items, original, assets, manifest=manifest.read(src.uri),
                partition=[[it.name for it in p.items] for p in plans])


def describe(uri: str):
    """Detection for `ckptflow detect`: family, dominant dtype and parameter count from the headers."""
    from ckptflow.formats.view import Detection, summarize

    src = open_source(uri)
    dtype, n = summarize((it.shape, it.dtype) for items in src.tensors.values() for it in items)
    return Detection("hf", uri, src.family.NAME, dtype, n, storage.list_files(uri),
                     {"weights": src.weights, "shards": len(src.files), "model_type": src.config.get("model_type")})


def tune_plan(src: Source, out_dtype: str | None = None, max_shard: int | None = None) -> tuple[list[FilePlan], dict]:
    """(tune files, the `original` record export needs to write these files back)."""
    fam, args = src.family, src.args
    per_file, original_files = [], []
    for f in src.files:
        items, keys = [], []
        for it in src.tensors[f]:
            keys.append(it.name)
            parts = _fused.parts_of(fam, it.name)
            if parts is not None:
                items.extend(_split(it, parts, args, storage.join(src.uri, f), out_dtype))
                continue
            tkey, qk = families.hf_key_to_tune(fam, it.name)
            if tkey is None:
                continue
            permute = ("to_tune", args.n_heads if qk == "q" else args.kv_heads) if qk and fam.ROPE_INTERLEAVED else None
            items.append(Item(tkey, it.dtype, it.shape, info=it.info, load=it.load, permute=permute, out_dtype=out_dtype))
        original_files.append({"name": f, "keys": keys, "metadata": src.metadata[f]})
        per_file.append(items)
    _check_shapes(src, per_file)
    _check_complete(src, {it.name for items in per_file for it in items})
    plans = _tune_partition(per_file, max_shard)
    original = {"format": "hf", "weights": src.weights, "files": original_files, "index": src.index,
                "config": src.config, "assets": src.assets}
    return plans, original


def _check_shapes(src: Source, per_file: list[list[Item]]) -> None:
    """A config field that disagrees with a tensor (hidden_size 96 against 64-wide tensors): one error
    naming the file, the HF and tune keys and the field, before any format is written (GGUF, HF too)."""
    from ckptflow.formats.tune import _blame
    from ckptflow.model_args import expected_shapes

    want = expected_shapes(src.args)
    for f, items in zip(src.files, per_file):
        for it in items:
            w = want.get(it.name)
            if w is not None and list(it.shape) != w:
                fused = _fused.fused_key(src.family, it.name)
                hf_key = fused[0] if fused else families.tune_key_to_hf(src.family, it.name)[0]
                raise CkptError(f"{storage.join(src.uri, f)}: tensor {hf_key!r} ({it.name!r}) has shape "
                                f"{list(it.shape)} but the config implies {w}{_blame(src.args, w, list(it.shape))}")


def _check_complete(src: Source, have: set[str]) -> None:
    """A tensor the config implies but no file holds (an expert, a layer): one error naming its HF key."""
    from ckptflow.model_args import expected_shapes

    missing = [k for k in expected_shapes(src.args) if k not in have]
    if not missing:
        return
    fused = _fused.fused_key(src.family, missing[0])
    hf_key = fused[0] if fused else families.tune_key_to_hf(src.family, missing[0])[0]
    where = storage.join(src.uri, src.index or src.files[0])
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise CkptError(f"{where}: missing tensor {hf_key!r}{more} (config.json implies it)")


def _split(it: Item, parts: tuple[str, ...], args, where: str, out_dtype: str | None) -> list[Item]:
    """The tune tensors of a fused HF tensor: each a byte range of its rows (or a slice when loaded)."""
    return split_rows(it, list(parts), _fused.check_rows(args, it.name, it.shape, parts, where), out_dtype)


def _fuse(hf_key: str, parts: tuple[str, ...], tune_items: dict[str, Item], out_dtype: str | None) -> Item:
    """One HF tensor from its tune parts (no permute: fused families keep HF's rows), concatenated
    on dim 0 when written."""
    missing = [p for p in parts if p not in tune_items]
    if missing:
        raise CkptError(f"tune checkpoint lacks {missing[0]!r} (part of HF {hf_key!r})")
    items = [Item(t.name, t.dtype, t.shape, info=t.info, load=t.load, permute=t.permute, out_dtype=out_dtype)
             for t in (tune_items[p] for p in parts)]
    dtypes = {i.final_dtype for i in items}
    if len(dtypes) != 1:
        raise CkptError(f"cannot fuse {hf_key!r}: its parts {list(parts)} have dtypes {sorted(dtypes)}")
    rows = sum(i.shape[0] for i in items)
    return Item(hf_key, items[0].dtype, [rows, *items[0].shape[1:]], out_dtype=items[0].out_dtype, parts=items)


def _tune_partition(per_file: list[list[Item]], max_shard: int | None) -> list[FilePlan]:
    if max_shard:
        return repartition([it for items in per_file for it in items], max_shard)
    n = len(per_file)
    if n == 1:
        return [FilePlan("model.safetensors", per_file[0])]
    return [FilePlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", items) for i, items in enumerate(per_file)]


# --- tune -> HF plan ----------------------------------------------------------------------

def hf_plan(tune_items: dict[str, Item], family, args, original: dict | None,
            out_dtype: str | None = None, max_shard: int | None = None) -> tuple[list[FilePlan], bool]:
    """(HF files, same_partition). Reproduces the original partition, key order and metadata
    unless max_shard asks for a new one or the model did not come from HF."""
    def item(hf_key: str, t: Item) -> Item:
        _, qk = families.hf_key_to_tune(family, hf_key)
        permute = ("to_hf", args.n_heads if qk == "q" else args.kv_heads) if qk and family.ROPE_INTERLEAVED else None
        if t.permute is not None and permute is not None:   # to_tune then to_hf: the identity
            permute = None
        elif t.permute is not None:
            permute = t.permute
        return Item(hf_key, t.dtype, t.shape, info=t.info, load=t.load, permute=permute, out_dtype=out_dtype)

    if original and original.get("format") == "hf" and not max_shard:
        plans = []
        for f in original["files"]:
            items = []
            for key in f["keys"]:
                parts = _fused.parts_of(family, key)
                if parts is not None:
                    items.append(_fuse(key, parts, tune_items, out_dtype))
                    continue
                tkey, _ = families.hf_key_to_tune(family, key)
                if tkey is None:
                    continue
                if tkey not in tune_items:
                    raise CkptError(f"tune checkpoint lacks {tkey!r} (HF {key!r})")
                items.append(item(key, tune_items[tkey]))
            plans.append(FilePlan(_st_name(f["name"]), items, dict(f.get("metadata") or {"format": "pt"})))
        return plans, original.get("weights") == "safetensors"
    items = []
    for tkey, t in tune_items.items():
        fused = _fused.fused_key(family, tkey)
        if fused is not None:
            if fused[1] == 0:   # the first part brings the whole fused tensor
                items.append(_fuse(fused[0], _fused.parts_of(family, fused[0]), tune_items, out_dtype))
            continue
        hf_key, _ = families.tune_key_to_hf(family, tkey)
        items.append(item(hf_key, t))
    return repartition(items, max_shard or DEFAULT_SHARD), False


def _st_name(name: str) -> str:
    """pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors; we never write pickle."""
    if name.endswith(".safetensors"):
        return name
    base = os.path.splitext(name)[0].replace("pytorch_model", "model")
    return base + ".safetensors"


def index_bytes(plans: list[FilePlan], original_index_meta: dict | None) -> bytes:
    total = sum(it.out_nbytes for p in plans for it in p.items)
    meta = {"total_size": total}
    if original_index_meta and "total_parameters" in original_index_meta:
        meta["total_parameters"] = sum(_numel(it.shape) for p in plans for it in p.items)
    wm = {it.name: p.name for p in plans for it in p.items}
    return (json.dumps({"metadata": meta, "weight_map": wm}, indent=2, sort_keys=True) + "\n").encode()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def config_bytes(family, args, like: dict, dtype: str | None) -> bytes:
    return (json.dumps(family.hf_config(args, like=like, dtype=dtype), indent=2, sort_keys=True) + "\n").encode()


def write_view(view, out, *, out_dtype: str | None = None, max_shard: int | None = None, progress=None):
    """Write `view` as a Hugging Face directory into Output `out`; returns the uncommitted manifest."""
    from ckptflow.formats.plan import write_file
    from ckptflow.manifest import Manifest

    refused = getattr(view.family, "HF_WRITE_REFUSED", None)   # a family ckptflow reads only part of
    if refused:
        raise CkptError(f"{view.uri}: {refused}")
    plans, same = hf_plan(view.items, view.family, view.args, view.original, out_dtype, max_shard)
    for p in plans:
        write_file(out, p, progress)
    original = view.original if (view.original or {}).get("format") == "hf" else None
    index_asset = view.assets.get(ST_INDEX)
    if len(plans) > 1:
        total = sum(it.out_nbytes for p in plans for it in p.items)
        if same and out_dtype is None and index_asset and \
                (storage.read_json(index_asset).get("metadata") or {}).get("total_size") == total:
            out.copy(index_asset, ST_INDEX)     # byte-identical round trip (same tensors, same sizes)
        else:
            like = storage.read_json(index_asset).get("metadata") if index_asset else {"total_parameters": 0}
            out.put(ST_INDEX, index_bytes(plans, like))
    dtype_name = st.TORCH_NAME[out_dtype] if out_dtype else None
    if dtype_name is None and original and CONFIG in view.assets:
        # Weights whose dtype differs from the source's config (a float32 fine-tune of a bf16
        # base) must not ship a config.json that still names the old dtype.
        declared = families.hf_dtype(storage.read_json(view.assets[CONFIG]))
        if declared and str(declared).removeprefix("torch.") != _dtype_of(plans):
            dtype_name = _dtype_of(plans)
    for name, src in view.assets.items():
        if name in (ST_INDEX, BIN_INDEX) or (name == CONFIG and (dtype_name or not original)):
            continue
        out.copy(src, name)
    if CONFIG not in view.assets or dtype_name or not original:
        like = storage.read_json(view.assets[CONFIG]) if CONFIG in view.assets else (original or {}).get("config")
        out.put(CONFIG, config_bytes(view.family, view.args, like, dtype_name or _dtype_of(plans)))
    return Manifest(kind="model", format="hf", family=view.family.NAME, model_args=view.args.to_dict(),
                    dtype=dtype_name or _dtype_of(plans))


def _dtype_of(plans: list[FilePlan]) -> str:
    from ckptflow.formats.tune import dominant_dtype

    return dominant_dtype(plans)
