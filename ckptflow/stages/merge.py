"""Merge a LoRA adapter into its base model, streaming one tensor at a time.

    ckptflow merge ADAPTER BASE DST      # BASE "-": the base the adapter names

ADAPTER is a LoRA step checkpoint (`train/step-000050`, base from its `extra.base`), a PEFT
adapter directory, or an imported torchtune adapter. Each targeted weight becomes
W' = W + scale * B @ A, computed in float32 and cast to the base dtype (formats.adapter.merged_view,
ckptflow.lora.merge_lora's arithmetic, one module at a time); every other tensor is copied as raw bytes. The
output is a tune directory with the base's layout, original format and assets, so export
writes the original format back. The manifest records the adapter's content fingerprint in its
lineage; merging the same adapter into that output again is refused.
"""
from __future__ import annotations

import logging

from ckptflow import commit, manifest, progress, storage
from ckptflow.commit import Output
from ckptflow.errors import CkptError
from ckptflow.formats import registry
from ckptflow.formats.adapter import adapter_ref, merge_lineage, merged_view
from ckptflow.lineage import source_ref
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)


def run(adapter: str, base: str | None, dst: str, *, overwrite: bool = False, wait: float = 0.0) -> Manifest:
    dst = storage.normalize(dst)
    ad, base_view = registry.open_adapter(adapter, None if base in (None, "", "-") else base)
    if dst in (ad.uri, base_view.uri):
        raise CkptError(f"{dst}: the destination is the adapter or the base itself")
    inputs = {"adapter": adapter_ref(ad), "base": source_ref(base_view)}
    params: dict = {}
    existing = commit.reusable(dst, manifest.read(dst), inputs, params, overwrite=overwrite)
    if existing is not None:
        log.info("%s: already merged from %s; nothing to do", dst, ad.uri)
        return existing
    fp = ad.content_fingerprint()
    view = merged_view(base_view, ad, fp)     # refuses an adapter that is merged in already
    total = sum(it.out_nbytes for it in view.items.values())
    with Output(dst, overwrite=overwrite, wait=wait, expect=(inputs, params)) as out:
        if out.done is not None:     # another writer committed the same while we waited
            return out.done
        out.reserve(total)
        with progress.bar(total, "merge") as bar:
            m = registry.write("tune", view, out, progress=bar)
        m.inputs, m.params, m.step = inputs, params, ad.step
        m.lineage = merge_lineage(base_view, ad, fp, dst)
        m.extra["merged"] = {"adapter": ad.uri, "format": ad.format, "fingerprint": fp, **ad.lora_config()}
        return out.commit(m)


