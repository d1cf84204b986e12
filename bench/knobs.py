"""What the memory and speed knobs buy: tokens/s and peak RSS with each one off and on, same run.

    .venv/bin/python bench/knobs.py                       # 128k vocabulary, dim 256, 8 layers, 1024 tokens
    .venv/bin/python bench/knobs.py --compile             # also train.compile (minutes of compiling on CPU)
    .venv/bin/python bench/knobs.py --modes off,chunk --steps 2 --layers 2    # quick look

One base model (seed://llama with a Llama-3 sized vocabulary of 128,256 tokens), then one fresh
process per mode, so each peak RSS (VmHWM) is that mode's alone:
  off      no knob
  ac       train.activation_checkpointing: true
  chunk    train.loss_chunk: N (default 256 tokens)
  both     activation checkpointing + loss_chunk
  compile  train.compile: true (the timed steps come after two warm-up steps that compile); --compile
  all      the three together; --compile
Every process trains the same steps on the same data from the same weights, so the losses must
agree (the table prints each mode's largest relative loss difference from `off`). tokens/s is
over the timed steps only (after --warmup steps); peak RSS is over the timed steps too (VmHWM
reset through /proc/self/clear_refs after the warm-up), "process peak" is the whole process's,
warm-up and compilation included. On CPU, float32; the figures are this machine's, the ratios
are the point.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"off": {}, "ac": {"activation_checkpointing": True}, "chunk": {"loss_chunk": None},
         "both": {"activation_checkpointing": True, "loss_chunk": None}, "compile": {"compile": True},
         "all": {"activation_checkpointing": True, "loss_chunk": None, "compile": True}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--method", choices=["full", "lora"], default="full")
    p.add_argument("--chunk", type=int, default=256, help="train.loss_chunk for the chunk and all modes")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile modes: at least 2)")
    p.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODES)} "
                                                  "(default: off,ac,chunk,both; with --compile also compile,all)")
    p.add_argument("--compile", action="store_true", help="also the compile and all modes")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dir", default="/tmp/ckptflow-bench-knobs")
    p.add_argument("--json", dest="json_out", default=None)
    return p.parse_args(argv)


def make_base(a) -> str:
    from ckptflow.stages import convert, download

    source = (f"seed://llama?dim={a.dim}&n_layers={a.layers}&n_heads={a.heads}&n_kv_heads={a.heads}"
              f"&pad_vocab={a.vocab}&max_seq_len={max(a.seq_len, 512)}")
    tag = f"v{a.vocab}-d{a.dim}-l{a.layers}-h{a.heads}"
    if not os.path.exists(os.path.join(a.dir, tag, "base", "ckptflow.json")):
        src = download.run(source, os.path.join(a.dir, tag, "source"))
        convert.run(src.uri, os.path.join(a.dir, tag, "base"))
    return os.path.join(a.dir, tag, "base")


def train_config(a, base_uri: str, mode: str) -> dict:
    knobs = {k: (a.chunk if k == "loss_chunk" else v) for k, v in MODES[mode].items()}
    return {"run_id": f"knobs-{mode}", "storage": os.path.join(a.dir, "runs"), "model": {"source": base_uri},
            "data": {"train": os.path.join(ROOT, "deployments", "data", "demo.jsonl")},
            "train": {"method": a.method, "steps": 10**6, "batch_size": a.batch_size, "seq_len": a.seq_len,
                      "packed": True, "lr": 1e-5, "device": "cpu", "threads": a.threads, **knobs},
            "checkpoint": {"every_steps": None}}


CHILD = r"""
import json, sys, time
from ckptflow import config
from ckptflow.trainer import Trainer, process_settings

cfg = config.validate(json.loads(sys.argv[1]))
warmup, steps = int(sys.argv[2]), int(sys.argv[3])
with process_settings(cfg.train):
    trainer = Trainer(cfg, cfg.model.source)
    losses = [trainer.train_step()["loss"] for _ in range(warmup)]
    whole_peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    try:     # Linux: "5" resets VmHWM, so the next figure is the timed steps' alone (no compiler)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t0, tokens = time.perf_counter(), 0
    for _ in range(steps):
        row = trainer.train_step()
        losses.append(row["loss"])
        tokens += row["tokens"]
    seconds = time.perf_counter() - t0
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("RESULT " + json.dumps({"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
                              "peak_rss": peak, "process_peak_rss": max(peak, whole_peak), "losses": losses}))
"""


def run_mode(a, base_uri: str, mode: str) -> dict:
    warmup = max(a.warmup, 2) if MODES[mode].get("compile") else a.warmup
    cfg = train_config(a, base_uri, mode)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(warmup), str(a.steps)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"mode {mode} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    got = json.loads(line[len("RESULT "):])
    got["warmup"] = warmup
    return got


def report(a, results: dict, load: tuple) -> dict:
    ref = results.get("off")
    logits_gb = a.batch_size * a.seq_len * a.vocab * 4 / 1e9
    print(f"\nseed://llama vocab {a.vocab}, dim {a.dim}, {a.layers} layers, {a.batch_size} x {a.seq_len} tokens per step, "
          f"{a.method} fine-tune, float32 on CPU; one [tokens, vocab] float32 logits tensor = {logits_gb:.2f} GB; "
          f"loss_chunk {a.chunk}; {a.steps} timed steps per mode; load average {load[0]:.2f}/{load[1]:.2f}\n")
    print(f"{'mode':10}{'tokens/s':>10}{'vs off':>9}{'peak RSS (GB)':>15}{'vs off':>10}{'process peak':>14}"
          f"{'max loss diff':>16}")
    for mode, r in results.items():
        rel = "-"
        if ref is not None:
            n = min(len(r["losses"]), len(ref["losses"]))
            r["max_rel_loss_diff"] = max(abs(x - y) / abs(y) for x, y in zip(r["losses"][:n], ref["losses"][:n]))
            rel = f"{r['max_rel_loss_diff']:.1e}"
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem = f"{(r['peak_rss'] - ref['peak_rss']) / 1e9:+.2f}" if ref else "-"
        print(f"{mode:10}{r['tokens_per_s']:>10.0f}{speed:>9}{r['peak_rss'] / 1e9:>15.2f}{mem:>10}"
              f"{r['process_peak_rss'] / 1e9:>14.2f}{rel:>16}")
    return results


def main(argv=None) -> int:
    a = parse_args(argv)
    default = "off,ac,chunk,both" + (",compile,all" if a.compile else "")
    modes = [m.strip() for m in (a.modes or default).split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"--modes: unknown mode {bad[0]!r} (choose from {', '.join(MODES)})", file=sys.stderr)
        return 2
    t = time.perf_counter()
    base_uri = make_base(a)
    print(f"base model ready in {time.perf_counter() - t:.1f}s: {base_uri}", flush=True)
    load = os.getloadavg()[0]
    results = {}
    for mode in modes:
        results[mode] = run_mode(a, base_uri, mode)
        r = results[mode]
        print(f"{mode}: {r['tokens_per_s']:.0f} tokens/s, peak RSS {r['peak_rss'] / 1e9:.2f} GB", flush=True)
    report(a, results, (load, os.getloadavg()[0]))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
