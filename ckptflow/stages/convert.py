"""Convert a checkpoint between formats, streaming one tensor at a time.

    ckptflow convert SRC DST [--to tune|hf|...] [--dtype bfloat16] [--max-shard-size 5GB]

Peak memory is about one tensor (plus one chunk), not the model. The output is committed with
ckptflow.json; a re-run with the same input and parameters returns the committed output.
"""
from __future__ import annotations

import logging

from ckptflow import commit, manifest, progress, storage
from ckptflow.commit import Output
from ckptflow.errors import CkptError
from ckptflow.formats import WRITERS, View, hf, open_view, st
from ckptflow.formats.plan import parse_size
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)


def run(src: str, dst: str, *, to: str = "tune", dtype: str | None = None, max_shard_size: str | int | None = None,
        overwrite: bool = False, kind: str = "model", reader_opts: dict | None = None, wait: float = 0.0) -> Manifest:
    src, dst = storage.normalize(src), storage.normalize(dst)
    if src == dst:
        raise CkptError(f"{dst}: source and destination are the same directory")
    if to not in WRITERS:
        raise CkptError(f"--to {to}: unknown format (choose from {', '.join(sorted(WRITERS))})")
    out_dtype = dtype_code(dtype)
    try:
        return _run(src, dst, to, dtype, out_dtype, max_shard_size, overwrite, kind, reader_opts, wait)
    finally:
        hf.drop_copies()     # local copies of remote .bin/.pth files: fetched once, freed here


def _run(src, dst, to, dtype, out_dtype, max_shard_size, overwrite, kind, reader_opts, wait) -> Manifest:
    view = open_view(src, **(reader_opts or {}))
    params = {"to": to, "dtype": dtype, "max_shard_size": parse_size(max_shard_size), **(reader_opts or {})}
    inputs = {"source": source_ref(view)}
    existing = commit.reusable(dst, manifest.read(dst), inputs, params, overwrite=overwrite)
    if existing is not None:
        log.info("%s: already converted from %s; nothing to do", dst, src)
        return existing
    return write(view, dst, to=to, out_dtype=out_dtype, max_shard=params["max_shard_size"], params=params,
                 inputs=inputs, overwrite=overwrite, kind=kind, stage="convert", wait=wait)


def write(view: View, dst: str, *, to: str, out_dtype: str | None, max_shard: int | None, params: dict,
          inputs: dict, overwrite: bool, kind: str, stage: str, wait: float = 0.0) -> Manifest:
    total = sum(it.out_nbytes // st.DTYPE_SIZE[it.final_dtype] * st.DTYPE_SIZE[out_dtype or it.dtype]
                for it in view.items.values())
    with Output(dst, overwrite=overwrite, wait=wait, expect=(inputs, params)) as out:
        if out.done is not None:     # another writer committed the same while we waited
            return out.done
        out.reserve(total + sum(_size(a) for a in view.assets.values()))
        with progress.bar(total, f"{stage} -> {to}") as bar:
            m = WRITERS[to](view, out, out_dtype=out_dtype, max_shard=max_shard, progress=bar)
        m.kind, m.inputs, m.params = kind, inputs, params
        m.lineage = lineage(view, stage, dst, to)
        if view.manifest is not None and view.manifest.step is not None:
            m.step = view.manifest.step
        if view.notes:
            m.extra["notes"] = view.notes
        return out.commit(m)


def _size(uri) -> int:
    try:
        return storage.size(uri) if isinstance(uri, str) else 0
    except CkptError:
        return 0


def lineage(view: View, stage: str, dst: str, to: str) -> dict:
    prev = dict(view.manifest.lineage) if view.manifest is not None else {}
    prev.setdefault("source", view.uri)
    stages = list(prev.get("stages", []))
    stages.append({"stage": stage, "from": view.format, "to": to, "uri": dst})
    prev["stages"] = stages
    return prev


def source_ref(view: View) -> dict:
    """How an output names its input: the manifest fingerprint, or for a foreign directory a
    fingerprint of its file names and sizes (cheap, and changes when any file is replaced)."""
    if view.manifest is not None:
        return manifest.input_ref(view.manifest)
    import hashlib

    h = hashlib.sha256()
    for name in storage.list_files(view.uri):
        h.update(f"{name}\0{storage.size(storage.join(view.uri, name))}\n".encode())
    return {"uri": view.uri, "fingerprint": "files:" + h.hexdigest()}


def dtype_code(dtype: str | None) -> str | None:
    if dtype in (None, "", "keep", "null", "none"):
        return None
    name = dtype.removeprefix("torch.")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)
    if name not in ("bfloat16", "float16", "float32"):
        raise CkptError(f"--dtype {dtype}: choose bfloat16, float16 or float32")
    return st.ST_NAME[name]
