"""A training step checkpoint's weights as lazy Items, whoever wrote it.

One process writes `model.safetensors` (the files its manifest's `extra.layout` names); several
processes write one DCP directory (format "dcp": `.metadata` + `__{rank}_{n}.distcp`, the
weights under "model.", AdamW state under "optimizer."). Either way the result is
{tune key: Item}, each tensor read alone when asked (a DCP tensor is assembled from the chunks
every rank saved), so merge, export, generate and evaluate read both the same way.
"""
from __future__ import annotations

from ckptflow import storage
from ckptflow.formats import dcp, st
from ckptflow.formats.view import Item
from ckptflow.manifest import Manifest

MODEL = "model.safetensors"


def weights(uri: str, m: Manifest) -> dict[str, Item]:
    """The trained tensors of step `uri` (all weights of a full step, the adapter of a LoRA one)."""
    if m.format == "dcp":
        return dcp.step_items(uri, "model")
    names = [e["name"] for e in m.extra.get("layout", [])] or [MODEL]
    found: dict[str, Item] = {}
    for name in names:
        for t in st.read_header(storage.join(uri, name))[1]:
            found[t.name] = Item(t.name, t.dtype, t.shape, info=t)
    return found


def where(uri: str, m: Manifest) -> str:
    """What to name in an error about a step's weights: the file, or the DCP directory."""
    return uri if m.format == "dcp" else storage.join(uri, MODEL)
