"""On-disk formats. Every reader turns a directory into a View: tune-named tensors (lazy, one at a
time) plus what export needs to write the original back. Every writer turns a View into files.

READERS and WRITERS are plain dicts; a format module registers itself with one entry each.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ckptflow import manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats.plan import FilePlan, Item, repartition
from ckptflow.manifest import Manifest


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
    adapter: object | None = None       # formats.peft.Adapter when the view is base + LoRA, merged lazily

    def state_dict(self, dtype=None) -> dict:
        """Every tensor materialised in tune names (a lazily merged LoRA weight included), one
        source file handle open at a time; for loading a model; conversion never does this."""
        import torch

        from ckptflow.formats import st
        from ckptflow.formats.plan import _transformed_bytes

        handles: dict = {}
        sd = {}
        try:
            for key, it in self.items.items():
                t = st.to_torch(_transformed_bytes(it, handles), it.final_dtype, it.shape)
                sd[key] = t.to(dtype) if dtype is not None and torch.is_floating_point(t) else t
        finally:
            for h in handles.values():
                h.close()
        return sd

    def plans(self, max_shard: int | None = None, out_dtype: str | None = None) -> list[FilePlan]:
        """The tune shards: the source's own grouping, or shards of at most max_shard bytes."""
        for it in self.items.values():
            it.out_dtype = out_dtype
        if max_shard or not self.partition:
            return repartition(list(self.items.values()), max_shard or 5 * 10**9)
        groups = [[self.items[k] for k in keys if k in self.items] for keys in self.partition]
        groups = [g for g in groups if g]
        if len(groups) == 1:
            return [FilePlan("model.safetensors", groups[0])]
        n = len(groups)
        return [FilePlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _read_hf(uri: str, **_) -> View:
    from ckptflow.formats import hf

    src = hf.open_source(uri)
    plans, original = hf.tune_plan(src)
    items = {it.name: it for p in plans for it in p.items}
    assets = {name: storage.join(src.uri, name) for name in src.assets}
    if src.index:
        assets[src.index] = storage.join(src.uri, src.index)
    from ckptflow import manifest

    return View(src.uri, "hf", src.family, src.args, items, original, assets, manifest=manifest.read(src.uri),
                partition=[[it.name for it in p.items] for p in plans])


def _read_tune(uri: str, base: str | None = None, **_) -> View:
    from ckptflow import families
    from ckptflow.formats import tune

    m = manifest.read(uri)
    if m is not None and m.kind == "train_state" and m.extra.get("lora"):
        return _read_peft(uri, base)    # a LoRA step holds only the adapter: its base, merged lazily
    d = tune.open_dir(uri)
    assets = {name[len(tune.ASSETS) + 1:]: storage.join(d.uri, name)
              for name in d.manifest.files if name.startswith(tune.ASSETS + "/")}
    layout = [e["keys"] for e in d.manifest.extra.get("layout", [])]
    return View(d.uri, "tune", families.get(d.manifest.family), d.args, tune.items(d), d.original, assets,
                manifest=d.manifest, partition=layout)


def _read_peft(uri: str, base: str | None = None, **_) -> View:
    from ckptflow.stages import merge

    adapter, base_view = merge.open_adapter(uri, base)
    return merge.merged_view(base_view, adapter)


def _read_meta(uri: str, **opts) -> View:
    from ckptflow.formats import meta

    return meta.open_view(uri, **opts)


def _read_dcp(uri: str, **opts) -> View:
    from ckptflow.formats import dcp

    return dcp.open_view(uri, **opts)


def _read_torchtune(uri: str, **opts) -> View:
    from ckptflow.formats import torchtune

    return torchtune.open_view(uri, **opts)


def _read_litgpt(uri: str, **opts) -> View:
    from ckptflow.formats import litgpt

    return litgpt.open_view(uri, **opts)


READERS: dict[str, callable] = {"hf": _read_hf, "tune": _read_tune, "peft": _read_peft, "meta": _read_meta,
                                "dcp": _read_dcp, "torchtune": _read_torchtune, "litgpt": _read_litgpt}


def open_view(uri: str, **opts) -> View:
    from ckptflow.formats import detect

    fmt = detect.sniff(uri, interrupted_ok=False)
    reader = READERS.get(fmt)
    if reader is None:
        raise CkptError(f"{uri}: reading format {fmt!r} is not supported")
    return reader(uri, **opts)


def _write_hf(view, out, **kw):
    from ckptflow.formats import hf

    return hf.write_view(view, out, **kw)


def _write_tune(view, out, **kw):
    from ckptflow.formats import tune

    return tune.write_view(view, out, **kw)


def _write_peft(view, out, **kw):
    from ckptflow.formats import peft

    return peft.write_view(view, out, **kw)


def _write_meta(view, out, **kw):
    from ckptflow.formats import meta

    return meta.write_view(view, out, **kw)


def _write_dcp(view, out, **kw):
    from ckptflow.formats import dcp

    return dcp.write_view(view, out, **kw)


def _write_gguf(view, out, **kw):
    from ckptflow.formats import gguf

    return gguf.write_view(view, out, **kw)


# format name -> writer(view, out: commit.Output, *, out_dtype, max_shard, progress) -> Manifest
WRITERS: dict[str, callable] = {"hf": _write_hf, "tune": _write_tune, "peft": _write_peft, "meta": _write_meta,
                                "dcp": _write_dcp, "gguf": _write_gguf}
