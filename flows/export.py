"""The export-only flow: any checkpoint of any run to original / hf / meta / peft / tune.

    prefect deployment run export/export --params '{"params": {"source": "./runs/demo", "format": "hf"}}'

The `export` deployment offers ExportParams as a form in the dashboard. A run resolves to its
newest committed step (or `step`) here, so the task is cached on that step's manifest.
"""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from ckptflow import lease, storage
from ckptflow.stages import export as export_stage
from flows.params import ExportParams, dtype_or_none
from tasks import common
from tasks.export import export as export_task


LEASE_WAIT_SECONDS = 600   # another export into the same place goes first


@flow(name="export")
def export(params: ExportParams) -> dict:
    """Export one checkpoint: a run's newest or chosen step, a step, a tune dir or an adapter.

    Args:
        params: which checkpoint to export, to which format and dtype, and where
    """
    common.use_options((params.source, params.dst), params.storage_options)
    resolved = export_stage.resolve(storage.normalize(params.source), step=params.step)
    dst = params.destination(resolved.step, resolved.run)
    # Results beside the runs (the finetune flow's cache) when the source belongs to a run.
    home = storage.parent(resolved.run) if resolved.run else storage.parent(dst)
    task = common.bind(export_task, common.result_storage(home, params.storage_options))
    get_run_logger().info("exporting %s (step %s) to %s", resolved.uri, resolved.step, dst)
    # The lease of the exports' parent tells `ckptflow gc` that this directory is being written.
    with lease.hold(storage.parent(dst), owner=f"export flow run {flow_run.id}", wait=LEASE_WAIT_SECONDS):
        out = task(resolved.uri, dst, format=params.format, step=None, dtype=dtype_or_none(params.dtype),
                   overwrite=not params.dst)   # a name of its own choosing is the flow's to replace
    get_run_logger().info("exported %s (step %s, %s) to %s", resolved.uri, resolved.step, out["format"], out["uri"])
    where(out, resolved.run)
    return out


WRITTEN_EVENT = "ckptflow.export.written"


def where(out: dict, run: str | None) -> None:
    """Where the export went, beyond the log line: an event naming the URI (what `prefect
    deployment run export/export --watch` prints: it shows a run's events, and its logs only
    where the server streams them) and a link artifact (the flow run's Artifacts tab)."""
    from prefect.artifacts import create_link_artifact
    from prefect.events import emit_event

    from tasks.common import artifact_key

    name = artifact_key(storage.basename(run) if run else "export", "export")
    emit_event(event=WRITTEN_EVENT, resource={"prefect.resource.id": f"ckptflow.{name}", "prefect.resource.name": out["uri"]},
               payload={"uri": out["uri"], "format": out.get("format")})
    create_link_artifact(link=out["uri"], link_text=out["uri"], key=name, description="where the export went")


if __name__ == "__main__":
    import sys

    print(export(ExportParams(source=sys.argv[1], format=sys.argv[2] if len(sys.argv) > 2 else "original")))
