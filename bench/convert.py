"""Conversion benchmark: HF -> tune and tune -> HF on a generated checkpoint of >= 1 GB in >= 4 shards.

Prints, from one run on one machine, best of --repeat (3), each row beside the reference:
  - a durable copy of the same files (each file copied, then fsynced, then the directory: what a
    commit must do at the least), as a whole process like the conversions,
  - `ckptflow convert` HF -> tune and tune -> HF as whole processes, each reading a committed
    source (ckptflow.json) and so re-hashing it against its manifest while converting, plus
    HF -> tune from a bare HF directory (nothing to verify), the conversion work alone
    (in-process, after imports) and the CLI,
  - the CPU seconds (user + sys) of each process: on a machine with few cores they bound the
    wall time (sha256 of what is written + sha256 of the source verified),
  - peak RSS of the conversion process next to the model size and the largest shard,
  - `cp -r && sync` for comparison (a global sync also flushes other processes' data: noisy),
  - torchtune 0.6.1's FullModelHFCheckpointer load + save of the same checkpoint, when a side
    environment with torchtune is given (--torchtune-python /path/to/venv/bin/python).

    .venv/bin/python -m bench.convert [--size-gb 1.0] [--dir /tmp/ckptflow-bench] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

from bench import synth

GB = 10**9
TIME_RSS = """
import sys, time
t0 = time.perf_counter()
from ckptflow.stages import convert
t1 = time.perf_counter()
convert.run(sys.argv[1], sys.argv[2], to=sys.argv[3])
t2 = time.perf_counter()
print({"import_s": t1 - t0, "work_s": t2 - t1, "peak_rss": next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))})
"""
DURABLE_COPY = """
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
for name in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    fd = os.open(os.path.join(dst, name), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
for d in (dst, os.path.dirname(dst)):
    fd = os.open(d, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
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


def process(cmd: list[str], dst: str) -> dict:
    """Run `cmd` as a fresh process writing into `dst` (removed first, the disk flushed before
    the clock starts): wall seconds, CPU seconds, and what it printed."""
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"s": wall, "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime}
    lines = out.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        res.update(eval(lines[-1]))  # noqa: S307 - our own subprocess's dict literal
    return res


def cp_sync(src: str, dst: str) -> dict:
    return process(["sh", "-c", f"cp -r '{src}' '{dst}' && sync"], dst)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/ckptflow-bench")
    ap.add_argument("--torchtune-python", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    raw, src, tune, hf, cpdst = (os.path.join(a.dir, n) for n in ("hf-raw", "hf-src", "tune", "hf-out", "copy"))
    shutil.rmtree(a.dir, ignore_errors=True)
    n_layers = synth.layers_for(int(a.size_gb * GB), dim=1024, vocab=32000, hidden=2816, heads=16, kv_heads=4)
    info = synth.write(raw, dim=1024, n_layers=n_layers, vocab=32000, hidden=2816, heads=16, kv_heads=4,
                       dtype="bfloat16", shard_bytes=int(a.size_gb * GB / 5))
    from ckptflow.stages import download

    download.run(raw, src)          # the same files, committed: a pipeline's downloaded model
    model_mb, shard_mb = info["total_bytes"] / 1e6, info["largest_shard"] / 1e6
    print(f"checkpoint: {model_mb:.0f} MB in {info['shards']} shards (largest {shard_mb:.0f} MB), bf16, "
          f"{n_layers} layers; {os.cpu_count()} CPUs")
    py, exe = sys.executable, os.path.join(os.path.dirname(sys.executable), "ckptflow")
    conv = lambda s, d, to: process([py, "-c", TIME_RSS, s, d, to], d)  # noqa: E731
    process([py, "-c", DURABLE_COPY, src, cpdst], cpdst)     # warm the page cache for every side alike
    runs = {"durable copy": lambda: process([py, "-c", DURABLE_COPY, src, cpdst], cpdst),
            "cp -r && sync": lambda: cp_sync(src, cpdst),
            "HF -> tune (verifies source)": lambda: conv(src, tune, "tune"),
            "tune -> HF (verifies source)": lambda: conv(tune, hf, "hf"),
            "HF -> tune, bare HF source": lambda: conv(raw, tune, "tune"),
            "ckptflow convert CLI, HF -> tune": lambda: process([exe, "convert", src, tune, "--to", "tune"], tune)}
    rows: dict[str, list[dict]] = {k: [] for k in runs}
    for _ in range(a.repeat):
        for k, fn in runs.items():      # interleaved, so a slow moment of the disk hits every row alike
            rows[k].append(fn())
    best = {k: min(v, key=lambda r: r["s"]) for k, v in rows.items()}
    ref = best["durable copy"]["s"]
    mbps = lambda s: model_mb / s  # noqa: E731
    print(f"{'':36s}{'seconds':>9s}{'MB/s':>8s}{'x durable copy':>16s}{'CPU s':>8s}{'work s':>8s}")
    for k, r in best.items():
        work = f"{r['work_s']:8.2f}" if "work_s" in r else ""
        print(f"{k:36s}{r['s']:9.2f}{mbps(r['s']):8.0f}{r['s'] / ref:16.2f}{r['cpu_s']:8.2f}{work}")
    rss = max(r.get("peak_rss", 0) for v in rows.values() for r in v) / 1e6
    print(f"import of the convert stage: {min(r['import_s'] for r in rows['HF -> tune (verifies source)']):.2f} s")
    print(f"peak RSS: {rss:.0f} MB | model {model_mb:.0f} MB | largest shard {shard_mb:.0f} MB | "
          f"budget shard + 500 MB = {shard_mb + 500:.0f} MB")
    if a.torchtune_python:
        out = os.path.join(a.dir, "torchtune-out")
        shutil.rmtree(out, ignore_errors=True)
        t, stdout = timed([a.torchtune_python, "-c", TORCHTUNE, raw, out])
        r = eval(stdout.strip().splitlines()[-1])  # noqa: S307
        print(f"torchtune FullModelHFCheckpointer load+save: process {t:.2f} s ({t / ref:.2f} x durable copy), "
              f"work {r['work_s']:.2f} s, peak RSS {r['peak_rss'] / 1e6:.0f} MB ({r['peak_rss'] / 1e6 / model_mb:.2f} x model)")
    else:
        print("torchtune: not measured (pass --torchtune-python of a side venv with torchtune==0.6.1 torchao==0.13.0)")
    shutil.rmtree(a.dir, ignore_errors=True)
    print(json.dumps({"best": {k: r["s"] for k, r in best.items()}, "cpu_s": {k: r["cpu_s"] for k, r in best.items()},
                      "peak_rss_mb": rss, "model_mb": model_mb, "shard_mb": shard_mb}))


if __name__ == "__main__":
    main()
