"""Memory knobs, on vs off, from one run: tokens/s, peak RSS while training (Linux VmHWM, reset after a
warm-up step) and the loss of each.

    .venv/bin/python bench/knobs.py                       # 256-dim llama, 32k vocabulary, seq 256
    .venv/bin/python bench/knobs.py --vocab 128256 --steps 4

Each configuration trains the same model on the same batches for --steps full fine-tuning steps
in its own process (so peak RSS is its own): plain; train.activation_checkpointing; train.loss_chunk;
both; with --compile also train.compile (the compile happens in the warm-up step, not timed).
The loss after the last step must agree (float32 summation order only).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {"off": {}, "activation_checkpointing": {"activation_checkpointing": True},
           "loss_chunk": {"loss_chunk": None}, "both": {"activation_checkpointing": True, "loss_chunk": None},
           "compile": {"compile": True}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunk", type=int, default=128, help="train.loss_chunk (tokens per cross-entropy chunk)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also measure train.compile (minutes of compiling on CPU)")
    p.add_argument("--dir", default="/tmp/ckptflow-bench-knobs")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run one configuration
    return p.parse_args(argv)


def make_base(a) -> str:
    from ckptflow.stages import convert, download

    source = (f"seed://llama?dim={a.dim}&n_layers={a.layers}&n_heads={a.heads}&n_kv_heads={a.heads}"
              f"&vocab_size={a.vocab}")
    tag = f"d{a.dim}-l{a.layers}-v{a.vocab}"
    src = download.run(source, os.path.join(a.dir, tag, "source"))
    return convert.run(src.uri, os.path.join(a.dir, tag, "base")).uri


def one(a, base_uri: str, name: str) -> dict:
    import resource

    from ckptflow import config, trainer

    knobs = {k: (a.chunk if k == "loss_chunk" else v) for k, v in CONFIGS[name].items()}
    cfg = config.validate({
        "run_id": name, "storage": os.path.join(a.dir, "runs"), "model": {"source": base_uri},
        "data": {"train": os.path.join(ROOT, "deployments", "data", "demo.jsonl")},
        "train": {"method": "full", "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
                  "packed": True, "lr": 1e-4, "device": "cpu", "threads": a.threads, **knobs},
        "checkpoint": {"every_steps": None}})
    with trainer.process_settings(cfg.train):
        t = trainer.Trainer(cfg, base_uri)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t.train_step()      # warm-up: allocates the AdamW state
        reset_peak_rss()    # what follows is the training steps' own peak, not the model build's
        t0, tokens, loss = time.perf_counter(), 0, None
        for _ in range(a.steps):
            row = t.train_step()
            tokens, loss = tokens + row["tokens"], row["loss"]
        secs = time.perf_counter() - t0
    rss = peak_rss_kb()
    return {"name": name, "tokens_per_s": tokens / secs, "peak_rss_gb": rss / 1e6,
            "rss_before_training_gb": rss0 / 1e6, "loss": loss}


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:   # Linux: "5" resets VmHWM to the current RSS
        f.write("5")


def peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one:
        base_uri, name = a.one.split("|")
        print(json.dumps(one(a, base_uri, name)))
        return 0
    base_uri = make_base(a)
    load = os.getloadavg()[0]
    rows = []
    for name in [n for n in CONFIGS if n != "compile" or a.compile]:
        cmd = [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv),
               "--one", f"{base_uri}|{name}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{name}: done", flush=True)
    print(f"\n{a.dim}-dim llama, {a.layers} layers, vocabulary {a.vocab}, {a.batch_size}x{a.seq_len} tokens per step, "
          f"full fine-tune float32, {a.threads} thread(s), loss_chunk={a.chunk}; load average "
          f"{load:.2f}/{os.getloadavg()[0]:.2f}\n")
    off = rows[0]
    print(f"{'':26}{'tokens/s':>10}{'vs off':>9}{'peak RSS GB':>13}{'vs off':>9}{'loss':>12}")
    for r in rows:
        print(f"{r['name']:26}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / off['tokens_per_s']:>9.2f}"
              f"{r['peak_rss_gb']:>13.3f}{r['peak_rss_gb'] - off['peak_rss_gb']:>+9.3f}{r['loss']:>12.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
