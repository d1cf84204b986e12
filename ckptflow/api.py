"""The Python API: load any supported checkpoint as ckptflow's model, save it in any format.

    model, m = ckptflow.load("path/or/uri")                    # hf, tune, ... (detected), a run, a step
    ckptflow.save(model, "out/", format="hf", like=m)          # same partition and files as `m`'s source
"""
from __future__ import annotations

from ckptflow import storage
from ckptflow.formats import registry
from ckptflow.formats.registry import open_view
from ckptflow.formats.view import Item, View
from ckptflow.manifest import Manifest


def load_state_dict(uri: str, dtype=None, **opts) -> tuple[dict, View]:
    """Tune-named tensors of any checkpoint, materialised, and the view they came from."""
    view = _open(uri, **opts)
    return view.state_dict(dtype), view


def _open(uri: str, step: int | None = None, base: str | None = None, **opts) -> View:
    """A run (its newest committed step, or `step`) and a step checkpoint resolve as `ckptflow
    export` resolves them (the LoRA adapter merged lazily onto its base); anything else is read
    by its format's reader."""
    from ckptflow import checkpointer, manifest
    from ckptflow.stages import export

    uri = storage.normalize(uri)
    m = manifest.read(uri)
    if step is not None or (m is None and checkpointer.is_run(uri)) or (m is not None and m.kind == "train_state"):
        return export.resolve(uri, step=step, base=base).view
    return open_view(uri, **({"base": base} if base else {}), **opts)


def load(uri: str, *, device="cpu", dtype=None, **opts):
    """(Transformer, View) for any supported checkpoint directory, a run (its newest committed
    step; `step=N` for another) or a step checkpoint."""
    from ckptflow.model import Transformer

    sd, view = load_state_dict(uri, dtype=dtype, **opts)
    model = Transformer.from_state_dict(view.args, sd, device=device, dtype=dtype)
    return model, view


def save(model, uri: str, *, format: str = "tune", like: View | Manifest | None = None, dtype: str | None = None,
         overwrite: bool = False) -> Manifest:
    """Write `model` (a Transformer or a tune state dict) to `uri` in `format`, laid out like `like`."""
    from ckptflow import families
    from ckptflow.commit import Output
    from ckptflow.formats import st
    from ckptflow.lineage import dtype_code

    sd = model.state_dict() if hasattr(model, "state_dict") else model
    view = like if isinstance(like, View) else None
    args = getattr(model, "args", None) or (view.args if view else None)
    family = view.family if view else families.get(like.family if like else "llama")
    items = {k: Item(k, *st.from_torch(v)[:2], load=(lambda v=v: v.detach().cpu())) for k, v in sd.items()}
    out_view = View(storage.normalize(uri), "tune", family, args, items,
                    original=view.original if view else (like.extra.get("original") if like else None),
                    assets=dict(view.assets) if view else {},
                    partition=view.partition if view else None)
    with Output(uri, overwrite=overwrite) as out:
        m = registry.write(format, out_view, out, out_dtype=dtype_code(dtype))
        provenance(m, view, like if isinstance(like, Manifest) else None, format, out.uri)
        return out.commit(m)


def provenance(m: Manifest, view: View | None, like: Manifest | None, fmt: str, uri: str) -> None:
    """What the saved weights came from: `like`'s step, the adapter merged into it (a step loaded
    with ckptflow.load), its lineage, and this save as the last stage."""
    from ckptflow.lineage import source_ref

    src = view.manifest if view is not None else like
    lin = dict((src.lineage if src is not None else None) or {})
    lin.setdefault("source", view.uri if view is not None else None)
    lin["stages"] = list(lin.get("stages", [])) + [{"stage": "save", "to": fmt, "uri": uri}]
    m.lineage = lin
    if view is not None:
        m.inputs = {"source": source_ref(view)}
    if src is not None:
        m.step = src.step
        if src.extra.get("merged"):
            m.extra["merged"] = src.extra["merged"]
