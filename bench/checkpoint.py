"""What step checkpoints cost training: async vs synchronous saves, measured in one run.

    .venv/bin/python bench/checkpoint.py                     # ~300M-parameter llama, full fine-tune
    .venv/bin/python bench/checkpoint.py --dim 256 --layers 4 --steps 12 --every 4   # quick look

One process, one model, one optimizer, three phases of the same number of training steps:
  baseline  no saves
  async     a save every N steps, background writer (ckptflow's default)
  sync      a save every N steps, written before training goes on
With --rounds R the three phases repeat R times, interleaved, and the figures sum over rounds.
A save holds the full float32 weights and both AdamW moments (about 12 bytes per parameter).
Reported side by side: the time training is blocked per save (async: waiting for the previous
save + the snapshot copy; sync: the whole write), the full write time, and each phase's
slowdown over the baseline. Saves happen at every N-th step but not on a phase's last step
(a run's final save costs the same at any cadence), and a phase ends only once its last save
is committed, so an async write that outlasts the phase is counted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--steps", type=int, default=24, help="training steps per phase")
    p.add_argument("--every", type=int, default=6, help="save every N steps in the async and sync phases")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--dir", default="/tmp/ckptflow-bench", help="where the base model and checkpoints go")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat baseline/async/sync this many times, interleaved, so load drift hits all three alike")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures to this file")
    return p.parse_args()


def make_base(a) -> str:
    from ckptflow.stages import convert, download

    source = f"seed://llama?dim={a.dim}&n_layers={a.layers}&n_heads={a.heads}&n_kv_heads={a.heads}&vocab_size=512"
    tag = f"d{a.dim}-l{a.layers}-h{a.heads}"
    src = download.run(source, os.path.join(a.dir, tag, "source"))
    return convert.run(src.uri, os.path.join(a.dir, tag, "base")).uri


def run_config(a, base_uri: str):
    from ckptflow import config

    return config.validate({
        "run_id": "bench", "storage": os.path.join(a.dir, "runs"), "model": {"source": base_uri},
        "data": {"train": os.path.join(ROOT, "deployments", "data", "demo.jsonl")},
        "train": {"method": "full", "steps": 10**6, "batch_size": a.batch_size, "seq_len": a.seq_len,
                  "packed": True, "lr": 1e-5, "device": "cpu", "threads": a.threads},
        "checkpoint": {"every_steps": a.every, "keep_last": 1}})


def phase(trainer, name: str, steps: int, every: int | None, use_async: bool, root: str) -> dict:
    """`steps` training steps, saving every `every` (none when None); the time includes the final wait."""
    from ckptflow import storage
    from ckptflow.checkpointer import Checkpointer
    from ckptflow.config import CheckpointConfig

    storage.remove(os.path.join(root, name))
    trainer.checkpointer = Checkpointer(os.path.join(root, name),
                                        CheckpointConfig(every_steps=every, keep_last=1, **{"async": use_async}))
    step_s = []
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        s0 = time.perf_counter()
        trainer.train_step()
        step_s.append(time.perf_counter() - s0)
        if every and i % every == 0 and i < steps:   # no save on the last step: see the docstring
            trainer.save()
    trainer.checkpointer.close()
    total = time.perf_counter() - t0
    stats = trainer.checkpointer.stats
    return {"phase": name, "seconds": total, "steps": steps, "saves": len(stats), "step_s_median": statistics.median(step_s),
            "blocked_s": [s["blocked_s"] for s in stats], "write_s": [s["write_s"] for s in stats],
            "snapshot_s": [s["snapshot_s"] for s in stats], "wait_s": [s["wait_s"] for s in stats],
            "bytes": stats[0]["bytes"] if stats else 0}


def merge(acc: dict | None, got: dict) -> dict:
    if acc is None:
        return got
    out = dict(acc)
    for k in ("seconds", "steps", "saves"):
        out[k] = acc[k] + got[k]
    for k in ("blocked_s", "write_s", "snapshot_s", "wait_s"):
        out[k] = acc[k] + got[k]
    out["step_s_median"] = statistics.median([acc["step_s_median"], got["step_s_median"]])
    return out


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def report(a, n_params: int, phases: dict, load: tuple) -> dict:
    base, asy, syn = phases["baseline"], phases["async"], phases["sync"]
    gb = asy["bytes"] / 1e9
    out = {
        "params": n_params, "checkpoint_gb": gb, "steps_per_phase": a.steps, "save_every": a.every,
        "baseline_s": base["seconds"], "async_s": asy["seconds"], "sync_s": syn["seconds"],
        "async_slowdown": asy["seconds"] / base["seconds"] - 1, "sync_slowdown": syn["seconds"] / base["seconds"] - 1,
        "async_blocked_per_save_s": mean(asy["blocked_s"]), "async_snapshot_s": mean(asy["snapshot_s"]),
        "async_wait_prev_s": mean(asy["wait_s"]), "async_write_s": mean(asy["write_s"]),
        "sync_blocked_per_save_s": mean(syn["blocked_s"]), "sync_write_s": mean(syn["write_s"]),
        "step_s_median": {k: v["step_s_median"] for k, v in phases.items()}, "load_average": load,
    }
    w = 34
    print(f"\nmodel: {n_params / 1e6:.0f}M parameters, full fine-tune, float32; checkpoint {gb:.2f} GB "
          f"(weights + AdamW moments); {a.steps} steps per phase x {a.rounds} rounds, a save every {a.every} "
          f"({asy['saves']} saves per mode); load average before/after {load[0]:.2f}/{load[1]:.2f}\n")
    na = f"{'-':>14}"
    print(f"{'':{w}}{'async (default)':>18}{'sync':>14}{'no saves':>14}")
    print(f"{'training blocked per save (s)':{w}}{out['async_blocked_per_save_s']:>18.2f}{out['sync_blocked_per_save_s']:>14.2f}{na}")
    print(f"{'  of which snapshot copy (s)':{w}}{out['async_snapshot_s']:>18.2f}{'-':>14}{na}")
    print(f"{'  of which waiting for previous (s)':{w}}{out['async_wait_prev_s']:>18.2f}{'-':>14}{na}")
    print(f"{'  as a share of a sync save':{w}}{out['async_blocked_per_save_s'] / out['sync_blocked_per_save_s']:>17.1%}{'-':>14}{na}")
    print(f"{'full write of one save (s)':{w}}{out['async_write_s']:>18.2f}{out['sync_write_s']:>14.2f}{na}")
    print(f"{'write throughput (MB/s)':{w}}{gb * 1e3 / out['async_write_s']:>18.0f}{gb * 1e3 / out['sync_write_s']:>14.0f}{na}")
    print(f"{'median step while phase ran (s)':{w}}{asy['step_s_median']:>18.2f}{syn['step_s_median']:>14.2f}"
          f"{base['step_s_median']:>14.2f}")
    print(f"{'phase wall time (s)':{w}}{asy['seconds']:>18.1f}{syn['seconds']:>14.1f}{base['seconds']:>14.1f}")
    print(f"{'slowdown vs no saves':{w}}{out['async_slowdown']:>17.1%}{out['sync_slowdown']:>14.1%}{na}")
    return out


def main() -> int:
    a = parse_args()
    import torch

    from ckptflow.trainer import Trainer, process_settings

    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    base_uri = make_base(a)
    print(f"base model ready in {time.perf_counter() - t:.1f}s: {base_uri}", flush=True)
    cfg = run_config(a, base_uri)
    with process_settings(cfg.train):
        trainer = Trainer(cfg, base_uri)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        print(f"{n_params / 1e6:.1f}M parameters, torch threads {torch.get_num_threads()}", flush=True)
        root = os.path.join(a.dir, "runs", "bench", "train")
        trainer.train_step()  # warm up: allocates AdamW state, so every phase saves the same bytes
        phases: dict[str, dict] = {}
        for r in range(a.rounds):
            for name, every, use_async in (("baseline", None, True), ("async", a.every, True), ("sync", a.every, False)):
                got = phase(trainer, name, a.steps, every, use_async, root)
                print(f"round {r + 1} {name}: {got['seconds']:.1f}s", flush=True)
                phases[name] = merge(phases.get(name), got)
    out = report(a, n_params, phases, (load0, os.getloadavg()[0]))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"figures": out, "phases": phases}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
