"""Storage benchmark: a >= 1 GB sharded checkpoint written and read through ckptflow, next to raw
fsspec `fs.pipe` / `fs.cat` of the same bytes, on the loopback S3 server and on local disk.

Through ckptflow:
  - write: `commit.Output` writes of the shard files from memory in 16 MB writes (hashed while
    written; local: fsync before the commit; S3: spooled, then one upload per file) and the
    manifest commit;
  - convert: `ckptflow convert` (in process) of an HF checkpoint on local disk into tune format
    at the destination, the stage a run actually performs;
  - read: every shard streamed through `storage.open_read` in 16 MB reads, as the readers do;
  - verify: the same read with sha256 (`ckptflow verify`).
Raw: `fs.pipe(path, bytes)` per shard from memory (+ fsync of the file locally, as ckptflow
fsyncs) and `fs.cat(path)` per shard. Reading the local source is timed for neither write.
Each figure is the best of --repeat runs; MB = 10**6 bytes. Local reads come from the page cache.

    .venv/bin/python -m bench.storage [--size-gb 1.0] [--dir /tmp/ckptflow-bench-storage] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench import synth

GB = 10**9
MB = 10**6


def shard_names(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def best(fn, repeat: int) -> float:
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def ckptflow_write(src: str, dst_root: str, repeat: int) -> float:
    """Output writes of each shard's bytes (already in memory, as for raw_pipe) and the commit."""
    from ckptflow import commit, storage
    from ckptflow.manifest import Manifest

    times = []
    for i in range(repeat):
        spent = 0.0
        out = commit.Output(storage.join(dst_root, f"write-{i}"))
        for name in shard_names(src):
            with open(os.path.join(src, name), "rb") as f:
                data = memoryview(f.read())
            t0 = time.perf_counter()
            with out.open(name) as w:
                for pos in range(0, len(data), storage.CHUNK):
                    w.write(data[pos:pos + storage.CHUNK])
            spent += time.perf_counter() - t0
        t0 = time.perf_counter()
        out.commit(Manifest(kind="model", format="hf"))    # waits for the background fsyncs
        times.append(spent + time.perf_counter() - t0)
    return min(times)


def ckptflow_convert(src: str, dst_root: str, repeat: int) -> float:
    from ckptflow import storage
    from ckptflow.stages import convert

    return best(lambda i: convert.run(src, storage.join(dst_root, f"convert-{i}")), repeat)


def ckptflow_read(uri: str, names: list[str], repeat: int, verify: bool) -> float:
    from ckptflow import manifest, storage

    def once(_: int) -> None:
        if verify:
            assert manifest.verify(uri) == []
            return
        for name in names:
            with storage.open_read(storage.join(uri, name)) as f:
                while f.read(storage.CHUNK):
                    pass

    return best(once, repeat)


def raw_pipe(src: str, dst_root: str, repeat: int, local: bool) -> float:
    from ckptflow import storage

    def once(i: int) -> None:
        fs, root = storage.fs_and_path(storage.join(dst_root, f"raw-{i}"))
        if local:
            os.makedirs(root, exist_ok=True)
        for name in shard_names(src):
            with open(os.path.join(src, name), "rb") as f:
                data = f.read()
            t0 = time.perf_counter()
            fs.pipe(f"{root}/{name}", data)
            if local:                   # as durable as ckptflow's write (it fsyncs every file)
                fd = os.open(f"{root}/{name}", os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            once.io += time.perf_counter() - t0

    times = []
    for i in range(repeat):
        once.io = 0.0
        once(i)
        times.append(once.io)       # the pipes (and the sync), not the reads of the local source
    return min(times)


def raw_cat(uri: str, names: list[str], repeat: int) -> float:
    from ckptflow import storage

    fs, root = storage.fs_and_path(uri)
    return best(lambda _: [fs.cat(f"{root}/{n}") for n in names], repeat)


def measure(kind: str, src: str, root: str, repeat: int) -> dict:
    from ckptflow import manifest, storage

    local = kind == "local"
    names = shard_names(src)
    nbytes = sum(os.path.getsize(os.path.join(src, n)) for n in names)
    out = {"bytes": nbytes, "shards": len(names)}
    out["ckptflow write (Output)"] = ckptflow_write(src, root, repeat)
    out["raw fs.pipe" + (" + fsync" if local else "")] = raw_pipe(src, root, repeat, local)
    written = storage.join(root, "write-0")
    out["ckptflow read (open_read)"] = ckptflow_read(written, names, repeat, verify=False)
    out["ckptflow verify (read + sha256)"] = ckptflow_read(written, names, repeat, verify=True)
    out["raw fs.cat"] = raw_cat(storage.join(root, "raw-0"), names, repeat)
    out["ckptflow convert hf -> tune"] = ckptflow_convert(src, root, 1)
    conv = manifest.require(storage.join(root, "convert-0"))
    out["convert bytes"] = sum(f["size"] for n, f in conv.files.items() if n.endswith(".safetensors"))
    return out


def table(results: dict) -> str:
    lines = [f"{'where':6} {'operation':34} {'seconds':>8} {'MB/s':>8}"]
    for kind, r in results.items():
        for op, secs in r.items():
            if op in ("bytes", "shards", "convert bytes"):
                continue
            n = r["convert bytes"] if "convert" in op else r["bytes"]
            lines.append(f"{kind:6} {op:34} {secs:8.2f} {n / secs / MB:8.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/ckptflow-bench-storage")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from ckptflow import storage
    from tests.servers.s3 import start_s3_server

    shutil.rmtree(a.dir, ignore_errors=True)
    src = os.path.join(a.dir, "src")
    n_layers = synth.layers_for(int(a.size_gb * GB), dim=1024, vocab=32000, hidden=2816, heads=16, kv_heads=4)
    info = synth.write(src, dim=1024, n_layers=n_layers, vocab=32000, hidden=2816, heads=16, kv_heads=4,
                       dtype="bfloat16", shard_bytes=int(a.size_gb * GB / 5))
    print(f"checkpoint: {info['total_bytes'] / GB:.2f} GB in {info['shards']} shards", flush=True)
    server = start_s3_server(Path(a.dir) / "s3")
    try:
        bucket = server.make_bucket("bench")
        storage.set_options(bucket, server.storage_options)
        results = {"s3": measure("s3", src, f"{bucket}/run", a.repeat),
                   "local": measure("local", src, os.path.join(a.dir, "local"), a.repeat)}
    finally:
        server.stop()
    results["_meta"] = {"s3_server": server.kind, "load_avg": os.getloadavg(), "cpus": os.cpu_count()}
    print(table({k: v for k, v in results.items() if not k.startswith("_")}))
    print(f"S3 server: {server.kind}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
