"""Peak memory of a conversion grows with the shard, not with the model (measured in subprocesses)."""
import subprocess
import sys

from bench import synth

MB = 2**20
# VmHWM, not ru_maxrss: Linux carries the forking parent's high-water mark into ru_maxrss
# across exec, so under pytest (torch loaded) ru_maxrss would report pytest's size.
CODE = """
import sys
from ckptflow.stages import convert
convert.run(sys.argv[1], sys.argv[2])
convert.run(sys.argv[2], sys.argv[3], to="hf")
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def peak_rss(tmp_path, name: str, n_layers: int) -> tuple[int, dict]:
    info = synth.write(str(tmp_path / name), dim=512, n_layers=n_layers, vocab=8000, hidden=1408,
                       heads=8, kv_heads=2, dtype="float32", shard_bytes=12 * 10**6)
    out = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / name), str(tmp_path / f"{name}-tune"),
                          str(tmp_path / f"{name}-hf")], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]), info


def test_peak_memory_follows_the_shard_not_the_model(tmp_path):
    small_rss, small = peak_rss(tmp_path, "small", 4)      # ~ 75 MB of weights
    big_rss, big = peak_rss(tmp_path, "big", 24)           # ~ 290 MB of weights
    assert big["total_bytes"] > 3.5 * small["total_bytes"]
    grown = big_rss - small_rss
    # 215 MB more weights may cost at most a few MB more RSS (allocator noise), never the model
    assert grown < 24 * MB, f"peak RSS grew {grown / MB:.0f} MB with {(big['total_bytes'] - small['total_bytes']) / MB:.0f} MB more weights"
    assert big_rss < big["total_bytes"] / 2, f"peak RSS {big_rss / MB:.0f} MB for a {big['total_bytes'] / MB:.0f} MB model"
