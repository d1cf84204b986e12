"""Peak memory of an export that merges a LoRA step on the fly grows with the largest tensor, not the model."""
import os
import subprocess
import sys

import pytest

from bench import synth
from ckptflow.stages import convert
from tests.test_peft import lora_step

MB = 2**20
CODE = """
import sys
from ckptflow.stages import export
export.run(sys.argv[1], sys.argv[2], format="hf")
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""
# The same process without the export: torch imported and one merge done (the fixed cost).
BASELINE = """
import torch
from ckptflow.stages import export
torch.randn(512, 8) @ torch.randn(8, 512)
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""
ALL = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3", "output"]


def peak_rss(tmp_path, name: str, n_layers: int) -> tuple[int, dict]:
    run = str(tmp_path / name)
    info = synth.write(os.path.join(run, "source"), dim=512, n_layers=n_layers, vocab=2000, hidden=1408,
                       heads=8, kv_heads=2, dtype="float32", shard_bytes=12 * 10**6)
    convert.run(os.path.join(run, "source"), os.path.join(run, "base"))
    lora_step(run, 1, {"rank": 8, "alpha": 16.0, "targets": ALL})
    out = subprocess.run([sys.executable, "-c", CODE, run, str(tmp_path / f"{name}-hf")],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]), info


@pytest.mark.slow   # ~15 s of writing 200 MB twice; tests/test_convert_memory.py covers the plan machinery by default
def test_merging_export_memory_follows_the_tensor_not_the_model(tmp_path):
    small_rss, small = peak_rss(tmp_path, "small", 2)      # ~ 25 MB of weights
    big_rss, big = peak_rss(tmp_path, "big", 12)           # ~ 125 MB of weights
    assert big["total_bytes"] > 3.5 * small["total_bytes"]
    grown = big_rss - small_rss
    assert grown < 16 * MB, f"peak RSS grew {grown / MB:.0f} MB with {(big['total_bytes'] - small['total_bytes']) / MB:.0f} MB more weights"
    base = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1])
    # Beyond the fixed cost: the largest tensors (w1/w2/w3, 3 MB each) a few times over, not the model.
    assert big_rss - base < big["total_bytes"] / 3, f"{(big_rss - base) / MB:.0f} MB above torch's own {base / MB:.0f} MB"
