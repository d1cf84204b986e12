"""The finetune flow: download -> detect -> convert -> train -> merge (LoRA) -> export -> evaluate.

    ckptflow run deployments/configs/demo.yaml [KEY=VALUE ...]

Every stage is a cached task over committed directories, so starting a failed run again (a new
flow run with the same config, or `prefect flow-run retry NAME --entrypoint flows/finetune.py:finetune`)
skips every finished stage, and the training stage resumes from its newest step checkpoint.
{run}/run.json records each stage's state, output and timing; the dashboard gets a summary, a
metrics table and a progress bar.

The base model is shared between runs when its source is pinned (seed://..., or
hf://ORG/NAME@<40-hex commit>): {storage}/.cache/base/<key>/source and .../tune, where key is
the first 16 hex digits of sha256(source). Any other source (a branch that moves, a path whose
files may change) is downloaded into the run: {run}/source and {run}/base.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re

from prefect import flow, get_run_logger

from ckptflow import lease, storage
from ckptflow.config import RunConfig, apply_storage_options, run_dir, to_dict
from flows import publish
from flows.stage import Recorder
from tasks import common, launch
from tasks.convert import convert
from tasks.detect import detect
from tasks.download import download
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.merge import merge
from tasks.train import train

log = logging.getLogger(__name__)

EXPORT_EVENT = "ckptflow.export.completed"
EXPORT_DEPLOYMENT = "export/export"
BASE_WAIT_SECONDS = 3600   # how long a run waits for another one downloading the same base
_PINNED = re.compile(r"^(seed://.+|hf://[^@]+@[0-9a-f]{40})$")


def base_dirs(cfg: RunConfig) -> dict:
    """Where the downloaded source and its tune conversion live (see the module docstring)."""
    source = cfg.model.source
    if _PINNED.match(source):
        root = storage.join(storage.normalize(cfg.storage), ".cache", "base",
                            hashlib.sha256(source.encode()).hexdigest()[:16])
        return {"source": storage.join(root, "source"), "tune": storage.join(root, "tune"), "shared": True}
    run = run_dir(cfg)
    return {"source": storage.join(run, "source"), "tune": storage.join(run, "base"), "shared": False}


@flow(name="finetune", flow_run_name="{config.run_id}", on_cancellation=[launch.kill_hook],
      on_crashed=[launch.kill_hook])
def finetune(config: RunConfig) -> dict:
    """Fine-tune a model end to end: one run directory under `storage`, resumable at any stage."""
    from prefect.runtime import flow_run

    cfg = dated(config)
    apply_storage_options(cfg)
    run_uri = run_dir(cfg)
    # One writer per run: a second flow run of the same run fails at once, naming the first.
    with lease.hold(run_uri, owner=f"finetune flow run {flow_run.id}"):
        return pipeline(cfg, run_uri)


def pipeline(cfg: RunConfig, run_uri: str) -> dict:
    results = common.result_storage(cfg.storage, cfg.storage_options)
    rec = Recorder(run_uri, cfg.run_id)
    base = base_dirs(cfg)
    begin(rec, cfg, base)
    src, tune = prepare_base(rec, cfg, base, results)
    # Stopped or not, the summary lists the steps committed so far and loss.png shows the curve.
    step = rec.stage("train", common.bind(train, results), cfg, tune["uri"],
                     on_stop=lambda record: publish.after_training(run_uri, record))
    publish.after_training(run_uri, rec.record)
    model = step
    if cfg.train.method == "lora":
        model = rec.stage("merge", common.bind(merge, results), step["uri"], tune["uri"],
                          storage.join(run_uri, "merged"), overwrite=True)   # the run's own: replaced when inputs change
    exported = export_stage(rec, cfg, results, step, model)
    announce(cfg, run_uri, exported, tune)
    evaluate_stage(rec, cfg, results, exported, tune)
    return finish(rec)


def prepare_base(rec: Recorder, cfg: RunConfig, base: dict, results) -> tuple[dict, dict]:
    """download -> detect -> convert into base["tune"]. A shared base is written under its own
    lease: a run that finds another one converting the same base waits for it, then reuses it."""
    from prefect.runtime import flow_run

    guard = (lease.hold(storage.parent(base["tune"]), owner=f"finetune flow run {flow_run.id}",
                        wait=BASE_WAIT_SECONDS) if base["shared"] else contextlib.nullcontext())
    with guard:
        src = rec.stage("download", common.bind(download, results), cfg.model.source, base["source"])
        rec.record["source"] = {"uri": cfg.model.source, "revision": src.get("revision")}
        rec.stage("detect", detect, src["uri"])
        tune = rec.stage("convert", common.bind(convert, results), src["uri"], base["tune"], to="tune", overwrite=True)
    return src, tune


def dated(cfg: RunConfig) -> RunConfig:
    """`{date}` in run_id -> the flow run's scheduled date (UTC), stable across its retries."""
    if "{date}" not in cfg.run_id:
        return cfg
    from prefect.runtime import flow_run

    import datetime as dt

    when = dt.datetime.fromtimestamp(flow_run.scheduled_start_time.timestamp(), tz=dt.timezone.utc)
    return cfg.model_copy(update={"run_id": cfg.run_id.replace("{date}", when.strftime("%Y-%m-%d"))})


def begin(rec: Recorder, cfg: RunConfig, base: dict) -> None:
    from prefect.runtime import flow_run

    rec.record["config"] = {k: v for k, v in to_dict(cfg).items() if k != "storage_options"}   # credentials
    rec.record["base"] = base
    rec.record["flow_runs"] = [*rec.record.get("flow_runs", []), str(flow_run.id)]
    rec.record["export_command"] = f"ckptflow export {rec.run_uri} ./export --format {cfg.export.format}"
    rec.record["export_deployment"] = EXPORT_DEPLOYMENT
    rec.save(summary=True)
    get_run_logger().info("run %s: %s (base %s)", cfg.run_id, rec.run_uri,
                          "shared " + base["tune"] if base["shared"] else "in the run")


def export_stage(rec: Recorder, cfg: RunConfig, results, step: dict, model: dict) -> dict:
    # A PEFT export is the adapter itself; every other format exports the (merged) model.
    src = step["uri"] if cfg.export.format == "peft" else model["uri"]
    return rec.stage("export", common.bind(export, results), src, storage.join(rec.run_uri, "export"),
                     format=cfg.export.format, dtype=cfg.export.dtype, overwrite=True)


def announce(cfg: RunConfig, run_uri: str, exported: dict, tune: dict) -> None:
    """Tell whoever listens (the `evaluate` deployment's trigger) that an export is ready."""
    from prefect.events import emit_event

    request = {"source": exported["uri"], "data": storage.normalize(cfg.data.eval) if cfg.data.eval else None,
               "base": tune["uri"],
               "out": storage.join(run_uri, "eval"), "run": run_uri, "settings": eval_settings(cfg)}
    # No storage_options: they may hold credentials, and events are shown to anyone with the
    # dashboard. The evaluate deployment's workers take theirs from their environment.
    # The label lets a deployment's trigger pick only the runs that hand evaluation to it.
    resource = {"prefect.resource.id": f"ckptflow.export.{cfg.run_id}", "prefect.resource.name": cfg.run_id,
                "ckptflow.eval-deployment": cfg.eval.deployment or "none"}
    emit_event(event=EXPORT_EVENT, resource=resource,
               payload={"uri": exported["uri"], "format": exported["format"], "request": request})


def evaluate_stage(rec: Recorder, cfg: RunConfig, results, exported: dict, tune: dict) -> None:
    if not cfg.data.eval and not cfg.eval.tasks:
        rec.skipped("evaluate", "no data.eval and no eval.tasks")
        return
    if cfg.eval.deployment:
        rec.skipped("evaluate", f"handed to {cfg.eval.deployment}")
        return
    ev = rec.stage("evaluate", common.bind(evaluate, results), exported["uri"], cfg.data.eval, tune["uri"],
                   storage.join(rec.run_uri, "eval"), eval_settings(cfg), overwrite=True)
    rec.record["eval"] = publish.eval_results(ev["uri"])


def eval_settings(cfg: RunConfig) -> dict:
    from ckptflow.benchmarks import is_path

    # Task paths absolute: the evaluate deployment's worker may start elsewhere.
    tasks = [storage.normalize(t) if is_path(t) else t for t in cfg.eval.tasks]
    return {"prompts": cfg.eval.prompts, "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.train.seq_len, "max_batches": cfg.data.eval_batches, "tasks": tasks, "limit": cfg.eval.limit}


def finish(rec: Recorder) -> dict:
    rec.save(summary=True)
    out = {"run": rec.run_uri, "summary": storage.join(rec.run_uri, "summary.md"),
           "export": next((s["output"] for s in rec.record["stages"] if s["name"] == "export"), None)}
    get_run_logger().info("run %s finished: %s; summary %s", rec.run_id, rec.run_uri, out["summary"])
    return out


if __name__ == "__main__":
    import sys

    from ckptflow.config import load_config

    print(finetune(load_config(sys.argv[1], sys.argv[2:])))
