"""bench/gpu.py's CPU path: the same code as on a GPU, on a tiny shape, and honest about it."""
import json

import pytest

from bench import gpu


def test_tiny_cpu_run_measures_both_frameworks_and_says_it_is_a_smoke_test(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--tiny", "--device", "cpu", "--peak-tflops", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU SMOKE TEST ONLY" in printed
    got = json.loads(out.read_text())
    assert got["cpu_smoke_test_only"] is True and got["device"] == "cpu"
    rows = {(r["method"], r["framework"]): r for r in got["rows"]}
    assert set(rows) == {("lora", "ckptflow"), ("lora", "transformers+peft"), ("full", "ckptflow"),
                         ("full", "transformers")}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["save_blocked_s"] > 0
        assert r["mfu"] == pytest.approx(6 * got["params"] * r["tokens_per_s"] / 1e12)
        assert 5.5 < r["loss"] < 7.0      # ~ln(512): random weights, the same shape on both sides
    # LoRA trains the same adapters on both sides: rank 16 on the 7 projections of 2 layers
    assert rows["lora", "ckptflow"]["trainable"] == rows["lora", "transformers+peft"]["trainable"]
    assert rows["full", "ckptflow"]["trainable"] == rows["full", "transformers"]["trainable"] == got["params"]


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("Tesla T4", None)])
def test_peak_flops_table_by_device_name(name, peak):
    assert gpu.lookup_peak(name)[0] == peak


def test_peak_flops_override_from_the_environment(monkeypatch):
    import torch

    monkeypatch.setenv("CKPTFLOW_PEAK_TFLOPS", "123.5")
    assert gpu.peak_tflops(torch.device("cpu"), None) == (123.5, "CKPTFLOW_PEAK_TFLOPS")
    assert gpu.peak_tflops(torch.device("cpu"), 7.0)[0] == 7.0
