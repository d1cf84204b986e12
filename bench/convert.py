"""Conversion benchmark: HF -> tune and tune -> HF on a generated checkpoint of >= 1 GB in >= 4 shards.

Prints, from one run on one machine:
  - wall time of a whole `ckptflow convert` process next to `cp -r` of the same files (both
    followed by `sync`, since ckptflow fsyncs before it commits; plain cp figures too),
  - the conversion work alone (in-process, after imports) next to the same cp,
  - peak RSS of the conversion process next to the model size and the largest shard,
  - torchtune 0.6.1's FullModelHFCheckpointer load + save of the same checkpoint, when a side
    environment with torchtune is given (--torchtune-python /path/to/venv/bin/python).

    .venv/bin/python -m bench.convert [--size-gb 1.0] [--dir /tmp/ckptflow-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from bench import synth

GB = 10**9
TIME_RSS = """
import resource, sys, time
t0 = time.perf_counter()
from ckptflow.stages import convert
t1 = time.perf_counter()
convert.run(sys.argv[1], sys.argv[2], to=sys.argv[3])
t2 = time.perf_counter()
print({"import_s": t1 - t0, "work_s": t2 - t1, "peak_rss": next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))})
"""
TORCHTUNE = """
import json, os, resource, sys, time
t0 = time.perf_counter()
from torchtune.training import FullModelHFCheckpointer
src, out = sys.argv[1], sys.argv[2]
files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
t1 = time.perf_counter()
ck = FullModelHFCheckpointer(checkpoint_dir=src, checkpoint_files=files, model_type="LLAMA3", output_dir=out)
sd = ck.load_checkpoint()
ck.save_checkpoint(sd, epoch=0)
os.sync()
t2 = time.perf_counter()
print({"import_s": t1 - t0, "work_s": t2 - t1, "peak_rss": next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))})
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t, out.stdout


def cp(src: str, dst: str, sync: bool) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", src, dst], check=True)
    if sync:
        os.sync()
    return time.perf_counter() - t


def convert(src: str, dst: str, to: str, python: str) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    t = time.perf_counter()
    out = subprocess.run([python, "-c", TIME_RSS, src, dst, to], check=True, capture_output=True, text=True)
    os.sync()
    res = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own subprocess's dict literal
    res["process_s"] = time.perf_counter() - t
    return res


def cli_process(src: str, dst: str, to: str) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    exe = os.path.join(os.path.dirname(sys.executable), "ckptflow")
    t = time.perf_counter()
    subprocess.run([exe, "convert", src, dst, "--to", to], check=True, capture_output=True)
    os.sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/ckptflow-bench")
    ap.add_argument("--torchtune-python", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    src, tune, hf, cpdst = (os.path.join(a.dir, n) for n in ("hf-src", "tune", "hf-out", "cp"))
    shutil.rmtree(a.dir, ignore_errors=True)
    n_layers = synth.layers_for(int(a.size_gb * GB), dim=1024, vocab=32000, hidden=2816, heads=16, kv_heads=4)
    info = synth.write(src, dim=1024, n_layers=n_layers, vocab=32000, hidden=2816, heads=16, kv_heads=4,
                       dtype="bfloat16", shard_bytes=int(a.size_gb * GB / 5))
    model_mb, shard_mb = info["total_bytes"] / 1e6, info["largest_shard"] / 1e6
    print(f"checkpoint: {model_mb:.0f} MB in {info['shards']} shards (largest {shard_mb:.0f} MB), bf16, {n_layers} layers")
    cp(src, cpdst, True)  # warm the page cache for both sides alike
    rows = []
    for _ in range(a.repeat):
        rows.append({"cp": cp(src, cpdst, False), "cp_sync": cp(src, cpdst, True),
                     "to_tune": convert(src, tune, "tune", sys.executable),
                     "to_hf": convert(tune, hf, "hf", sys.executable),
                     "cli_tune": cli_process(src, tune, "tune")})
    best = {k: min(r[k] if isinstance(r[k], float) else r[k]["process_s"] for r in rows) for k in rows[0]}
    work = {k: min(r[k]["work_s"] for r in rows) for k in ("to_tune", "to_hf")}
    rss = max(max(r["to_tune"]["peak_rss"], r["to_hf"]["peak_rss"]) for r in rows) / 1e6
    imp = min(r["to_tune"]["import_s"] for r in rows)
    mbps = lambda s: model_mb / s  # noqa: E731
    print(f"{'':34s}{'seconds':>9s}{'MB/s':>9s}{'x cp+sync':>11s}")
    print(f"{'cp -r':34s}{best['cp']:9.2f}{mbps(best['cp']):9.0f}")
    print(f"{'cp -r && sync':34s}{best['cp_sync']:9.2f}{mbps(best['cp_sync']):9.0f}{1:11.2f}")
    print(f"{'ckptflow convert (CLI process)':34s}{best['cli_tune']:9.2f}{mbps(best['cli_tune']):9.0f}{best['cli_tune'] / best['cp_sync']:11.2f}")
    for k, label in (("to_tune", "HF -> tune, process"), ("to_hf", "tune -> HF, process")):
        print(f"{label:34s}{best[k]:9.2f}{mbps(best[k]):9.0f}{best[k] / best['cp_sync']:11.2f}")
        print(f"{'  conversion work alone':34s}{work[k]:9.2f}{mbps(work[k]):9.0f}{work[k] / best['cp_sync']:11.2f}")
    print(f"import of the convert stage: {imp:.2f} s")
    print(f"peak RSS: {rss:.0f} MB | model {model_mb:.0f} MB | largest shard {shard_mb:.0f} MB | "
          f"budget shard + 500 MB = {shard_mb + 500:.0f} MB")
    if a.torchtune_python:
        out = os.path.join(a.dir, "torchtune-out")
        shutil.rmtree(out, ignore_errors=True)
        t, stdout = timed([a.torchtune_python, "-c", TORCHTUNE, src, out])
        r = eval(stdout.strip().splitlines()[-1])  # noqa: S307
        print(f"torchtune FullModelHFCheckpointer load+save: process {t:.2f} s ({t / best['cp_sync']:.2f} x cp+sync), "
              f"work {r['work_s']:.2f} s, peak RSS {r['peak_rss'] / 1e6:.0f} MB ({r['peak_rss'] / 1e6 / model_mb:.2f} x model)")
    else:
        print("torchtune: not measured (pass --torchtune-python of a side venv with torchtune==0.6.1 torchao==0.13.0)")
    shutil.rmtree(a.dir, ignore_errors=True)
    print(json.dumps({"best": best, "work": work, "peak_rss_mb": rss, "model_mb": model_mb, "shard_mb": shard_mb}))


if __name__ == "__main__":
    main()
