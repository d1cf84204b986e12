"""DCP step checkpoints (what several training processes write) read back for merge, export
(hf, peft, original, gguf), generate and evaluate, one tensor at a time.

The default tests write the DCP step in this one process, with the trainer's own code:
distributed.DistTrainer (FSDP2, torch.distributed.checkpoint) under a gloo group of one rank, so
key names, manifest and trainer_state.json are the trainer's. tests/test_distributed.py runs the
real two-process job (slow)."""
import contextlib
import os
import shutil

import peft as peft_lib
import pytest
import torch
import transformers

from ckptflow import api, checkpointer, cli, config, generate, lora, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.stages import evaluate, export, merge
from ckptflow.stages import train as stage
from tests import tinyrun

LORA = ["train.method=lora", "train.lora.rank=4", "train.lora.alpha=8",
        "train.lora.targets=[q_proj,v_proj,w1,output]"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tinyrun.seed_base(tmp_path_factory.mktemp("dcp-base"))


def make_cfg(storage_dir, run_id: str, *overrides: str) -> config.RunConfig:
    return tinyrun.full_config(storage_dir, run_id, {"steps": 2, "seq_len": 32, "lr": 1e-2}, {"async": False},
                               *overrides)


@contextlib.contextmanager
def one_rank(tmp_path):
    """A torch.distributed group of one process (gloo), as torchrun would give rank 0."""
    import torch.distributed as dist

    tmp_path.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def dcp_run(tmp_path, base, run_id: str, *overrides: str) -> str:
    """A run whose step 2 is a DCP step written by DistTrainer."""
    from ckptflow.distributed import DistTrainer

    cfg = make_cfg(tmp_path, run_id, *overrides)
    with one_rank(tmp_path):
        m = stage.train_here(cfg, base, trainer_cls=DistTrainer)
    assert (m.format, m.kind, m.step) == ("dcp", "train_state", 2)
    assert {".metadata", "__0_0.distcp", "trainer_state.json"} <= set(m.files)
    return config.run_dir(cfg)


def own_model(base: str, step_uri: str):
    """ckptflow's model at a DCP step, loaded by the trainer's resume path (dcp.load_state of the
    whole state), not by the per-tensor reader under test."""
    model, _ = api.load(base)
    m = manifest.require(step_uri)
    if m.extra.get("lora"):
        lora.apply_lora(model, lora.LoraConfig.from_dict(m.extra["lora"]))
        trainable = lora.lora_state_dict(model)
    else:
        trainable = model.state_dict()
    weights, _ = checkpointer.read_dcp_step(step_uri, trainable, with_optimizer=False)
    res = model.load_state_dict(weights, strict=False)
    assert not res.unexpected_keys and (m.extra.get("lora") or not res.missing_keys)
    return model.eval()


def hf_logits(path, x):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(x).logits


def tokens():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, base):
    return dcp_run(tmp_path_factory.mktemp("dcp-full"), base, "full")


def test_a_full_dcp_step_exports_to_hf_original_and_gguf(tmp_path, base, full_run):
    run = full_run
    step = os.path.join(run, "train", "step-000002")
    hf = str(tmp_path / "hf")
    assert cli.main(["export", run, hf, "--format", "hf"]) == 0
    x = tokens()
    with torch.no_grad():
        want = own_model(base, step)(x)
        before = api.load(base)[0].eval()(x)
    got = hf_logits(hf, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - before).abs().max() > 1e-3                      # the trained weights, not the base
    m = manifest.require(hf)
    assert (m.kind, m.format, m.step) == ("export", "hf", 2)
    assert [s["stage"] for s in m.lineage["stages"]][-2:] == ["train", "export"]
    assert {"tokenizer.json", "config.json"} <= set(os.listdir(hf))   # the base's assets came along

    orig = export.run(step, str(tmp_path / "orig"), format="original")
    assert orig.format == "hf"
    torch.testing.assert_close(hf_logits(str(tmp_path / "orig"), x), got, atol=0, rtol=0)

    g = export.run(run, str(tmp_path / "gguf"), format="gguf", dtype="f32")
    gguf_files = [n for n in g.files if n.endswith(".gguf")]
    assert len(gguf_files) == 1 and g.step == 2
    from gguf import GGUFReader

    reader = GGUFReader(os.path.join(str(tmp_path / "gguf"), gguf_files[0]))
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    trained = checkpointer.read_dcp_step(step, {"tok_embeddings.weight": torch.empty(512, 64)}, False)[0]
    assert torch.equal(torch.from_numpy(emb.data.copy()).reshape(512, 64), trained["tok_embeddings.weight"])

    out = generate.run(run, "hello", max_new_tokens=4, device="cpu")
    assert out["step"] == 2


def test_a_lora_dcp_step_merges_and_exports_peft_that_peft_loads(tmp_path, base):
    run = dcp_run(tmp_path, base, "lora", *LORA)
    step = os.path.join(run, "train", "step-000002")
    x = tokens()
    with torch.no_grad():
        want = own_model(base, step)(x)

    merged = merge.run(step, "-", str(tmp_path / "merged"))
    assert merged.format == "tune" and merged.extra["merged"]["fingerprint"].startswith("lora:")
    export.run(str(tmp_path / "merged"), str(tmp_path / "merged-hf"), format="hf")
    export.run(run, str(tmp_path / "hf"), format="hf")
    got = hf_logits(str(tmp_path / "hf"), x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_logits(str(tmp_path / "merged-hf"), x), got, atol=0, rtol=0)

    export.run(run, str(tmp_path / "peft"), format="peft")
    src = storage.join(os.path.dirname(base), "source")
    pm = peft_lib.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(src),
                                           str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, got, atol=1e-5, rtol=0)
    assert (got - hf_logits(src, x)).abs().max() > 1e-3            # the adapter moved the logits

    res = evaluate.run(run, data=tinyrun.TRAIN, prompts=["hello"], max_new_tokens=2, batch_size=2, seq_len=32,
                       max_batches=1, device="cpu")
    assert res.step == 2 and res.kind


def test_a_dcp_step_missing_a_shard_is_one_clear_error(tmp_path, full_run):
    step = str(tmp_path / "step-000002")
    shutil.copytree(os.path.join(full_run, "train", "step-000002"), step)
    os.remove(os.path.join(step, "__0_0.distcp"))
    with pytest.raises(CkptError, match=r"step-000002/__0_0.distcp: missing"):
        export.run(step, str(tmp_path / "hf"), format="hf")
    assert not os.path.exists(tmp_path / "hf")


def _dcp_state(step_uri: str, trainable: dict) -> dict:
    weights, optim = checkpointer.read_dcp_step(step_uri, trainable, with_optimizer=True)
    return {**{f"model.{k}": v for k, v in weights.items()}, **{f"optimizer.{k}": v for k, v in optim.items()}}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_async_dcp_saves_resume_bit_exactly(tmp_path, base, method, monkeypatch):
    """checkpoint.async: DCP stages the shards and writes them in a thread (collectives on a gloo
    group of their own); stopping at step 2 and resuming gives step 4 bit for bit."""
    from ckptflow.distributed import DistTrainer
    from ckptflow.formats import dcp

    calls = []
    real = dcp.save_state_async
    monkeypatch.setattr(dcp, "save_state_async", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))

    over = ["train.steps=4", "checkpoint.async=true", *(LORA if method == "lora" else [])]
    whole = make_cfg(tmp_path, "whole", *over)
    with one_rank(tmp_path / "a"):
        m4 = stage.train_here(whole, base, trainer_cls=DistTrainer)
    assert (m4.format, m4.step) == ("dcp", 4) and manifest.verify(m4.uri) == []
    assert [os.path.basename(u) for u in calls] == ["step-000002", "step-000004"]
    assert manifest.verify(os.path.join(config.run_dir(whole), "train", "step-000002")) == []

    parts = make_cfg(tmp_path, "parts", *over)
    with one_rank(tmp_path / "b"):
        assert stage.train_here(parts, base, stop_after=2, trainer_cls=DistTrainer).step == 2
    with one_rank(tmp_path / "c"):
        r4 = stage.train_here(parts, base, trainer_cls=DistTrainer)
    assert r4.step == 4

    model, _ = api.load(base)
    if method == "lora":
        lora.apply_lora(model, lora.LoraConfig.from_dict(m4.extra["lora"]))
        trainable = lora.lora_state_dict(model)
    else:
        trainable = model.state_dict()
    a, b = _dcp_state(m4.uri, trainable), _dcp_state(r4.uri, trainable)
    assert a.keys() == b.keys() and len(a) > 3 * len(trainable) - 1
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = storage.read_json(storage.join(m4.uri, "trainer_state.json"))
    sb = storage.read_json(storage.join(r4.uri, "trainer_state.json"))
    assert sa == sb


@pytest.fixture
def s3(s3_server, s3_bucket):
    storage.set_options(s3_bucket, s3_server.storage_options)
    yield s3_bucket
    storage.set_options(s3_bucket, None)


def test_dcp_steps_go_straight_to_s3_and_commit_last(tmp_path, base, s3, full_run, monkeypatch):
    """Every rank's shards and .metadata are uploaded through ckptflow.storage (no local copy),
    hashed as written, and ckptflow.json is the last object of the step; the step reads back
    (export) and equals the same run saved locally, bit for bit."""
    from ckptflow.distributed import DistTrainer

    writes = []
    real_writer, real_put = storage.HashingWriter.__init__, storage.put_atomic

    def hashing_writer(self, uri, **kw):
        writes.append(uri)
        real_writer(self, uri, **kw)

    def put_atomic(uri, data, **kw):
        writes.append(uri)
        return real_put(uri, data, **kw)
    monkeypatch.setattr(storage.HashingWriter, "__init__", hashing_writer)
    monkeypatch.setattr(storage, "put_atomic", put_atomic)

    cfg = make_cfg(f"{s3}/runs", "full", "checkpoint.async=true")
    with one_rank(tmp_path / "rank"):
        m = stage.train_here(cfg, base, trainer_cls=DistTrainer)
    step = f"{s3}/runs/full/train/step-000002"
    assert (m.uri, m.format) == (step, "dcp")
    assert manifest.verify(step) == []                               # sizes and sha256 of every object
    assert {".metadata", "__0_0.distcp", "trainer_state.json"} <= set(m.files)
    mine = [u[len(step) + 1:] for u in writes if u.startswith(step + "/")]
    assert {"__0_0.distcp", ".metadata"} <= set(mine) and mine[-1] == "ckptflow.json"
    assert not any(os.path.exists(os.path.join(tmp_path, n)) for n in ("runs", "full"))

    local = os.path.join(full_run, "train", "step-000002")
    model, _ = api.load(base)
    a, b = _dcp_state(step, model.state_dict()), _dcp_state(local, model.state_dict())
    for k in a:
        assert torch.equal(a[k], b[k]), k
    export.run(f"{s3}/runs/full", str(tmp_path / "hf"), format="hf")
    x = tokens()
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf"), x), own_model(base, local)(x).detach(), atol=1e-5, rtol=0)
