"""The train task: `ckptflow.stages.train.run` with a progress artifact, the loss in the run's
logs, and a `gpu` concurrency slot when that limit exists. Several processes: the stage runs
torchrun in its own process group (ckptflow.launch); the flow's hooks kill it (tasks.launch).

A retry (or a new flow run) resumes from the newest committed step: the library does that, the
task only starts it again. Cached on the base manifest and every config key but export/eval.
"""
from __future__ import annotations

import contextlib
import logging
import time

from prefect import get_run_logger, task

from ckptflow import config as config_mod
from ckptflow import progress
from ckptflow.config import RunConfig
from tasks import common

log = logging.getLogger(__name__)

GPU_LIMIT = "gpu"
UPDATE_SECONDS = 2.0   # at most one progress-artifact update (an API round trip) per 2 s
LOG_LINES = 20         # loss lines per training, besides one per eval and per checkpoint


def _train_params(params: dict) -> dict:
    cfg = config_mod.to_dict(params["config"])
    cfg.pop("export"), cfg.pop("eval"), cfg.pop("storage_options")
    rank = params.get("node_rank") or 0     # node 0's key is that of a one-node run
    return {"config": cfg, "base_uri": params["base_uri"], **({"node_rank": rank} if rank else {})}


@task(name="train", cache_key_fn=common.stage_key("base_uri", view=_train_params), result_serializer="json",
      **common.retry_options())
def train(config: RunConfig, base_uri: str, node_rank: int = 0) -> dict:
    from ckptflow.stages import train as stage

    watch = Watch(config)
    with gpu_slot(watch.logger), watch:
        m = stage.run(config, base_uri, on_metrics=watch.metrics, node_rank=node_rank)
    return common.record(m)


class Watch:
    """Mirrors training into the dashboard: a progress artifact (throttled) and loss lines."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.total = cfg, cfg.train.steps
        self.logger = get_run_logger()
        self.artifact, self.last, self.step = None, 0.0, 0
        self.log_every = max(1, self.total // LOG_LINES)

    def __enter__(self):
        from prefect.artifacts import create_progress_artifact

        self.artifact = create_progress_artifact(progress=0.0, key=common.artifact_key(self.cfg.run_id, "progress"),
                                                 description=f"training steps of {self.cfg.run_id}")
        progress.add_listener(self.listener)
        return self

    def __exit__(self, exc_type, *_):
        progress.remove_listener(self.listener)
        if exc_type is None:
            self.update(self.total, force=True)

    def listener(self, desc: str, done: float, total: float) -> None:
        if desc == "train":
            self.update(done)

    def metrics(self, row: dict) -> None:
        self.step = max(self.step, int(row.get("step") or 0))
        if self.step % self.log_every == 0 or row.get("eval_loss") is not None or row.get("checkpoint"):
            self.logger.info("step %d/%d loss %s eval_loss %s lr %s%s%s", row["step"], self.total, _f(row.get("loss")),
                             _f(row.get("eval_loss")), _f(row.get("lr"), ".3g"),
                             f" aux_loss {_f(row['aux_loss'])}" if row.get("aux_loss") is not None else "",
                             f" checkpoint {row['checkpoint']}" if row.get("checkpoint") else "")
        self.update(self.step)

    def update(self, step: float, force: bool = False) -> None:
        from prefect.artifacts import update_progress_artifact

        now = time.monotonic()
        if self.artifact is None or (not force and now - self.last < UPDATE_SECONDS):
            return
        self.last = now
        try:
            update_progress_artifact(artifact_id=self.artifact, progress=min(100.0, 100.0 * step / self.total))
        except Exception as e:  # noqa: BLE001 - the dashboard must never stop training
            log.warning("progress artifact not updated: %s", e)


def _f(x, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


@contextlib.contextmanager
def gpu_slot(logger=log):
    """One slot of the global concurrency limit `gpu` when it exists (`prefect gcl create gpu
    --limit 1`), strictly; no limit, no throttle. Looking the name up first avoids Prefect's
    default, where a missing limit only logs a warning."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    except ObjectNotFound:
        yield
        return
    logger.info("waiting for a slot of the %r concurrency limit", GPU_LIMIT)
    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        yield
