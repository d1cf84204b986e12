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
        assert r["mfu"] == pytest.approx(gpu.mfu(got["params"], r["tokens_per_s"], 1.0))
        assert 5.5 < r["loss"] < 7.0      # ~ln(512): random weights, the same shape on both sides
    # LoRA trains the same adapters on both sides: rank 16 on the 7 projections of 2 layers
    assert rows["lora", "ckptflow"]["trainable"] == rows["lora", "transformers+peft"]["trainable"]
    assert rows["full", "ckptflow"]["trainable"] == rows["full", "transformers"]["trainable"] == got["params"]


def test_six_n_is_what_a_training_step_computes_in_weight_matmuls():
    """The MFU numerator, counted independently: torch's FlopCounterMode over one forward and
    backward of the tiny shape (full fine-tuning). Its matrix products (the projections, the MLP
    and the tied output head, forward and both gradients) must be train_flops_per_token * tokens
    within 1 % (N also holds the norms, 0.3 % here, which do no matmul). Attention's own products,
    which the 6N convention leaves out, are not among them (SDPA is a kernel of its own)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ckptflow import seed
    from ckptflow.model import Transformer
    from ckptflow.model_args import ModelArgs

    detected = seed.describe(gpu.SHAPES["tiny"])
    model = Transformer(ModelArgs.from_dict(detected.details["model_args"]))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in model.parameters()) == detected.num_params    # N: tied embedding once
    batch, seq = 2, 32
    tokens = torch.randint(3, model.args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as counter:
        model(tokens, labels=tokens).backward()
    ops = counter.get_flop_counts()["Global"]
    weights = sum(n for op, n in ops.items() if str(op).split(".")[-1] in ("mm", "addmm", "bmm"))
    assert weights == pytest.approx(gpu.train_flops_per_token(detected.num_params) * batch * seq, rel=0.01)


@pytest.mark.parametrize("name,key", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                      ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"),
                                      ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"), ("NVIDIA L4", "L4")])
def test_peak_flops_lookup_takes_the_longest_matching_name(name, key):
    """The rule, not the data-sheet figures: "H100 PCIe" is not read as "H100", nor "L40S" as "L4"."""
    assert gpu.lookup_peak(name) == (gpu.PEAK_TFLOPS[key], f"{name} ({key} table entry)")


def test_a_device_missing_from_the_table_has_no_peak():
    peak, why = gpu.lookup_peak("Tesla T4")
    assert peak is None and "CKPTFLOW_PEAK_TFLOPS" in why


def test_peak_flops_override_from_the_environment(monkeypatch):
    import torch

    monkeypatch.setenv("CKPTFLOW_PEAK_TFLOPS", "123.5")
    assert gpu.peak_tflops(torch.device("cpu"), None) == (123.5, "CKPTFLOW_PEAK_TFLOPS")
    assert gpu.peak_tflops(torch.device("cpu"), 7.0)[0] == 7.0
