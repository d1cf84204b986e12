"""Several processes on CPU (gloo): FSDP2 training, DCP step checkpoints, resharded resume."""
import json
import os

import pytest
import torch

from ckptflow import config, manifest, storage
from ckptflow.checkpointer import read_dcp_step, read_tensors
from ckptflow.stages import export
from ckptflow.stages import train as stage
from tests import tinyrun


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tinyrun.seed_base(tmp_path_factory.mktemp("base"))


def make_cfg(storage_dir, run_id: str, *overrides: str) -> config.RunConfig:
    return tinyrun.full_config(storage_dir, run_id, {"steps": 4, "seq_len": 48, "lr": 1e-3}, {}, *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_save_dcp_and_one_process_resumes(base, tmp_path, method):
    two = make_cfg(tmp_path, "dist", f"train.method={method}", "train.nproc_per_node=2")
    rows = []
    m = stage.run(two, base, on_metrics=rows.append)
    assert m.format == "dcp" and m.step == 4 and m.extra["world_size"] == 2
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.json"} <= set(m.files)
    assert manifest.verify(m.uri) == []
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    # The same global batch (2 x 2 rows) in one process trains to the same weights.
    one = stage.run(make_cfg(tmp_path, "single", f"train.method={method}", "train.batch_size=4"), base)
    single = read_tensors(one.uri, "model.safetensors")
    sharded, optim = read_dcp_step(m.uri, single, with_optimizer=True)
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], atol=1e-5, rtol=1e-4)

    # The two-process step exports (every rank's shards read one tensor at a time) to HF that
    # transformers loads with the one-process step's logits; a LoRA step's PEFT export loads in peft.
    _exports_match(tmp_path, base, m, one, method)

    # One process resumes the two-process run from its DCP step and goes on.
    m6 = stage.run(make_cfg(tmp_path, "dist", f"train.method={method}", "train.steps=6"), base)
    assert m6.step == 6 and m6.format == "tune"
    steps = {k: float(v) for k, v in read_tensors(m6.uri, "optimizer.safetensors").items() if k.endswith(".step")}
    assert steps and set(steps.values()) == {6.0}          # AdamW's count went on from the DCP state: 4 + 2
    state = json.loads(storage.read_text(storage.join(m6.uri, "trainer_state.json")))
    saved = json.loads(storage.read_text(storage.join(m.uri, "trainer_state.json")))
    assert state["data"]["index"] == saved["data"]["index"] + 2 * 2


def _exports_match(tmp_path, base, two, one, method):
    import peft
    import transformers

    x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))

    def logits(model):
        with torch.no_grad():
            return model.eval()(x).logits

    export.run(two.uri, str(tmp_path / "two-hf"), format="hf")
    export.run(one.uri, str(tmp_path / "one-hf"), format="hf")
    got = logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "two-hf")))
    want = logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "one-hf")))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    if method == "lora":
        export.run(two.uri, str(tmp_path / "two-peft"), format="peft")
        src = os.path.join(os.path.dirname(base), "source")
        pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(src),
                                            str(tmp_path / "two-peft"))
        torch.testing.assert_close(logits(pm), got, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_process_async_saves_resume_bit_exactly(base, tmp_path):
    """checkpoint.async (the default): stopped at step 2 and resumed, 2 processes reach the same
    step 4 as without the stop, bit for bit (weights, AdamW state, trainer state)."""
    whole = stage.run(make_cfg(tmp_path, "whole", "train.nproc_per_node=2", "checkpoint.async=true"), base)
    parts = make_cfg(tmp_path, "parts", "train.nproc_per_node=2", "checkpoint.async=true")
    assert stage.run(parts, base, stop_after=2).step == 2
    again = stage.run(parts, base)
    assert (whole.step, again.step) == (4, 4)
    single = read_tensors(stage.run(make_cfg(tmp_path, "ref", "train.steps=1"), base).uri, "model.safetensors")
    tinyrun.assert_same_dcp_steps(whole.uri, again.uri, single)
    sa, sb = (json.loads(storage.read_text(storage.join(m.uri, "trainer_state.json"))) for m in (whole, again))
    assert sa == sb
