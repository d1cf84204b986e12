"""How an output names what it was made from: dtype codes, input references, lineage.

Every stage that writes a directory records `inputs` (what it read, by fingerprint) and `lineage`
(the original source and the chain of stages) in its ckptflow.json; these are the shared pieces.
"""
from __future__ import annotations

import hashlib

from ckptflow import manifest, storage
from ckptflow.errors import CkptError

# --dtype spellings -> the torch name; the safetensors code comes from formats' table.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def dtype_code(dtype: str | None) -> str | None:
    """A --dtype value (bfloat16, bf16, torch.float16, keep...) -> safetensors code, None to keep."""
    if dtype in (None, "", "keep", "null", "none"):
        return None
    name = dtype.removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_CODES:
        raise CkptError(f"--dtype {dtype}: choose bfloat16, float16 or float32")
    return DTYPE_CODES[name]


def source_ref(view) -> dict:
    """How an output names its input view: the manifest fingerprint, or for a foreign directory a
    fingerprint of its file names, sizes and modification stamps (no data read; two models of the
    same shape, or a file rewritten in place, differ by their stamps)."""
    if view.manifest is not None:
        return manifest.input_ref(view.manifest)
    h = hashlib.sha256()
    for name in storage.list_files(view.uri):
        h.update(f"{name}\0{storage.stamp(storage.join(view.uri, name))}\n".encode())
    return {"uri": view.uri, "fingerprint": "files:" + h.hexdigest()}


def with_stage(view, stage: str, dst: str, to: str) -> dict:
    """The view's lineage (its source when it has none) with one more stage: `stage` wrote `dst`
    in format `to` from the view's format."""
    prev = dict(view.manifest.lineage) if view.manifest is not None else {}
    prev.setdefault("source", view.uri)
    stages = list(prev.get("stages", []))
    stages.append({"stage": stage, "from": view.format, "to": to, "uri": dst})
    prev["stages"] = stages
    return prev
