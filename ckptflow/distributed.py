"""Several processes: torchrun, FSDP2 (fully_shard), DCP step checkpoints that reshard on load.

    train: {nproc_per_node: 2}          # `ckptflow train CONFIG` then launches torchrun itself

stages.train.run calls ckptflow.launch.torchrun, which runs `torchrun --standalone --nproc_per_node N
-m ckptflow.distributed CONFIG.json BASE STOP_AFTER` in its own process group and waits. Every rank builds the model (and its
LoRA adapters), shards each block and the root with fully_shard, and trains on its own
batch_size rows of every global micro-batch (batch_size x N rows, drawn from the same
deterministic stream a single process draws from). Gradients are summed over ranks so that
the step equals one process training on the whole global batch.

A step checkpoint is a DCP directory (format "dcp"): "model" (the trainable weights) and
"optimizer" (AdamW state per parameter name) as DTensor shards, one file per rank, written with
formats.dcp.save_state (hashed while written), plus trainer_state.json (data position, every
rank's RNG state); rank 0 commits ckptflow.json once every rank has written. With
checkpoint.async (the default) a save only copies the shards into CPU memory before training
goes on: DCP writes them in a thread (its collectives on a gloo group of their own) and rank 0
commits in the checkpointer's thread; the next save waits for that commit. Any number of
processes loads it, resharded; a single process too (trainer.py), and
a several-process run resumes from a single-process (safetensors) step as well.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from ckptflow import checkpointer, config, storage
from ckptflow.commit import Output
from ckptflow.manifest import Manifest
from ckptflow.trainer import MODEL, OPTIMIZER, STATE, Trainer, rng_state

log = logging.getLogger("ckptflow.distributed")   # also when run as __main__ by torchrun


def main(argv: list[str]) -> int:
    """One rank, started by torchrun."""
    import torch
    import torch.distributed as dist

    path, base_uri, stop_after = argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"rank {os.environ.get('RANK', '?')} %(levelname)s %(name)s: %(message)s")
    level = os.environ.get("CKPTFLOW_LOG", "WARNING").upper()
    logging.getLogger("ckptflow").setLevel(getattr(logging, level, logging.WARNING))
    with open(path) as f:
        cfg = config.validate(json.load(f), path)
    config.apply_storage_options(cfg)
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        from ckptflow.stages import train as stage

        base_uri = _from_committer(base_uri)   # other nodes train from the base node 0 prepared

        stage.train_here(cfg, base_uri, stop_after=int(stop_after) or None, trainer_cls=DistTrainer)
    finally:
        dist.destroy_process_group()
    return 0


# ---- one rank ---------------------------------------------------------------------------------

class DistTrainer(Trainer):
    def __init__(self, cfg, base_uri: str, run_uri: str | None = None, **kw):
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        super().__init__(cfg, base_uri, run_uri, **kw)
        self.is_main = self.rank == self._committer()
        if self.is_main:
            log.info("rank %d of %d commits the steps (node rank 0, local rank 0)", self.rank, self.world)

    def _committer(self) -> int:
        """The rank that commits steps and writes metrics: local rank 0 of node rank 0, whose
        launcher holds the run's lease (the global rank 0 on one node; on several, torchrun's
        rendezvous may give global rank 0 to another node, ckptflow.launch)."""
        import torch
        import torch.distributed as dist

        lead = _is_lead()
        first = torch.tensor([self.rank if lead else self.world], dtype=torch.int64, device=self._comm_device())
        leads = torch.tensor([int(lead)], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        dist.all_reduce(leads)
        if int(leads) != 1:
            raise RuntimeError(f"{int(leads)} processes have node rank 0 and local rank 0; "
                               "give exactly one node --node-rank 0")
        return int(first)

    def _pick_device(self):
        import torch

        from ckptflow.trainer import pick_device

        dev = pick_device(self.cfg.train.device)
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        return dev

    def _build_model(self, full_sd):
        from torch.distributed.fsdp import fully_shard

        model = super()._build_model(full_sd)
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model

    def _load_data(self) -> None:
        super()._load_data()
        self.data.batch_size = self.cfg.train.batch_size * self.world   # the global micro-batch

    def _micro_batch(self):
        tokens, labels = self.data.next()
        bs = self.cfg.train.batch_size
        return tokens[self.rank * bs:(self.rank + 1) * bs], labels[self.rank * bs:(self.rank + 1) * bs]

    def _all_sum(self, x: float) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(x)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def _agree(self, flag: bool) -> bool:
        return self._all_sum(1.0 if flag else 0.0) > 0

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else "cpu"

    # -- saving: every rank writes its shards, rank 0 commits -----------------------------
    def save(self) -> str:
        """Every rank writes its shards of step `self.step`; rank 0 commits once all have.
        Asynchronous (checkpoint.async): DCP copies the shards into CPU memory here and writes
        them in a thread whose collectives use a gloo group of their own; the commit follows in
        the checkpointer's thread. The next save (and the end of training) waits for it."""
        import torch.distributed as dist

        from ckptflow.formats import dcp

        t0 = time.perf_counter()
        self.checkpointer.wait()          # the previous save is committed, on every rank
        t1 = time.perf_counter()
        model_sd, optim = self._sharded_state()
        ranks = [None] * self.world
        dist.all_gather_object(ranks, _rank_rng())
        uri = storage.join(self.train_uri, checkpointer.step_name(self.step))
        out, m, state = None, None, None
        if self.is_main:
            checkpointer.clear_our_leftovers(uri, {STATE})
            out = Output(uri, overwrite=True)
            state = _json({**self._trainer_state(), "rng": {"ranks": ranks}})
            m = self._dcp_manifest()
        dist.barrier()                    # the step directory is ours before any rank writes into it
        sd = {"model": model_sd, "optimizer": optim}
        side = self._save_group
        if side is not None:
            written = dcp.save_state_async(sd, uri, process_group=side)
        else:
            digests = dcp.save_state(sd, uri)
            written = lambda: digests     # noqa: E731 - already written
        rec = {"step": self.step, "uri": uri, "async": side is not None, "wait_s": t1 - t0}
        step = self.step

        def finish():
            return self._commit(step, uri, out, written(), state, m, side)
        self.checkpointer.submit(self.step, finish, rec)
        rec["blocked_s"] = time.perf_counter() - t0
        return uri

    def _commit(self, step: int, uri: str, out, digests: dict, state: bytes | None, m, group):
        """Rank 0 commits the step every rank has written; then every rank goes on (no rank may
        resume, or start the next save, before the commit)."""
        import torch.distributed as dist

        committed = None
        if self.is_main:
            out.files.update(digests)
            out.put(STATE, state)
            committed = out.commit(m)
            log.info("%s: committed step %d (%d ranks)", uri, step, self.world)
            checkpointer.retain(self.train_uri, self.cfg.checkpoint, step)
        dist.barrier(group=group)
        return committed

    @property
    def _save_group(self):
        """The gloo group asynchronous saves talk over (made once, by every rank), or None."""
        import torch.distributed as dist

        if not self.cfg.checkpoint.async_:
            return None
        if getattr(self, "_side", None) is None:
            self._side = dist.new_group(backend="gloo")
        return self._side

    def _sharded_state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from ckptflow.lora import is_lora_key

        model_sd, osd = get_state_dict(self.model, self.optimizer)
        if self.lora is not None:
            model_sd = {k: v for k, v in model_sd.items() if is_lora_key(k)}
        return model_sd, {name: dict(fields) for name, fields in osd["state"].items()}

    def _trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "lr_scheduler": self.schedule.state(),
                "data": self.data.state(), "loss": self.last_loss, "world_size": self.world}

    def _dcp_manifest(self) -> Manifest:
        m = self.step_manifest()
        m.format = "dcp"
        for key in ("layout", "original"):
            m.extra.pop(key, None)
        m.extra["world_size"] = self.world
        return m

    # -- resuming: DCP reshards; a single-process step is sharded on load ---------------------
    def resume(self, m: Manifest, exclude=()) -> None:
        state = storage.read_json(storage.join(m.uri, STATE))
        if m.format == "dcp":
            self._resume_dcp(m.uri, "optimizer" not in exclude)
        else:
            self._resume_full(m.uri, "optimizer" not in exclude)
        self._apply_state(state, exclude, checkpointer.rank_rng_tensors(state, self.rank))
        log.info("rank %d resumed from %s (step %d, saved by %s process(es))", self.rank, m.uri, self.step,
                 state.get("world_size", 1))

    def _resume_dcp(self, uri: str, with_optimizer: bool) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                             set_model_state_dict, set_state_dict)

        from ckptflow.formats import dcp
        from ckptflow.lora import is_lora_key

        if with_optimizer:
            model_sd, osd = get_state_dict(self.model, self.optimizer)   # allocates AdamW state to load into
        else:
            model_sd, osd = get_model_state_dict(self.model), None
        if self.lora is not None:
            model_sd = {k: v for k, v in model_sd.items() if is_lora_key(k)}
        want = {"model": model_sd}
        if osd is not None:
            want["optimizer"] = {name: dict(fields) for name, fields in osd["state"].items()}
        dcp.load_state(want, uri)
        opts = StateDictOptions(strict=False)
        if osd is None:
            set_model_state_dict(self.model, want["model"], options=opts)
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=want["model"],
                       optim_state_dict={"state": want["optimizer"], "param_groups": osd["param_groups"]}, options=opts)

    def _resume_full(self, uri: str, with_optimizer: bool) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        from ckptflow.checkpointer import read_tensors

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, read_tensors(uri, MODEL), options=full)
        if with_optimizer:
            groups = get_optimizer_state_dict(self.model, self.optimizer)["param_groups"]
            nested: dict[str, dict] = {}
            for key, t in read_tensors(uri, OPTIMIZER).items():
                name, field = key.rsplit(".", 1)
                nested.setdefault(name, {})[field] = t
            set_optimizer_state_dict(self.model, self.optimizer, {"state": nested, "param_groups": groups},
                                     options=StateDictOptions(full_state_dict=True))


def _is_lead() -> bool:
    """Local rank 0 of node rank 0 (ckptflow.launch tells each rank its node's --node-rank)."""
    from ckptflow.launch import NODE_RANK_ENV

    return os.environ.get(NODE_RANK_ENV, "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _from_committer(value: str) -> str:
    """`value` as node 0's local rank 0 has it, on every rank."""
    import torch.distributed as dist

    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, value if _is_lead() else None)
    return next((v for v in got if v is not None), value)


def _rank_rng() -> dict:
    tensors, _ = rng_state()
    return {k: v.tolist() for k, v in tensors.items()}


def _json(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, indent=1).encode() + b"\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
