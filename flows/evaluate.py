"""The evaluate flow: perplexity, lm-eval scores and samples of an exported model, and the eval
hand-off request.

The `evaluate` deployment starts it on the `ckptflow.export.completed` event that the finetune
flow emits (its payload carries this request). With `request.run` set, the run's run.json and
summary get the results.
"""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from ckptflow import lease, storage
from flows import publish
from flows.params import EvalRequest
from flows.stage import Recorder
from tasks import common
from tasks.evaluate import evaluate as evaluate_task


LEASE_WAIT_SECONDS = 600


@flow(name="evaluate")
def evaluate(request: EvalRequest) -> dict:
    """Evaluate `request.source` on `request.data` and `request.settings["tasks"]` (and its base,
    for before/after)."""
    common.use_options((request.source, request.data, request.base, request.out, request.run), request.storage_options)
    out = request.destination()
    home = storage.parent(storage.normalize(request.run)) if request.run else storage.parent(out)
    task = common.bind(evaluate_task, common.result_storage(home, request.storage_options))
    # {run}/eval (no `out` given) is the flow's own: a new export replaces its results.
    args = (storage.normalize(request.source), request.data, request.base, out, request.settings, not request.out)
    if not request.run:
        return task(*args)
    run_uri = storage.normalize(request.run)
    # Started by the finetune flow's export event, this may overlap that flow's last writes.
    with lease.hold(run_uri, owner=f"evaluate flow run {flow_run.id}", wait=LEASE_WAIT_SECONDS):
        rec = Recorder(run_uri, storage.basename(run_uri))
        result = rec.stage("evaluate", task, *args)
        rec.record["eval"] = publish.eval_results(result["uri"])
        rec.save(summary=True)
    get_run_logger().info("evaluated %s: %s", request.source, rec.record["eval"])
    return result
