"""Download a model into a run's source/ directory.

    ckptflow download SOURCE DST      # seed://FAMILY?..., any fsspec URI or local path

The result is committed with a manifest; a second download of the same source into the same
place does nothing.
"""
from __future__ import annotations

import logging

from ckptflow import manifest, seed, storage
from ckptflow.commit import Output
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)


def run(source: str, dst: str, *, overwrite: bool = False) -> Manifest:
    dst = storage.normalize(dst)
    params = {"source": source}
    existing = manifest.read(dst)
    if existing is not None and existing.params.get("source") == source and not overwrite:
        log.info("%s: %s already downloaded", dst, source)
        return existing
    if source.startswith("seed://"):
        out = Output(dst, overwrite=overwrite or existing is not None)
        return out.commit(seed.write(source, out))
    return copy_tree(source, dst, params, overwrite=overwrite or existing is not None)


def copy_tree(source: str, dst: str, params: dict, *, overwrite: bool) -> Manifest:
    src = storage.normalize(source)
    files = [f for f in storage.list_files(src) if f not in (manifest.NAME, ".ckptflow-writing")]
    if not files:
        raise CkptError(f"{source}: nothing to download (empty or missing)")
    from ckptflow.formats import detect

    fmt = detect.sniff(src)
    prior = manifest.read(src)
    out = Output(dst, overwrite=overwrite)
    for name in files:
        out.copy(storage.join(src, name), name)
    lineage = dict(prior.lineage) if prior else {"source": source, "revision": None, "stages": []}
    m = Manifest(kind="source", format=fmt, family=prior.family if prior else None,
                 model_args=prior.model_args if prior else None, dtype=prior.dtype if prior else None,
                 params=params, lineage=lineage, extra=dict(prior.extra) if prior else {})
    return out.commit(m)
