"""The dense families' parity table, measured against transformers and peft (CPU, float32 unless said).

    PYTHONPATH=. .venv/bin/python -m bench.families [FAMILY ...]

Per family (tiny models that transformers builds here, every feature switched on: tests/hfmodels.DENSE and
FAMILY_KW; phi3, mixtral and qwen3_moe read 17 tokens, past their window (6) and LongRoPE's original 8):
  round trip  HF -> tune -> HF gives byte-identical files, float32 whole and bfloat16 in 40 KB shards
  logits      max |ckptflow.load(hf dir) - transformers| over a [2, 12] input (window 5 < 12)
  merge       max |ckptflow merge of a peft-made adapter - peft merge_and_unload| over every tensor
  peft load   max |PeftModel.from_pretrained(original base, ckptflow's peft export) - transformers on
              ckptflow's merged HF export| logits, for a LoRA step on q/k/v/o and down_proj (phi3: exported
              as fused qkv_proj; mixtral, qwen3_moe: attention only)
  resume      full fine-tune killed (SIGKILL) after step 3 of 6 and resumed: final state sha256 equal
Prints a Markdown table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "output_proj", "w2"]}


def same_files(a: str, b: str) -> bool:
    names = sorted(f for f in os.listdir(a) if f != "ckptflow.json")
    if names != sorted(f for f in os.listdir(b) if f != "ckptflow.json"):
        return False
    return all(open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read() for f in names)


def round_trip(family: str, tmp: str) -> bool:
    from ckptflow.stages import convert
    from tests import hfmodels

    ok = True
    for name, shard, dtype in (("f32", None, torch.float32), ("bf16", "40KB", torch.bfloat16)):
        src = hfmodels.save(family, os.path.join(tmp, f"rt-{name}"), shard=shard, dtype=dtype)
        convert.run(src, os.path.join(tmp, f"rt-{name}-tune"))
        convert.run(os.path.join(tmp, f"rt-{name}-tune"), os.path.join(tmp, f"rt-{name}-back"), to="hf")
        ok &= same_files(src, os.path.join(tmp, f"rt-{name}-back"))
    return ok


LENGTH = {"phi3": 17, "mixtral": 17, "qwen3_moe": 17}
# peft's own target names where the family differs: Phi-3's fused modules, attention only for MoE.
PEFT_VARIANTS = {
    "phi3": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                 rank_pattern={"model.layers.1.self_attn.qkv_proj": 2}, alpha_pattern={"down_proj": 3}),
    "mixtral": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                    rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3}),
    "qwen3_moe": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3}),
}


def tokens(family: str = ""):
    return torch.randint(0, 256, (2, LENGTH.get(family, 12)), generator=torch.Generator().manual_seed(1))


def saved(model, path: str) -> dict:
    """What save_pretrained writes (transformers 5 groups MoE experts in memory, per expert on disk)."""
    from safetensors.torch import load_file

    model.save_pretrained(path)
    return load_file(os.path.join(path, "model.safetensors"))


def logit_diff(family: str, tmp: str) -> float:
    import ckptflow
    from tests import hfmodels

    hf = hfmodels.model(family).eval()
    hf.save_pretrained(os.path.join(tmp, "lg"))
    model, _ = ckptflow.load(os.path.join(tmp, "lg"))
    with torch.no_grad():
        return float((model(tokens(family)) - hf(tokens(family)).logits).abs().max())


def merge_diff(family: str, tmp: str) -> float:
    from ckptflow import api, families
    from ckptflow.families import _fused
    from ckptflow.stages import merge
    from tests import hfmodels
    from tests.test_peft import VARIANTS, peft_adapter

    base = hfmodels.save(family, os.path.join(tmp, "mg-base"))
    pm = peft_adapter(base, os.path.join(tmp, "mg-ad"), **PEFT_VARIANTS.get(family, VARIANTS["patterns"]))
    want = saved(pm.merge_and_unload(), os.path.join(tmp, "mg-want"))
    merge.run(os.path.join(tmp, "mg-ad"), base, os.path.join(tmp, "mg-merged"))
    got = api.load_state_dict(os.path.join(tmp, "mg-merged"))[0]
    ref = _fused.hf_state_dict_to_tune(want, families.get(family), api.load_state_dict(base)[1].args)
    assert got.keys() == ref.keys()
    return max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)


def peft_load_diff(family: str, tmp: str) -> float:
    import peft
    import transformers

    from ckptflow.stages import export
    from tests.test_peft import lora_step, make_run

    run = make_run(os.path.join(tmp, "pl"), family)
    step = lora_step(run, 5, LORA)
    export.run(step.uri, os.path.join(tmp, "pl-peft"), format="peft")
    export.run(step.uri, os.path.join(tmp, "pl-hf"), format="hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(run, "source"))
    pm = peft.PeftModel.from_pretrained(base, os.path.join(tmp, "pl-peft")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "pl-hf")).eval()
    with torch.no_grad():
        return float((pm(tokens(family)).logits - merged(tokens(family)).logits).abs().max())


def resume_exact(family: str, tmp: str) -> bool:
    from ckptflow import config
    from ckptflow.stages import convert, download
    from ckptflow.stages import train as stage
    from tests.test_train import CHILD, final_hashes, make_cfg

    seed = f"seed://{family}?dim=64&n_layers=2"
    download.run(seed, os.path.join(tmp, "rs-source"))
    base = convert.run(os.path.join(tmp, "rs-source"), os.path.join(tmp, "rs-base")).uri
    over = ("train.method=full", "train.steps=6", "checkpoint.every_steps=2", f"model.source={seed}")
    ref = stage.run(make_cfg(os.path.join(tmp, "rs-ref"), "ref", *over), base)
    cfg = make_cfg(os.path.join(tmp, "rs-crash"), "crashy", *over)
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config.to_dict(cfg)), base, "step", "3"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr[-2000:]
    return final_hashes(stage.run(cfg, base)) == final_hashes(ref)


def main(names: list[str]) -> None:
    from tests import hfmodels

    print("| family | round trip exact | max logit diff | merge diff vs peft | peft load (logit diff) | resume exact |")
    print("|---|---|---|---|---|---|")
    for family in names or [*hfmodels.DENSE, *hfmodels.FAMILY_KW]:
        with tempfile.TemporaryDirectory() as tmp:
            row = (round_trip(family, tmp), logit_diff(family, tmp), merge_diff(family, tmp),
                   peft_load_diff(family, tmp), resume_exact(family, tmp))
        print(f"| {family} | {row[0]} | {row[1]:.1e} | {row[2]:.1e} | {row[3]:.1e} | {row[4]} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
