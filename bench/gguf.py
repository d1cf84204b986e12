"""GGUF export benchmark: peak RSS of `ckptflow export --format gguf` against the model size and its
largest tensor, measured in the same run, for a raw copy (the source dtype) and for q8_0 (every
tensor converted and quantized).

A generated Llama checkpoint (bench/synth.py: random float32 values, a byte-level BPE tokenizer
from seed://) is exported in a fresh process per dtype; each process reports its peak RSS
(VmHWM), and a baseline process that imports the same modules and quantizes one small block
gives the fixed cost. The claim checked: peak RSS - baseline <= largest tensor + 0.5 GB.

    .venv/bin/python -m bench.gguf [--size-gb 1.0] [--dir /tmp/ckptflow-bench-gguf] [--dtypes f32 q8_0]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from bench import synth

GB, MB = 10**9, 2**20
EXPORT = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
from ckptflow.stages import export
t0 = time.perf_counter()
export.run(sys.argv[1], sys.argv[2], format="gguf", dtype=sys.argv[3])
t1 = time.perf_counter()
print(json.dumps({"work_s": t1 - t0,
                  "peak_rss": next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))}))
"""
BASELINE = """
import json
import numpy as np, torch, gguf
from gguf import quants, GGMLQuantizationType
from ckptflow.stages import export
from ckptflow.formats import gguf as g, gguf_vocab
quants.quantize(np.ones((64, 64), np.float32), GGMLQuantizationType.Q8_0)
print(json.dumps({"peak_rss": next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))}))
"""


def model(path: str, size_gb: float) -> dict:
    """A float32 Llama of about size_gb (dim 2048, vocab 32000, as many layers as fit), finite values,
    with a byte-level BPE tokenizer."""
    from ckptflow import seed

    per_layer = 4 * (2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 2048 * 5632)
    head = 4 * 2 * 32000 * 2048
    n_layers = max(1, round((size_gb * GB - head) / per_layer))
    info = synth.write(path, dim=2048, n_layers=n_layers, vocab=32000, hidden=5632, heads=16, kv_heads=4,
                       dtype="float32", shard_bytes=500 * 10**6)
    finite(path)
    files, _ = seed.tokenizer_files(512)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    info["n_layers"] = n_layers
    info["largest_tensor"] = 4 * max(32000 * 2048, 2048 * 5632)
    return info


def finite(path: str) -> None:
    """Random bytes as float32 include NaN and inf; clear the exponent's top bit so every value is finite."""
    from ckptflow.formats import st

    for name in os.listdir(path):
        if not name.endswith(".safetensors"):
            continue
        _, infos = st.read_header(os.path.join(path, name))
        with open(os.path.join(path, name), "r+b") as f:
            for t in infos:
                f.seek(t.start)
                a = np.frombuffer(f.read(t.nbytes), dtype=np.uint32) & np.uint32(0xBFFFFFFF)
                f.seek(t.start)
                f.write(a.tobytes())


def run_py(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/ckptflow-bench-gguf")
    ap.add_argument("--dtypes", nargs="+", default=["f32", "q8_0"])
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    src = os.path.join(a.dir, "src")
    t0 = time.perf_counter()
    info = model(src, a.size_gb)
    print(f"model: {info['total_bytes'] / GB:.2f} GB float32, {info['n_layers']} layers, largest tensor "
          f"{info['largest_tensor'] / MB:.0f} MiB (written in {time.perf_counter() - t0:.0f} s)")
    base = run_py(BASELINE)["peak_rss"]
    print(f"baseline (imports + one quantize): {base / MB:.0f} MiB")
    for dtype in a.dtypes:
        dst = os.path.join(a.dir, f"out-{dtype}")
        r = run_py(EXPORT, src, dst, dtype)
        size = os.path.getsize(os.path.join(dst, "model.gguf"))
        above = r["peak_rss"] - base
        budget = info["largest_tensor"] + 0.5 * GB
        print(f"{dtype}: peak RSS {r['peak_rss'] / MB:.0f} MiB = baseline + {above / MB:.0f} MiB "
              f"({above / info['total_bytes']:.1%} of the model; budget largest tensor + 0.5 GB = {budget / MB:.0f} MiB: "
              f"{'OK' if above <= budget else 'OVER'}); file {size / GB:.2f} GB in {r['work_s']:.1f} s "
              f"({size / r['work_s'] / MB:.0f} MiB/s)")
        shutil.rmtree(dst)


if __name__ == "__main__":
    main()
