"""What step checkpoints cost training: async vs synchronous saves, measured in one run.

    .venv/bin/python bench/checkpoint.py                     # ~300M-parameter llama, full fine-tune
    .venv/bin/python bench/checkpoint.py --dim 512 --layers 8 --heads 8 --steps 12 --every 6 --rounds 14 \
        --quiet 30 --phases baseline,async,async-noyield,sync          # 26M parameters, 0.31 GB per save
    .venv/bin/python bench/checkpoint.py --dim 256 --layers 4 --steps 12 --every 4   # quick look

One process, one model, one optimizer, phases of the same number of training steps:
  baseline        no saves
  async           a save every N steps, background writer (ckptflow's default: on CPU training
                  yields one torch thread to the writer while it writes, checkpoint.yield_threads)
  async-noyield   the same without yielding (--phases baseline,async,async-noyield,sync)
  sync            a save every N steps, written before training goes on
With --rounds R the phases repeat R times, interleaved, and the table sums over rounds; the
lines after it give each phase's best and median slowdown over the baseline of the same round.
A save holds the full float32 weights and both AdamW moments (about 12 bytes per parameter);
with --method lora only the adapter and its moments.
Reported side by side: the time training is blocked per save (async: waiting for the previous
save + the snapshot copy + waiting for the writer's copy before the next optimizer step; sync:
the whole write), the full write time, and each phase's slowdown over the baseline. Saves
happen at every N-th step but not on a phase's last step (a run's final save costs the same at
any cadence), and a phase ends only once its last save is committed, so an async write that
outlasts the phase is counted. The snapshot buffers are allocated once, as in a run.

On a shared machine other processes take CPU from the phases: each phase records the CPU time
other processes used while it ran ("others"), and --quiet S waits up to S seconds before each
phase for half a second in which they used under a tenth of a core.
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
    p.add_argument("--method", choices=("full", "lora"), default="full",
                   help="lora: rank 8 on q_proj and v_proj; a save holds only the adapter and its optimizer state")
    p.add_argument("--phases", default="baseline,async,sync",
                   help="comma-separated, from baseline, async, async-noyield, sync")
    p.add_argument("--quiet", type=float, default=0.0,
                   help="before each phase wait up to this many seconds for other processes to go quiet")
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
        "train": {"method": a.method, "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}, "steps": 10**6, "batch_size": a.batch_size, "seq_len": a.seq_len,
                  "packed": True, "lr": 1e-5, "device": "cpu", "threads": a.threads},
        "checkpoint": {"every_steps": a.every, "keep_last": 1}})


def cpu_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (Linux /proc/stat), or 0 elsewhere."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def wait_quiet(limit: float, window: float = 0.5, share: float = 0.1) -> None:
    """Wait up to `limit` seconds for a `window` in which other processes used < `share` of a core."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        b0, c0 = cpu_busy_s(), own_cpu_s()
        time.sleep(window)
        if (cpu_busy_s() - b0) - (own_cpu_s() - c0) < share * window:
            return


QUIET = 0.1     # a round is quiet when other processes took under this many cores in it and its baseline

PHASES = {"baseline": (False, True, True), "async": (True, True, True),   # saves, async, yield threads
          "async-noyield": (True, True, False), "sync": (True, False, True)}


def phase(trainer, name: str, steps: int, every: int, root: str) -> dict:
    """`steps` training steps, saving every `every` unless the phase saves nothing; the time includes the final wait."""
    from ckptflow import storage
    from ckptflow.checkpointer import Checkpointer
    from ckptflow.config import CheckpointConfig

    saves, use_async, yielding = PHASES[name]
    every = every if saves else None
    storage.remove(os.path.join(root, name))
    previous = trainer.checkpointer
    trainer.checkpointer = Checkpointer(os.path.join(root, name),
                                        CheckpointConfig(every_steps=every, keep_last=1, **{"async": use_async}))
    trainer.checkpointer._buffers = previous._buffers   # steady state: a run allocates its snapshot buffers once
    run_threads = trainer._threads
    if not yielding:
        trainer._threads = None
    step_s = []
    busy0, own0 = cpu_busy_s(), own_cpu_s()
    t0 = time.perf_counter()
    try:
        for i in range(1, steps + 1):
            s0 = time.perf_counter()
            trainer.train_step()
            step_s.append(time.perf_counter() - s0)
            if every and i % every == 0 and i < steps:   # no save on the last step: see the docstring
                trainer.save()
        trainer.checkpointer.close()
    finally:
        trainer._threads = run_threads
        trainer._pace_threads()
    total = time.perf_counter() - t0
    own = own_cpu_s() - own0
    stats = trainer.checkpointer.stats
    return {"phase": name, "seconds": total, "steps": steps, "saves": len(stats), "step_s_median": statistics.median(step_s),
            "cpu_s": own, "others_cpu_s": max(0.0, cpu_busy_s() - busy0 - own),
            "blocked_s": [s["blocked_s"] for s in stats], "write_s": [s["write_s"] for s in stats],
            "snapshot_s": [s["snapshot_s"] for s in stats], "wait_s": [s["wait_s"] for s in stats],
            "settle_s": [s.get("settle_s", 0.0) for s in stats], "copy_s": [s.get("copy_s", 0.0) for s in stats],
            "data_s": [s.get("data_s", 0.0) for s in stats],
            "bytes": stats[0]["bytes"] if stats else 0}


def merge(acc: dict | None, got: dict) -> dict:
    if acc is None:
        return {**got, "rounds": [got["seconds"]], "round_others": [got["others_cpu_s"] / got["seconds"]]}
    out = dict(acc)
    for k in ("seconds", "steps", "saves", "cpu_s", "others_cpu_s"):
        out[k] = acc[k] + got[k]
    for k in ("blocked_s", "write_s", "snapshot_s", "wait_s", "settle_s", "copy_s", "data_s"):
        out[k] = acc[k] + got[k]
    out["rounds"] = acc["rounds"] + [got["seconds"]]
    out["round_others"] = acc["round_others"] + [got["others_cpu_s"] / got["seconds"]]
    out["step_s_median"] = statistics.median([acc["step_s_median"], got["step_s_median"]])
    return out


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def report(a, n_params: int, phases: dict, load: tuple, threads: int, yielding: bool) -> dict:
    base = phases["baseline"]
    saving = [n for n in phases if n != "baseline"]
    first = phases[saving[0]]
    gb = first["bytes"] / 1e9
    out = {"params": n_params, "checkpoint_gb": gb, "steps_per_phase": a.steps, "save_every": a.every,
           "torch_threads": threads, "yield_threads": yielding, "load_average": load, "baseline_s": base["seconds"],
           "step_s_median": {k: v["step_s_median"] for k, v in phases.items()}}
    for n in saving:
        p = phases[n]
        key = n.replace("-", "_")
        rel = [x / b - 1 for x, b in zip(p["rounds"], base["rounds"])]
        quiet = [r for r, o, bo in zip(rel, p["round_others"], base["round_others"]) if max(o, bo) < QUIET]
        out.update({f"{key}_s": p["seconds"], f"{key}_slowdown": p["seconds"] / base["seconds"] - 1,
                    f"{key}_slowdown_best": min(rel), f"{key}_slowdown_median": statistics.median(rel),
                    f"{key}_quiet_rounds": len(quiet),
                    f"{key}_slowdown_quiet_median": statistics.median(quiet) if quiet else None,
                    f"{key}_blocked_per_save_s": mean(p["blocked_s"]), f"{key}_write_s": mean(p["write_s"]),
                    f"{key}_snapshot_s": mean(p["snapshot_s"]), f"{key}_wait_prev_s": mean(p["wait_s"]),
                    f"{key}_settle_s": mean(p["settle_s"]), f"{key}_copy_in_writer_s": mean(p["copy_s"]),
                    f"{key}_data_s": mean(p["data_s"])})
    w, c = 36, 16
    what = "full fine-tune" if a.method == "full" else "LoRA rank 8 on q_proj, v_proj"
    print(f"\nmodel: {n_params / 1e6:.0f}M parameters, {what}, float32; checkpoint {gb:.3f} GB "
          f"(trainable weights + AdamW moments); {a.steps} steps per phase x {a.rounds} rounds, a save every {a.every} "
          f"({first['saves']} saves per mode); torch threads {threads}, async saves yield a thread to the writer: "
          f"{'yes' if yielding else 'no'}; load average before/after {load[0]:.2f}/{load[1]:.2f}\n")
    cols = saving + ["baseline"]
    sync = phases.get("sync")

    def row(label, f, fmt="{:.2f}"):
        cells = []
        for n in cols:
            v = f(n, phases[n]) if n != "baseline" or label.startswith(("median step", "phase wall", "CPU")) else None
            cells.append(f"{'-' if v is None else fmt.format(v):>{c}}")
        print(f"{label:{w}}" + "".join(cells))

    print(f"{'':{w}}" + "".join(f"{('no saves' if n == 'baseline' else n):>{c}}" for n in cols))
    row("training blocked per save (s)", lambda n, p: mean(p["blocked_s"]))
    row("  waiting for the previous save (s)", lambda n, p: mean(p["wait_s"]) if n != "sync" else None)
    row("  snapshot copy in the step (s)", lambda n, p: mean(p["snapshot_s"]) if n != "sync" else None)
    row("  waiting for the writer's copy (s)", lambda n, p: mean(p["settle_s"]) if n != "sync" else None)
    if sync is not None:
        row("  as a share of a sync save", lambda n, p: mean(p["blocked_s"]) / mean(sync["blocked_s"])
            if n != "sync" else None, "{:.1%}")
    row("snapshot copy in the writer (s)", lambda n, p: mean(p["copy_s"]) if n != "sync" else None)
    row("full write of one save (s)", lambda n, p: mean(p["write_s"]))
    row("  copy, hash and write (s)", lambda n, p: mean(p["data_s"]))
    row("  fsync and commit (s)", lambda n, p: mean(p["write_s"]) - mean(p["data_s"]))
    row("write throughput (MB/s)", lambda n, p: gb * 1e3 / mean(p["write_s"]), "{:.0f}")
    row("median step while phase ran (s)", lambda n, p: p["step_s_median"], "{:.3f}")
    row("phase wall time (s)", lambda n, p: p["seconds"], "{:.1f}")
    row("CPU time of this process (s)", lambda n, p: p["cpu_s"], "{:.1f}")
    row("CPU other processes took (cores)", lambda n, p: p["others_cpu_s"] / p["seconds"], "{:.2f}")
    row("slowdown vs no saves (summed)", lambda n, p: p["seconds"] / base["seconds"] - 1, "{:.1%}")
    row("  per round: best", lambda n, p: out[f"{n.replace('-', '_')}_slowdown_best"], "{:.1%}")
    row("  per round: median", lambda n, p: out[f"{n.replace('-', '_')}_slowdown_median"], "{:.1%}")
    row(f"  quiet rounds (others < {QUIET} core)", lambda n, p: out[f"{n.replace('-', '_')}_quiet_rounds"], "{:d}")
    row("  quiet rounds: median", lambda n, p: out[f"{n.replace('-', '_')}_slowdown_quiet_median"], "{:.1%}")
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
        trainer.save()        # and the snapshot buffers, which every phase reuses
        trainer.checkpointer.wait()
        threads, yielding = torch.get_num_threads(), trainer._threads is not None
        phases: dict[str, dict] = {}
        names = [n for n in a.phases.split(",") if n]
        unknown = sorted(set(names) - set(PHASES))
        if unknown or "baseline" not in names or len(names) < 2:
            print(f"--phases: unknown {unknown}" if unknown else "--phases: needs baseline and one more", file=sys.stderr)
            return 2
        for r in range(a.rounds):
            for name in names:
                if a.quiet:
                    wait_quiet(a.quiet)
                got = phase(trainer, name, a.steps, a.every, root)
                print(f"round {r + 1} {name}: {got['seconds']:.1f}s (other processes {got['others_cpu_s'] / got['seconds']:.2f} "
                      f"cores)", flush=True)
                phases[name] = merge(phases.get(name), got)
    out = report(a, n_params, phases, (load0, os.getloadavg()[0]), threads, yielding)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"figures": out, "phases": phases}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
