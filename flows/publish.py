"""What a run shows in the Prefect dashboard: the summary (markdown, with the loss curve as a data
URI), the metrics table, and the run record behind them. The content comes from ckptflow.report;
this module only gathers the facts from the run directory and hands them to Prefect.

Artifact keys carry the run id (tasks.common.artifact_key: lowercased, other characters turned into
dashes), so every run has its own history of versions.
"""
from __future__ import annotations

import json
import logging

from ckptflow import report, runfile, storage
from ckptflow.trainer import read_metrics
from tasks.common import artifact_key

log = logging.getLogger(__name__)

LOSS_PNG = "loss.png"


def checkpoints(run_uri: str) -> list[dict]:
    from ckptflow import checkpointer, manifest

    out = []
    for step, uri in checkpointer.list_steps(storage.join(run_uri, "train")):
        m = manifest.read(uri)
        out.append({"step": step, "uri": uri, "size_bytes": sum(f.get("size", 0) for f in m.files.values()),
                    "saved_at": m.created, "save_seconds": (m.extra or {}).get("save_seconds")})
    return out


def export_commands(run_uri: str, record: dict) -> None:
    """The exact `ckptflow export` and `prefect deployment run` lines for the run's newest step,
    both writing where the export deployment would (ExportParams.destination)."""
    import shlex

    from flows.params import ExportParams

    steps = [c["step"] for c in record.get("checkpoints") or []]
    if not steps:
        return
    step = max(steps)
    fmt = ((record.get("config") or {}).get("export") or {}).get("format") or "original"
    try:
        params = ExportParams(source=run_uri, step=step, format=fmt)
    except ValueError:
        return  # a format the export deployment does not offer: keep the generic command
    dst = params.destination(step, run_uri)
    record["export_command"] = shlex.join(["ckptflow", "export", run_uri, dst, "--step", str(step), "--format", fmt])
    body = json.dumps({"params": params.model_dump(include={"source", "step", "format"})})
    record["export_deployment_command"] = shlex.join(["prefect", "deployment", "run", record.get("export_deployment")
                                                      or "export/export", "--params", body])


def loss_curve(run_uri: str, record: dict, metrics: list[dict]) -> bytes:
    """The loss curve PNG, saved as {run}/loss.png and named in the record."""
    png = report.loss_curve_png(metrics, record.get("checkpoints") or [], f"{record['run_id']}: training loss")
    path = storage.join(run_uri, LOSS_PNG)
    storage.put_atomic(path, png)
    record["loss_curve"] = path
    return png


def summary(run_uri: str, record: dict) -> str:
    """The summary markdown, with {run}/loss.png embedded when it exists."""
    shown = dict(record)
    png_uri = record.get("loss_curve")
    if png_uri and storage.isfile(png_uri):
        shown["loss_curve_png"] = storage.read_bytes(png_uri)
    return report.summary_markdown(shown)


def publish_summary(run_uri: str, record: dict) -> str:
    from prefect.artifacts import create_markdown_artifact

    md = summary(run_uri, record)
    storage.put_atomic(storage.join(run_uri, "summary.md"), md.encode())
    create_markdown_artifact(markdown=md, key=artifact_key(record["run_id"], "summary"),
                             description=f"ckptflow run {record['run_id']}: {run_uri}")
    return md


def publish_metrics(run_uri: str, record: dict, metrics: list[dict]) -> None:
    from prefect.artifacts import create_table_artifact

    if metrics:
        create_table_artifact(table=report.metrics_table(metrics), key=artifact_key(record["run_id"], "metrics"),
                              description=f"training metrics of {record['run_id']}")


def eval_results(eval_uri: str) -> dict:
    """{"before": {...}, "after": {...}, "lm_eval": {"before": ..., "after": ...}} from
    {eval}/results.json, for the summary."""
    res = storage.read_json(storage.join(eval_uri, "results.json"))
    base = res.get("base") or {}
    out = {"before": base.get("metrics") or {}, "after": res.get("metrics") or {}}
    if res.get("lm_eval"):
        out["lm_eval"] = {"before": base.get("lm_eval") or {}, "after": res["lm_eval"]}
    return out


def after_training(run_uri: str, record: dict) -> None:
    """Checkpoints, loss curve and metrics table, once the training stage has finished."""
    record["checkpoints"] = checkpoints(run_uri)
    export_commands(run_uri, record)
    metrics = read_metrics(storage.join(run_uri, "train"))
    loss_curve(run_uri, record, metrics)
    publish_metrics(run_uri, record, metrics)
    runfile.save(run_uri, record)
