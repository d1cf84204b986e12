"""On-disk formats. Every reader turns a directory into a View: tune-named tensors (lazy, one at a
time) plus what export needs to write the original back. Every writer turns a View into files.

READERS and WRITERS are plain dicts; a format module registers itself with one entry each.
"""
from __future__ import annotations

from ckptflow import manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats.view import View


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
    from ckptflow.formats.adapter import merged_view

    ad, base_view = open_adapter(uri, base)
    return merged_view(base_view, ad)


def open_adapter(uri: str, base: str | View | None = None):
    """(the adapter at `uri`, its base model's View). `base` overrides the base the adapter names."""
    from ckptflow.formats import adapter, peft, torchtune

    uri = storage.normalize(uri)
    m = manifest.read(uri)
    if m is not None and m.kind == "train_state":
        bv = adapter.base_view(base, [m.extra.get("base"), (m.inputs.get("base") or {}).get("uri")], uri, open_view)
        return adapter.from_step(uri, m, bv), bv
    names = storage.listdir(uri)
    if m is None and torchtune.is_adapter(uri):
        # torchtune's own adapter file (tune names) wins over the PEFT copy it writes beside it,
        # whose q/k rows torchtune permutes even for Qwen2 (formats.md 4.6).
        return torchtune.read_adapter(uri, base, open_view)
    if (m is not None and m.format == "peft") or peft.is_peft(names):
        named = [m.extra.get("base") if m else None, peft.read_config(uri).get("base_model_name_or_path")]
        bv = adapter.base_view(base, named, uri, open_view)
        return peft.open_adapter(uri, bv.family, bv.args, base=bv.uri), bv
    raise CkptError(f"{uri}: not a LoRA adapter (a LoRA step checkpoint, a PEFT adapter directory "
                    f"or a torchtune adapter); found {', '.join(names[:8]) or 'nothing'}")


def _read_meta(uri: str, **opts) -> View:
    from ckptflow.formats import meta

    return meta.open_view(uri, **opts)


def _read_dcp(uri: str, **opts) -> View:
    from ckptflow.formats import dcp

    return dcp.open_view(uri, **opts)


def _read_torchtune(uri: str, **opts) -> View:
    from ckptflow.formats import torchtune

    return torchtune.open_view(uri, opener=open_view, **opts)


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


# format name -> writer(view, out: commit.Output, *, out_dtype, max_shard, progress) -> Manifest
WRITERS: dict[str, callable] = {"hf": _write_hf, "tune": _write_tune, "peft": _write_peft, "meta": _write_meta,
                                "dcp": _write_dcp}
