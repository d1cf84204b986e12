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
    """Stream one planned safetensors file into Output `out`. Tensors copied unchanged go as
    byte ranges of their source file (runs of neighbours as one range): inside the kernel when
    both files are local, hashed on another thread either way."""
    entries = [(it.name, it.final_dtype, it.shape, it.out_nbytes) for it in plan.items]
    handles: dict[str, object] = {}
    try:
        with out.open(plan.name) as f:
            f.write(st.header_bytes(entries, plan.metadata))
            run = None      # [file, start, end] of raw bytes not yet copied
            for it in plan.items:
                run = _write_item(f, it, handles, run)
                if progress is not None:
                    progress(it.out_nbytes)
            _flush(f, run)
    finally:
        for h in handles.values():
            h.close()


def _write_item(f, it: Item, handles: dict, run: list | None) -> list | None:
    """Write `it` after the pending raw `run`; returns the run still pending."""
    if it.parts is not None:    # rows on dim 0 are contiguous: a fused tensor is its parts' bytes in turn
        for part in it.parts:
            run = _write_item(f, part, handles, run)
        return run
    if it.is_raw_copy:
        i = it.info
        if run is not None and run[0] == i.file and run[2] == i.start:
            run[2] = i.end
            return run
        _flush(f, run)
        return [i.file, i.start, i.end]
    _flush(f, run)
    data = tensor_bytes(it, handles)
    if len(data) != it.out_nbytes:
        raise CkptError(f"tensor {it.name!r}: produced {len(data)} bytes, expected {it.out_nbytes}")
    f.write(data)
    return None


def _flush(f, run: list | None) -> None:
    if run is not None and run[2] > run[1]:
        f.copy_range(*run)
