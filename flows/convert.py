"""The convert flow: one checkpoint to another format, as a deployment can run it."""
from __future__ import annotations

from prefect import flow

from ckptflow import storage
from flows.params import ConvertParams, dtype_or_none
from tasks import common
from tasks.convert import convert as convert_task


@flow(name="convert")
def convert(params: ConvertParams) -> dict:
    """Convert `source` to `to` in `dst`, streaming one tensor at a time."""
    common.use_options((params.source, params.dst), params.storage_options)
    dst = storage.normalize(params.dst)
    task = common.bind(convert_task, common.result_storage(storage.parent(dst), params.storage_options))
    return task(storage.normalize(params.source), dst, to=params.to, dtype=dtype_or_none(params.dtype))
