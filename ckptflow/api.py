"""The Python API: load any supported checkpoint as ckptflow's model, save it in any format.

    model, m = ckptflow.load("path/or/uri")                    # hf, tune, ... (detected)
    ckptflow.save(model, "out/", format="hf", like=m)          # same partition and files as `m`'s source
"""
from __future__ import annotations

from ckptflow import storage
from ckptflow.formats import WRITERS, View, open_view
from ckptflow.formats.plan import Item
from ckptflow.manifest import Manifest


def load_state_dict(uri: str, dtype=None, **opts) -> tuple[dict, View]:
    """Tune-named tensors of any checkpoint, materialised, and the view they came from."""
    view = open_view(uri, **opts)
    return view.state_dict(dtype), view


def load(uri: str, *, device="cpu", dtype=None, **opts):
    """(Transformer, View) for any supported checkpoint directory."""
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
    from ckptflow.stages.convert import dtype_code

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
        m = WRITERS[format](out_view, out, out_dtype=dtype_code(dtype), max_shard=None, progress=None)
        m.lineage = {"source": view.uri if view else None, "stages": [{"stage": "save", "to": format, "uri": out.uri}]}
        return out.commit(m)
