"""DCP step save throughput: the same trainer state (a seed Llama's weights and AdamW state, as
distributed.DistTrainer saves them: {"model": ..., "optimizer": {name: {step, exp_avg,
exp_avg_sq}}}) saved with formats.dcp to local disk and to the loopback S3 server, through the
same commit.Output + ckptflow.json commit a training step uses.

  - sync: dcp.save_state (every file hashed while written; local: fsynced; S3: spooled and
    uploaded whole through ckptflow.storage) then the commit;
  - async: dcp.save_state_async: the time training is blocked (staging into CPU memory), then
    the rest until the commit.
Each figure is the best of --repeat runs; MB = 10**6 bytes.

    .venv/bin/python -m bench.dcp_storage [--dim 512 --layers 8] [--repeat 3] [--dir /tmp/ckptflow-bench-dcp]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

MB = 10**6


def trainer_state(dim: int, layers: int) -> dict:
    import torch

    from ckptflow import seed
    from ckptflow.model import Transformer

    _, params = seed.parse(f"seed://llama?dim={dim}&n_layers={layers}")
    model = Transformer(seed.model_args("llama", params))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optim = {k: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
             for k, v in sd.items()}
    return {"model": sd, "optimizer": optim}


def save_once(sd: dict, uri: str, use_async: bool) -> tuple[float, float]:
    """(blocked seconds, total seconds until committed)."""
    from ckptflow.commit import Output
    from ckptflow.formats import dcp
    from ckptflow.manifest import Manifest

    t0 = time.perf_counter()
    out = Output(uri, overwrite=True)
    if use_async:
        finish = dcp.save_state_async(sd, uri)
        blocked = time.perf_counter() - t0
        digests = finish()
    else:
        digests = dcp.save_state(sd, uri)
        blocked = None
    out.files.update(digests)
    out.commit(Manifest(kind="train_state", format="dcp"))
    total = time.perf_counter() - t0
    return (blocked if blocked is not None else total), total


def measure(sd: dict, root: str, repeat: int, nbytes: int) -> dict:
    row = {}
    for mode in ("sync", "async"):
        runs = [save_once(sd, f"{root}/{mode}-{i}", mode == "async") for i in range(repeat)]
        blocked, total = min(r[0] for r in runs), min(r[1] for r in runs)
        row[mode] = {"blocked_s": round(blocked, 3), "total_s": round(total, 3), "MB_per_s": round(nbytes / MB / total, 1)}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default="/tmp/ckptflow-bench-dcp")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from ckptflow import storage
    from tests.servers.s3 import start_s3_server

    shutil.rmtree(a.dir, ignore_errors=True)
    Path(a.dir).mkdir(parents=True)
    sd = trainer_state(a.dim, a.layers)
    nbytes = sum(t.numel() * t.element_size() for part in (sd["model"], *sd["optimizer"].values()) for t in part.values())
    result = {"state_MB": round(nbytes / MB, 1), "dim": a.dim, "layers": a.layers, "repeat": a.repeat}
    result["local"] = measure(sd, f"{a.dir}/local", a.repeat, nbytes)
    server = start_s3_server(Path(a.dir) / "s3")
    try:
        bucket = server.make_bucket("bench")
        storage.set_options(bucket, server.storage_options)
        result["s3"] = measure(sd, f"{bucket}/steps", a.repeat, nbytes)
        result["s3_server"] = server.kind
    finally:
        server.stop()
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    shutil.rmtree(a.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
