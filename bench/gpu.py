"""GPU training figures for a 1B-class Llama: ckptflow beside transformers + peft, same shape, same run.

    .venv/bin/python bench/gpu.py                        # CUDA: Llama-3.2-1B shape, bf16, LoRA and full
    .venv/bin/python bench/gpu.py --knobs                # also ckptflow with activation checkpointing + chunked loss
    .venv/bin/python bench/gpu.py --tiny --device cpu    # smoke test in seconds: CPU figures mean nothing
    .venv/bin/python bench/gpu.py --shape cpu --device cpu   # ~60M float32: CPU throughput beside transformers + peft

The model is seed://llama with the shape of Llama-3.2-1B (dim 2048, 16 layers, 32 heads, 8 KV heads,
FFN 8192, a 128,256-row tied embedding, llama3 RoPE, bf16): random weights, the real compute. For
each method (LoRA rank 16 on every projection, and full fine-tuning) and each framework:

  tokens/s     timed steps after warm-up steps (CUDA synchronised around them)
  MFU          6 * N * tokens/s over the GPU's peak dense bf16 FLOP/s (N = the model's parameters,
               tied embedding counted once); peak from PEAK_TFLOPS by device name, or
               CKPTFLOW_PEAK_TFLOPS / --peak-tflops. LoRA skips the frozen weights' gradients, so
               its real work is nearer 4N: its MFU by the 6N convention reads high, the same for both.
  peak memory  torch.cuda.max_memory_allocated over the run (reset before each), GB
  save blocked how long training waits for one checkpoint: ckptflow's async save (snapshot, the
               write runs in the background; its full write time beside it); transformers has
               no async save: save_pretrained + torch.save(optimizer) as its Trainer does, blocking.

Both frameworks train the same way: AdamW, bf16 autocast; full: float32 master weights; LoRA:
the base in bf16, adapters in float32. On CPU (--device cpu) everything is float32 and the
figures are only a smoke test of this script: no MFU without --peak-tflops, peak memory is the
process's VmHWM so far (not resettable), and nothing here says how a GPU would do.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "deployments", "data", "demo.jsonl")

SHAPES = {
    "1b": "seed://llama?dim=2048&n_layers=16&n_heads=32&n_kv_heads=8&hidden_dim=8192&pad_vocab=128256"
          "&rope=llama3&rope_factor=32&rope_theta=500000&tie=true&dtype=bfloat16&max_seq_len=4096",
    # ~60M parameters, float32: the CPU parity check (ckptflow vs transformers + peft tokens/s on CPU)
    "cpu": "seed://llama?dim=512&n_layers=8&n_heads=8&n_kv_heads=8&hidden_dim=1536&pad_vocab=32000"
           "&tie=false&dtype=float32&max_seq_len=1024",
    "tiny": "seed://llama?dim=64&n_layers=2&n_heads=4&n_kv_heads=2&hidden_dim=128&pad_vocab=512"
            "&rope=llama3&rope_factor=32&rope_theta=500000&tie=true&dtype=float32&max_seq_len=512",
}
# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, no sparsity); the longest matching name wins.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "GH200": 989.0,
               "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
               "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "V100": 125.0}
LORA_TUNE = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"]
LORA_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny shape (the tests' smoke run): --shape tiny")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="1b (default), cpu (~60M, float32: throughput parity on a CPU host), tiny")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (tiny: 2)")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (tiny: 32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 3 (tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 10 (tiny: 2)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--knobs", action="store_true", help="also ckptflow with activation checkpointing + loss_chunk")
    p.add_argument("--no-hf", action="store_true", help="skip transformers + peft")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak bf16 TFLOP/s")
    p.add_argument("--dir", default=None, help="where the model and checkpoints go (default: a temp dir)")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    a.shape = a.shape or ("tiny" if a.tiny else "1b")
    a.tiny = a.shape == "tiny"
    batch, seq, warmup, steps = {"tiny": (2, 32, 1, 2), "cpu": (4, 256, 2, 6)}.get(a.shape, (4, 2048, 3, 10))
    a.batch_size = a.batch_size or batch
    a.seq_len = a.seq_len or seq
    a.warmup = a.warmup if a.warmup is not None else warmup
    a.steps = a.steps or steps
    return a


def pick_device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return dev


def peak_tflops(device, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it came from); None on CPU unless overridden."""
    import torch

    if override:
        return override, "--peak-tflops"
    env = os.environ.get("CKPTFLOW_PEAK_TFLOPS")
    if env:
        return float(env), "CKPTFLOW_PEAK_TFLOPS"
    if device.type != "cuda":
        return None, "none on CPU"
    return lookup_peak(torch.cuda.get_device_name(device))


def lookup_peak(name: str) -> tuple[float | None, str]:
    """The PEAK_TFLOPS entry whose key is the longest one found in the device name."""
    hits = [k for k in PEAK_TFLOPS if k.lower() in name.lower()]
    if not hits:
        return None, f"{name!r} not in the table (set CKPTFLOW_PEAK_TFLOPS)"
    key = max(hits, key=len)
    return PEAK_TFLOPS[key], f"{name} ({key} table entry)"


# ---- memory and time ------------------------------------------------------------------------

def reset_peak(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, step, warmup: int, steps: int) -> tuple[float, int]:
    """(seconds, tokens) of `steps` calls of step() after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    t0, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += step()
    sync(device)
    return time.perf_counter() - t0, tokens


# ---- the model --------------------------------------------------------------------------------

def make_model(a, root: str) -> tuple[str, str]:
    """(the HF source directory, the ckptflow base) of the seed model."""
    from ckptflow.stages import convert, download

    src = download.run(SHAPES[a.shape], os.path.join(root, "source"))
    return src.uri, convert.run(src.uri, os.path.join(root, "base")).uri


# ---- ckptflow ---------------------------------------------------------------------------------

def training_data(a, root: str) -> str:
    """The demo corpus (~8k tokens) repeated until an epoch holds several full batches."""
    lines = open(DATA).read().splitlines(keepends=True)
    path = os.path.join(root, "train.jsonl")
    with open(path, "w") as f:
        f.writelines(lines * (1 + 2 * a.batch_size * a.seq_len // 4000))
    return path


def ckptflow_run(a, device, base: str, root: str, method: str, knobs: bool) -> dict:
    from ckptflow import config
    from ckptflow.trainer import Trainer

    train = {"method": method, "steps": 10**6, "batch_size": a.batch_size, "seq_len": a.seq_len, "packed": True,
             "lr": 1e-5, "device": str(device), "precision": "bf16" if device.type == "cuda" else "fp32",
             "max_grad_norm": 1.0, "lora": {"rank": a.rank, "alpha": 2 * a.rank, "targets": LORA_TUNE}}
    if knobs:
        train.update(activation_checkpointing=True, loss_chunk=4096 if not a.tiny else 16)
    cfg = config.validate({"run_id": f"gpu-{method}{'-knobs' if knobs else ''}", "storage": os.path.join(root, "runs"),
                           "model": {"source": base}, "data": {"train": training_data(a, root)}, "train": train,
                           "checkpoint": {"every_steps": None, "keep_last": 1, "async": True}})
    reset_peak(device)
    trainer = Trainer(cfg, base)
    seconds, tokens = timed(device, lambda: trainer.train_step()["tokens"], a.warmup, a.steps)
    trainer.save()
    blocked = trainer.checkpointer.stats[-1]["blocked_s"]
    trainer.checkpointer.close()
    rec = trainer.checkpointer.stats[-1]
    out = {"tokens_per_s": tokens / seconds, "peak_bytes": peak_bytes(device), "save_blocked_s": blocked,
           "save_write_s": rec.get("write_s"), "save_bytes": rec.get("bytes"), "loss": trainer.last_loss,
           "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
    del trainer
    reset_peak(device)
    return out


# ---- transformers + peft ----------------------------------------------------------------------

def hf_run(a, device, src: str, root: str, method: str) -> dict:
    import torch
    import transformers

    lora = method == "lora"
    dtype = torch.bfloat16 if (lora and device.type == "cuda") else torch.float32
    reset_peak(device)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa").to(device)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                                           target_modules=LORA_HF))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    amp = torch.bfloat16 if device.type == "cuda" else None
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    last = {}

    def step() -> int:
        tokens = torch.randint(3, vocab, (a.batch_size, a.seq_len), generator=gen)
        if device.type == "cuda":
            tokens = tokens.pin_memory().to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = float(loss.detach())
        return tokens.numel()

    seconds, tokens = timed(device, step, a.warmup, a.steps)
    out_dir = os.path.join(root, f"hf-{method}")
    t0 = time.perf_counter()
    model.save_pretrained(out_dir)                      # safetensors (adapter only for peft)
    torch.save(opt.state_dict(), os.path.join(out_dir, "optimizer.pt"))
    blocked = time.perf_counter() - t0
    out = {"tokens_per_s": tokens / seconds, "peak_bytes": peak_bytes(device), "save_blocked_s": blocked,
           "save_write_s": blocked, "loss": last["loss"], "trainable": sum(p.numel() for p in params)}
    del model, opt, params
    reset_peak(device)
    return out


# ---- the table --------------------------------------------------------------------------------

def report(a, device, n_params: int, peak: tuple, rows: list[dict]) -> None:
    tflops, where = peak
    if device.type != "cuda" and a.shape == "cpu":
        print("\nCPU parity check: both frameworks on this host's cores, same run; nothing here says how a GPU "
              "would do. Run it on a CUDA machine for the GPU numbers.")
    elif device.type != "cuda":
        print("\nCPU SMOKE TEST ONLY: these figures check that the script runs; they say nothing about a GPU. "
              "Run it on a CUDA machine for the real numbers.")
    print(f"\nmodel: {SHAPES[a.shape]}\n{n_params / 1e6:.1f}M parameters; {a.batch_size} x "
          f"{a.seq_len} tokens per step; {a.warmup} warm-up + {a.steps} timed steps; device {device}"
          f"{' ' + _device_name(device) if device.type == 'cuda' else ''}; peak bf16 {tflops or '-'} TFLOP/s ({where})\n")
    head = f"{'method':8}{'framework':22}{'tokens/s':>10}{'MFU':>8}{'peak mem (GB)':>15}{'save blocked (s)':>18}" \
           f"{'save write (s)':>16}{'loss':>9}"
    print(head)
    for r in rows:
        r["mfu"] = u = mfu(n_params, r["tokens_per_s"], tflops)
        print(f"{r['method']:8}{r['framework']:22}{r['tokens_per_s']:>10.0f}{(f'{u:.1%}' if u is not None else '-'):>8}"
              f"{r['peak_bytes'] / 1e9:>15.2f}{r['save_blocked_s']:>18.3f}{r['save_write_s'] or 0:>16.3f}{r['loss']:>9.3f}")


def train_flops_per_token(n_params: int) -> float:
    """FLOPs of one trained token by the 6N convention: each weight's matmul once forward (2N) and
    twice backward (4N, the input's and the weight's gradients). Attention scores and element-wise
    work are left out, as in the usual MFU (tests/test_bench_gpu.py counts a real step against it)."""
    return 6.0 * n_params


def mfu(n_params: int, tokens_per_s: float, tflops: float | None) -> float | None:
    """Model FLOP/s utilisation: train_flops_per_token * tokens/s over the peak; None without a peak."""
    return train_flops_per_token(n_params) * tokens_per_s / (tflops * 1e12) if tflops else None


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    device = pick_device(a.device)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if not methods or any(m not in ("lora", "full") for m in methods):
        print(f"--methods {a.methods!r}: expected lora, full or both", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ckptflow-gpu-bench-", dir=a.dir) as root:
        t0 = time.perf_counter()
        src, base = make_model(a, root)
        print(f"model ready in {time.perf_counter() - t0:.1f}s", flush=True)
        n_params = _count(base)
        rows = []
        for method in methods:
            runs = [("ckptflow", lambda: ckptflow_run(a, device, base, root, method, False))]
            if a.knobs:
                runs.append(("ckptflow +ac +chunk", lambda: ckptflow_run(a, device, base, root, method, True)))
            if not a.no_hf:
                runs.append(("transformers+peft" if method == "lora" else "transformers",
                             lambda: hf_run(a, device, src, root, method)))
            for name, fn in runs:
                r = {"method": method, "framework": name, **fn()}
                rows.append(r)
                print(f"{method} {name}: {r['tokens_per_s']:.0f} tokens/s", flush=True)
        peak = peak_tflops(device, a.peak_tflops)
        report(a, device, n_params, peak, rows)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"device": str(device), "params": n_params, "peak_tflops": peak[0], "rows": rows,
                       "cpu_smoke_test_only": device.type != "cuda", "torch": torch.__version__}, f, indent=1)
    return 0


def _count(base: str) -> int:
    from ckptflow import manifest
    from ckptflow.model_args import ModelArgs

    return ModelArgs.from_dict(manifest.require(base).model_args).num_params()


if __name__ == "__main__":
    sys.exit(main())
