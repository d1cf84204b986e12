"""Train a run's base model (full or LoRA) with step checkpoints; resume after any crash.

    ckptflow train CONFIG [KEY=VALUE ...]

Without a committed `{run}/base`, the model source is downloaded into `{run}/source` and
converted into `{run}/base` first (both idempotent). A run that has step checkpoints resumes
from the newest committed and verified one; `checkpoint.load_step` picks another (a missing
step is an error, never a silent fresh start). Metrics go to `{run}/train/metrics.jsonl`.
"""
from __future__ import annotations

import logging

from ckptflow import config, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)


def prepare_base(cfg: config.RunConfig) -> str:
    """`{run}/base` in tune format, downloading and converting model.source when it is missing."""
    from ckptflow.stages import convert, download

    run = config.run_dir(cfg)
    base = storage.join(run, "base")
    if manifest.read(base) is None:
        source = download.run(cfg.model.source, storage.join(run, "source"))
        convert.run(source.uri, base, to="tune")
    return base


def run(cfg: config.RunConfig, base_uri: str | None = None, *, stop_after: int | None = None,
        on_metrics=None, wait: float = 0.0, node_rank: int = 0) -> Manifest:
    """Train to train.steps (or to step `stop_after`); returns the last step checkpoint's manifest.

    `on_metrics(row)` receives every metrics row: step, loss, eval_loss, lr, tokens_per_s, checkpoint.
    The run's writer lease is held throughout (re-entrant under a flow that holds it already), so
    `ckptflow gc` and a second trainer keep off; torchrun's ranks inherit it (lease.ENV).
    """
    from ckptflow import lease

    config.apply_storage_options(cfg)
    check_node_rank(cfg, node_rank)
    if node_rank > 0:
        return join(cfg, base_uri, node_rank, stop_after=stop_after, on_metrics=on_metrics)
    with lease.hold(config.run_dir(cfg), owner=lease.default_owner(), wait=wait):
        base_uri = storage.normalize(base_uri) if base_uri else prepare_base(cfg)
        if cfg.train.nproc_per_node > 1 or cfg.train.nnodes > 1:   # torchrun, ranks in their own process group
            from ckptflow import launch

            return launch.torchrun(cfg, base_uri, stop_after=stop_after, on_metrics=on_metrics)
        return train_here(cfg, base_uri, stop_after=stop_after, on_metrics=on_metrics)


def check_node_rank(cfg: config.RunConfig, node_rank: int) -> None:
    if not 0 <= node_rank < cfg.train.nnodes:
        raise CkptError(f"--node-rank {node_rank}: the run config has train.nnodes: {cfg.train.nnodes}, "
                        f"so node ranks go from 0 to {cfg.train.nnodes - 1}")


def join(cfg: config.RunConfig, base_uri: str | None, node_rank: int, *, stop_after: int | None = None,
         on_metrics=None) -> Manifest:
    """Node `node_rank` > 0 of a several-node run. Node 0's launcher holds the run's writer lease
    and prepares the base; this node takes no lease (it would be refused as a second writer).
    Its torchrun waits at node 0's rendezvous; its ranks then take the base from node 0's and
    write only their DCP shard files into the step directories node 0's committing rank claims
    (ckptflow.distributed)."""
    from ckptflow import launch

    base_uri = storage.normalize(base_uri) if base_uri else storage.join(config.run_dir(cfg), "base")
    return launch.torchrun(cfg, base_uri, stop_after=stop_after, on_metrics=on_metrics, node_rank=node_rank)


def train_here(cfg: config.RunConfig, base_uri: str, *, stop_after: int | None = None, on_metrics=None,
               trainer_cls=None) -> Manifest | None:
    """Train in this process (one rank of several when trainer_cls is distributed.DistTrainer)."""
    from ckptflow.trainer import Trainer, check_resume, process_settings, resume_point

    base = manifest.require(base_uri)
    train_uri = storage.join(config.run_dir(cfg), "train")
    point = resume_point(cfg, train_uri)
    if point is not None:
        check_resume(point, cfg, base)
    until = min(stop_after or cfg.train.steps, cfg.train.steps)
    if point is None:
        log.info("%s: no committed step checkpoint; training from step 0 to %d", train_uri, until)
    if point is not None and point.step >= until:
        log.info("%s: already at step %d (asked for %d); nothing to train", point.uri, point.step, until)
        return point
    with process_settings(cfg.train):
        trainer = (trainer_cls or Trainer)(cfg, base_uri, on_metrics=on_metrics)
        if point is not None:
            trainer.resume(point, cfg.checkpoint.exclude_from_loading)
        last = trainer.fit(until)
    if last is None and trainer.is_main:
        raise CkptError(f"{train_uri}: training finished without a committed checkpoint")
    return last
