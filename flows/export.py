"""The export-only flow: any checkpoint of any run to original / hf / meta / peft.

    prefect deployment run export/export --param params='{"source": "./runs/demo", "format": "hf"}'

The `export` deployment offers ExportParams as a form in the dashboard.
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from ckptflow import storage
from flows.params import ExportParams, dtype_or_none
from tasks import common
from tasks.export import export as export_task


@flow(name="export")
def export(params: ExportParams) -> dict:
    """Export one checkpoint (a run's newest or chosen step, a step, a tune dir, an adapter)."""
    for uri in (params.source, params.dst):
        if uri and params.storage_options:
            storage.set_options(uri, params.storage_options)
    dst = params.destination()
    task = common.bind(export_task, common.result_storage(storage.parent(dst), params.storage_options))
    out = task(storage.normalize(params.source), dst, format=params.format, step=params.step,
               dtype=dtype_or_none(params.dtype))
    get_run_logger().info("exported %s (%s) to %s", params.source, params.format, out["uri"])
    return out


if __name__ == "__main__":
    import sys

    print(export(ExportParams(source=sys.argv[1], format=sys.argv[2] if len(sys.argv) > 2 else "original")))
