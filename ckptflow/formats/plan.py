"""Write plans: which tensors go into which output file (formats.view.FilePlan), and writing them.

Every conversion is a plan executed one tensor at a time, so peak memory is about the largest
tensor, never the model. A tensor that needs no transform is copied as raw bytes in chunks.
"""
from __future__ import annotations

import logging

from ckptflow import storage
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.formats.view import FilePlan, Item, tensor_bytes

log = logging.getLogger(__name__)


def parse_size(text: str | int | None) -> int | None:
    """'5GB' -> 5e9 (decimal units, as huggingface_hub uses)."""
    if text is None or isinstance(text, int):
        return text
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    s = text.strip().upper()
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise CkptError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2000000") from None


def write_file(out, plan: FilePlan, progress=None) -> None:
    """Stream one planned safetensors file into Output `out`."""
    entries = [(it.name, it.final_dtype, it.shape, it.out_nbytes) for it in plan.items]
    handles: dict[str, object] = {}
    try:
        with out.open(plan.name) as f:
            f.write(st.header_bytes(entries, plan.metadata))
            for it in plan.items:
                _write_item(f, it, handles)
                if progress is not None:
                    progress(it.out_nbytes)
    finally:
        for h in handles.values():
            h.close()


def _write_item(f, it: Item, handles: dict) -> None:
    if it.parts is not None:    # rows on dim 0 are contiguous: a fused tensor is its parts' bytes in turn
        for part in it.parts:
            _write_item(f, part, handles)
        return
    if it.is_raw_copy:
        src = handles.get(it.info.file) or handles.setdefault(it.info.file, storage.open_read(it.info.file))
        for chunk in st.iter_tensor_chunks(it.info, src):
            f.write(chunk)
        return
    data = tensor_bytes(it, handles)
    if len(data) != it.out_nbytes:
        raise CkptError(f"tensor {it.name!r}: produced {len(data)} bytes, expected {it.out_nbytes}")
    f.write(data)
