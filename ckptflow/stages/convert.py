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
from ckptflow.formats import registry, st
from ckptflow.formats.view import View
from ckptflow.formats.plan import parse_size
from ckptflow.lineage import dtype_code, source_ref, with_stage
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)


def run(src: str, dst: str, *, to: str = "tune", dtype: str | None = None, max_shard_size: str | int | None = None,
        overwrite: bool = False, kind: str = "model", reader_opts: dict | None = None, wait: float = 0.0) -> Manifest:
    from ckptflow.formats import hf

    src, dst = storage.normalize(src), storage.normalize(dst)
    if src == dst:
        raise CkptError(f"{dst}: source and destination are the same directory")
    if to not in registry.writable():
        raise CkptError(f"--to {to}: unknown format (choose from {', '.join(registry.writable())})")
    out_dtype = dtype_code(dtype)
    try:
        view = registry.open_view(src, **(reader_opts or {}))
        params = {"to": to, "dtype": dtype, "max_shard_size": parse_size(max_shard_size), **(reader_opts or {})}
        inputs = {"source": source_ref(view)}
        existing = commit.reusable(dst, manifest.read(dst), inputs, params, overwrite=overwrite)
        if existing is not None:
            log.info("%s: already converted from %s; nothing to do", dst, src)
            return existing
        return write(view, dst, to=to, out_dtype=out_dtype, max_shard=params["max_shard_size"], params=params,
                     inputs=inputs, overwrite=overwrite, kind=kind, stage="convert", wait=wait)
    finally:
        hf.drop_copies()     # local copies of remote .bin/.pth files: fetched once, freed here


def write(view: View, dst: str, *, to: str, out_dtype: str | None, max_shard: int | None, params: dict,
          inputs: dict, overwrite: bool, kind: str, stage: str, wait: float = 0.0) -> Manifest:
    total = sum(it.out_nbytes // st.DTYPE_SIZE[it.final_dtype] * st.DTYPE_SIZE[out_dtype or it.dtype]
                for it in view.items.values())
    with Output(dst, overwrite=overwrite, wait=wait, expect=(inputs, params)) as out:
        if out.done is not None:     # another writer committed the same while we waited
            return out.done
        out.reserve(total + sum(_size(a) for a in view.assets.values()))
        with manifest.checked_while(view.manifest, view.read_uris()), progress.bar(total, f"{stage} -> {to}") as bar:
            m = registry.write(to, view, out, out_dtype=out_dtype, max_shard=max_shard, progress=bar)
        m.kind, m.inputs, m.params = kind, inputs, params
        m.lineage = with_stage(view, stage, dst, to)
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
