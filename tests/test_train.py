import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from ckptflow import api, config, manifest, storage
from ckptflow.checkpointer import read_tensors
from ckptflow.cli import main
from ckptflow.errors import CkptError
from ckptflow.stages import convert, download
from ckptflow.stages import train as stage
from ckptflow.trainer import Schedule, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = "seed://llama?dim=64&n_layers=2"
DEMO = os.path.join(ROOT, "deployments", "data", "demo.jsonl")
DEMO_EVAL = os.path.join(ROOT, "deployments", "data", "demo-eval.jsonl")
STATE_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    download.run(SEED, str(d / "source"))
    return convert.run(str(d / "source"), str(d / "base")).uri


def make_cfg(storage_dir, run_id: str, *overrides: str) -> config.RunConfig:
    d = {"run_id": run_id, "storage": str(storage_dir), "model": {"source": SEED},
         "data": {"train": DEMO, "eval": DEMO_EVAL, "eval_batches": 2},
         "train": {"method": "lora", "steps": 12, "batch_size": 4, "seq_len": 48, "lr": 1e-2, "warmup_steps": 2,
                   "threads": 1, "deterministic": True,
                   "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj", "w2", "output"]}},
         "checkpoint": {"every_steps": 3, "keep_last": 2}}
    for o in overrides:
        config.apply_override(d, o)
    return config.validate(d)


def final_hashes(m) -> dict:
    return {name: m.files[name]["sha256"] for name in STATE_FILES}


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """Uninterrupted 12-step runs, full and LoRA, with the metrics rows the callback saw."""
    out = {}
    for method in ("full", "lora"):
        rows = []
        cfg = make_cfg(tmp_path_factory.mktemp(method), "ref", f"train.method={method}")
        m = stage.run(cfg, base, on_metrics=rows.append)
        out[method] = (cfg, m, rows)
    return out


# ---- the schedule ---------------------------------------------------------------------------

def test_schedule_warmup_cosine_and_restart():
    s = Schedule(1.0, warmup=4, total=14, min_ratio=0.1)
    assert [s.lr_at(i) for i in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert s.lr_at(9) == pytest.approx(0.1 + 0.9 * 0.5)      # half way through the decay
    assert s.lr_at(14) == pytest.approx(0.1)
    s.offset = 10                                           # exclude_from_loading: lr_scheduler
    assert s.lr_at(11) == 0.25 and s.lr_at(14) == 1.0


# ---- step checkpoints ---------------------------------------------------------------------

def test_lora_step_holds_only_the_adapter(reference):
    cfg, m, _ = reference["lora"]
    assert m.kind == "train_state" and m.format == "tune" and m.step == 12
    assert set(STATE_FILES) <= set(m.files)
    assert m.extra["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.1,
                               "targets": ["q_proj", "v_proj", "w2", "output"], "use_rslora": False}
    assert m.extra["base"] == m.inputs["base"]["uri"] and m.extra["run"] == config.run_dir(cfg)
    sd = read_tensors(m.uri, "model.safetensors")
    assert "layers.0.attn.q_proj.lora_a.weight" in sd and "output.lora_b.weight" in sd
    assert all(".lora_a." in k or ".lora_b." in k for k in sd)
    assert list(sd["layers.1.mlp.w2.lora_a.weight"].shape) == [4, 176]
    opt = read_tensors(m.uri, "optimizer.safetensors")
    assert set(opt) == {f"{k}.{f}" for k in sd for f in ("step", "exp_avg", "exp_avg_sq")}
    state = json.loads(storage.read_text(storage.join(m.uri, "trainer_state.json")))
    assert state["step"] == 12 and state["data"]["index"] > 0 and state["rng"] == {}
    steps = sorted(os.listdir(storage.parent(m.uri)))
    assert steps == ["metrics.jsonl", "step-000009", "step-000012"]          # keep_last 2


def test_full_step_is_a_readable_tune_checkpoint(reference, base):
    _, m, _ = reference["full"]
    model, view = api.load(m.uri)
    base_sd, _ = api.load_state_dict(base)
    sd = model.state_dict()
    assert set(sd) == set(base_sd)
    assert not torch.equal(sd["layers.0.attn.q_proj.weight"], base_sd["layers.0.attn.q_proj.weight"])
    assert m.extra["lora"] is None and m.params["method"] == "full"


def test_metrics_rows_reach_the_callback_and_the_file(reference):
    cfg, m, rows = reference["lora"]
    assert [r["step"] for r in rows] == list(range(0, 13))
    assert rows[0]["eval_loss"] > 0 and rows[0]["loss"] is None
    assert rows[3]["checkpoint"].endswith("step-000003") and rows[4]["checkpoint"] is None
    assert rows[12]["eval_loss"] is not None and rows[12]["tokens_per_s"] > 0 and rows[12]["lr"] > 0
    on_disk = read_metrics(storage.join(config.run_dir(cfg), "train"))
    assert [r["step"] for r in on_disk] == list(range(0, 13)) and on_disk[5]["loss"] == rows[5]["loss"]


# ---- bit-exact resume after SIGKILL -----------------------------------------------------------

CHILD = r"""
import json, os, signal, sys
from ckptflow import checkpointer, config
from ckptflow.stages import train

cfg = config.validate(json.loads(sys.argv[1]))
base, mode, at = sys.argv[2], sys.argv[3], int(sys.argv[4])
on_metrics = None
if mode == "step":        # killed right after step `at`, whatever is in flight
    on_metrics = lambda row: os.kill(os.getpid(), signal.SIGKILL) if row["step"] == at else None
else:                     # killed half way through writing the checkpoint of step `at`
    real = checkpointer.write_tensors

    def dying(out, name, tensors, **kw):
        if out.uri.endswith(checkpointer.step_name(at)) and name == "optimizer.safetensors":
            with out.open(name) as f:
                f.write(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
        return real(out, name, tensors, **kw)

    checkpointer.write_tensors = dying
train.run(cfg, base, on_metrics=on_metrics)
sys.exit(3)
"""


def test_other_threads_drawing_from_pythons_random_do_not_change_the_checkpoint(reference, base, tmp_path):
    """Prefect's services and retries draw from Python's global `random` in other threads at moments
    no resume can reproduce; a checkpoint that recorded that state differed between a killed-and-resumed
    run and an uninterrupted one (seen in the full suite). Training draws nothing from it."""
    import threading

    _, ref, _ = reference["full"]
    stop = threading.Event()

    def draw():
        while not stop.is_set():
            random.random()
            stop.wait(0.001)

    t = threading.Thread(target=draw, daemon=True)
    t.start()
    try:
        m = stage.run(make_cfg(tmp_path, "noisy", "train.method=full"), base)
    finally:
        stop.set()
        t.join()
    assert final_hashes(m) == final_hashes(ref)


@pytest.mark.parametrize("method,mode,sync", [("full", "step", False), ("full", "save", False),
                                              ("lora", "step", True), ("lora", "save", False)])
def test_killed_and_resumed_run_is_bit_identical(reference, base, tmp_path, method, mode, sync):
    _, ref, _ = reference[method]
    pick = random.Random()
    at = pick.randint(1, 11) if mode == "step" else pick.choice([3, 6, 9, 12])
    cfg = make_cfg(tmp_path, "crashy", f"train.method={method}", f"checkpoint.async={str(not sync).lower()}")
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config.to_dict(cfg)), base, mode, str(at)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, f"killed at {mode} {at}: rc={child.returncode}\n{child.stderr[-2000:]}"
    resumed = stage.run(cfg, base)
    assert resumed.step == 12
    assert final_hashes(resumed) == final_hashes(ref), f"{method}: killed at {mode} {at} then resumed"


@pytest.mark.parametrize("family", ["gemma3_text"] + [pytest.param(f, marks=pytest.mark.slow) for f in
                                                     ("qwen3", "gemma", "gemma2", "smollm3", "olmo2")])
def test_newer_family_full_finetune_killed_and_resumed_is_bit_identical(tmp_path, family):
    """A light version of the test above for the newer families' features (q/k norms, offset and post
    norms, embedding scale, GeGLU, per-layer RoPE): full fine-tuning, killed after step 3 of 6."""
    seed = f"seed://{family}?dim=64&n_layers=2"
    download.run(seed, str(tmp_path / "source"))
    fam_base = convert.run(str(tmp_path / "source"), str(tmp_path / "base")).uri
    over = ("train.method=full", "train.steps=6", "checkpoint.every_steps=2", f"model.source={seed}")
    ref = stage.run(make_cfg(tmp_path / "ref", "ref", *over), fam_base)
    cfg = make_cfg(tmp_path / "crash", "crashy", *over)
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config.to_dict(cfg)), fam_base, "step", "3"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr[-2000:]
    resumed = stage.run(cfg, fam_base)
    assert resumed.step == 6 and final_hashes(resumed) == final_hashes(ref)


# ---- what resume accepts and refuses ----------------------------------------------------

def test_resume_refuses_changes_that_break_it_and_allows_the_others(base, tmp_path):
    cfg = make_cfg(tmp_path, "r", "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=null")
    assert stage.run(cfg, base).step == 4
    with pytest.raises(CkptError, match=r"train.batch_size changed from 4 to 2 \(allowed with checkpoint"):
        stage.run(make_cfg(tmp_path, "r", "train.steps=6", "train.batch_size=2"), base)
    with pytest.raises(CkptError, match="train.method changed from 'lora' to 'full'"):
        stage.run(make_cfg(tmp_path, "r", "train.steps=6", "train.method=full"), base)
    with pytest.raises(CkptError, match="train.lora.rank changed"):
        stage.run(make_cfg(tmp_path, "r", "train.steps=6", "train.lora.rank=2"), base)
    with pytest.raises(CkptError, match=r"no committed checkpoint for step 3 \(committed steps: \[2, 4\]\)"):
        stage.run(make_cfg(tmp_path, "r", "train.steps=6", "checkpoint.load_step=3"), base)
    # fresh data position on purpose: allowed, and training goes on from step 4
    m = stage.run(make_cfg(tmp_path, "r", "train.steps=6", "train.batch_size=2",
                           "checkpoint.exclude_from_loading=[data,lr_scheduler]"), base)
    assert m.step == 6
    state = json.loads(storage.read_text(storage.join(m.uri, "trainer_state.json")))
    assert state["lr_scheduler"]["offset"] == 4 and state["data"]["epoch"] == 0 and state["data"]["index"] == 4
    # more steps, another interval: allowed; an explicit older step restarts from there
    assert stage.run(make_cfg(tmp_path, "r", "train.steps=8", "train.batch_size=2", "checkpoint.every_steps=4",
                              "checkpoint.load_step=6"), base).step == 8
    assert stage.run(make_cfg(tmp_path, "r", "train.steps=8", "train.batch_size=2"), base).step == 8  # nothing left


def test_grad_accumulation_equals_one_big_batch(base, tmp_path):
    big = make_cfg(tmp_path, "big", "train.method=full", "train.steps=2", "train.batch_size=8", "train.lr=1e-3")
    acc = make_cfg(tmp_path, "acc", "train.method=full", "train.steps=2", "train.batch_size=4",
                   "train.grad_accum=2", "train.lr=1e-3")
    a = read_tensors(stage.run(big, base).uri, "model.safetensors")
    b = read_tensors(stage.run(acc, base).uri, "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)   # float32 summation order only


# ---- yielding a thread to the checkpoint writer ---------------------------------------------

WIDE = "seed://llama?dim=256&n_layers=2&n_heads=4&n_kv_heads=4&vocab_size=512"


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
    """A model wide enough that torch splits its ops across threads (the dim-64 one mostly does not)."""
    d = tmp_path_factory.mktemp("wide")
    download.run(WIDE, str(d / "source"))
    return convert.run(str(d / "source"), str(d / "base")).uri


def _steps_at(cfg, base, threads: list[int]) -> dict:
    from ckptflow.trainer import Trainer, process_settings

    with process_settings(cfg.train):
        tr = Trainer(cfg, base)
        losses = []
        for n in threads:
            torch.set_num_threads(n)
            losses.append(tr.train_step()["loss"])
        return {"loss": losses, **tr.trainable_state(), **tr.optimizer_state()}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_training_step_does_not_depend_on_the_thread_count(wide_base, tmp_path, method):
    """What makes checkpoint.yield_threads safe: training runs one torch thread fewer while an async
    save is written, at steps that depend on timing, so resume is bit-identical only because the
    step's results do not change with the thread count. The probe shows that the thread count does
    change a plain whole-tensor sum here, so the comparison is not vacuous."""
    probes = [torch.randn(100_000, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    own, sums = torch.get_num_threads(), []
    for n in (2, 1):
        torch.set_num_threads(n)
        sums.append(torch.stack([p.sum() for p in probes]))
    cfg = make_cfg(tmp_path, method, f"train.method={method}", "train.batch_size=4", "train.seq_len=64",
                   "train.deterministic=false", "data.eval=null")
    try:
        assert not torch.equal(*sums), "torch's sums did not change with the thread count: nothing is tested"
        ref = _steps_at(cfg, wide_base, [2, 2, 2])
        got = _steps_at(cfg, wide_base, [1, 2, 1])
    finally:
        torch.set_num_threads(own)
    assert got["loss"] == ref["loss"]
    assert [k for k in ref if k != "loss" and not torch.equal(ref[k], got[k])] == []


def test_training_yields_a_thread_while_an_async_save_is_written(base, tmp_path, monkeypatch):
    import threading

    from ckptflow import checkpointer
    from ckptflow.trainer import Trainer, process_settings

    release = threading.Event()
    real = checkpointer.write_tensors

    def held(out, name, tensors, **kw):
        release.wait(10)
        return real(out, name, tensors, **kw)

    monkeypatch.setattr(checkpointer, "write_tensors", held)
    own = torch.get_num_threads()
    for yielding, during in (("true", 1), ("false", 2)):
        release.clear()
        cfg = make_cfg(tmp_path, f"yield-{yielding}", "train.method=full", "train.threads=2",
                       f"checkpoint.yield_threads={yielding}")
        with process_settings(cfg.train):
            tr = Trainer(cfg, base)
            tr.train_step()
            tr.save()
            tr.train_step()
            assert tr.checkpointer.busy() and torch.get_num_threads() == during   # that step ran on `during`
            release.set()
            tr.checkpointer.wait()
            tr.train_step()
            assert torch.get_num_threads() == 2                                   # back once the write ended
            tr.checkpointer.close()
    assert torch.get_num_threads() == own      # process_settings put the test's own count back


# ---- it learns ----------------------------------------------------------------------------

def test_lora_lowers_held_out_loss_on_the_shipped_corpus(base, tmp_path):
    cfg = make_cfg(tmp_path, "learn", "train.steps=30", "train.batch_size=8", "train.lora.dropout=0.0",
                   "checkpoint.every_steps=30", "data.eval_batches=8")
    rows = []
    stage.run(cfg, base, on_metrics=rows.append)
    before, after = rows[0]["eval_loss"], rows[-1]["eval_loss"]
    assert before == pytest.approx(math.log(512), abs=0.1)     # a random seed model knows nothing
    assert after < before - 1.5, (before, after)               # measured: 6.22 -> about 3.9


# ---- the command line ---------------------------------------------------------------------

def test_cli_train_prepares_the_base_and_resumes(tmp_path, capsys):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(f"run_id: cli\nstorage: {tmp_path}/runs\nmodel: {{source: '{SEED}'}}\n"
                        f"data: {{train: {DEMO}}}\ntrain: {{steps: 3, batch_size: 4, seq_len: 32}}\n"
                        "checkpoint: {every_steps: 2}\n")
    assert main(["train", str(cfg_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 3 and out["kind"] == "train_state"
    assert manifest.read(str(tmp_path / "runs" / "cli" / "base")).format == "tune"
    assert main(["train", str(cfg_path), "train.steps=4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    assert main(["train", str(cfg_path), "train.seq_len=16"]) == 2
    assert "train.seq_len changed" in capsys.readouterr().err


# ---- knowledge distillation -----------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Another seed model, left in HF format: a teacher may come in any readable format."""
    d = tmp_path_factory.mktemp("teacher")
    return download.run(SEED + "&seed=1", str(d / "hf")).uri


def test_distillation_pulls_the_student_to_the_teacher_and_resumes_exactly(base, teacher, tmp_path):
    kd = ("train.method=full", f"train.distill.teacher={teacher}", "train.distill.alpha=1.0", "train.lr=3e-3",
          "checkpoint.every_steps=4")
    rows = []
    straight = stage.run(make_cfg(tmp_path, "kd", "train.steps=8", *kd), base, on_metrics=rows.append)
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    assert losses[-1] < 0.5 * losses[0], losses              # pure KD loss: T^2 KL(teacher || student)
    assert straight.extra["teacher"] == teacher
    assert set(read_tensors(straight.uri, "model.safetensors")) == set(api.load_state_dict(base)[0])  # student only
    # stop at 4, then go on: the teacher is reloaded from its source and the result is the same bytes
    stage.run(make_cfg(tmp_path, "kd2", "train.steps=8", *kd), base, stop_after=4)
    resumed = stage.run(make_cfg(tmp_path, "kd2", "train.steps=8", *kd), base)
    assert final_hashes(resumed) == final_hashes(straight)


def test_a_teacher_with_another_vocabulary_is_refused(base, tmp_path):
    other = download.run("seed://llama?dim=64&n_layers=2&vocab_size=300", str(tmp_path / "t")).uri
    with pytest.raises(CkptError, match="vocabulary of .* tokens, the student has 512"):
        stage.run(make_cfg(tmp_path, "bad", f"train.distill.teacher={other}"), base)


# ---- the fused and mixture-of-experts families: full fine-tuning resumes bit-exactly ----------

FAMILY_SEEDS = {"mixtral": "seed://mixtral?dim=64&n_layers=2&n_experts=4&n_active_experts=2",
                "phi3": "seed://phi3?dim=64&n_layers=2",
                "qwen3_moe": "seed://qwen3_moe?dim=64&n_layers=2&n_experts=4&n_active_experts=2"}


@pytest.mark.parametrize("family", [
    "mixtral", pytest.param("phi3", marks=pytest.mark.slow), pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_new_family_full_finetune_resumes_bit_exactly(tmp_path, family):
    src = download.run(FAMILY_SEEDS[family], str(tmp_path / "source")).uri
    fbase = convert.run(src, str(tmp_path / "base")).uri
    over = ("train.method=full", "train.steps=6", "train.batch_size=2", "train.seq_len=32",
            "checkpoint.every_steps=2", "data.eval=null", f"model.source={FAMILY_SEEDS[family]}")
    ref = stage.run(make_cfg(tmp_path / "ref", "ref", *over), fbase)
    rows = read_metrics(os.path.join(str(tmp_path / "ref"), "ref", "train"))
    if family != "phi3":   # MoE: the router's load-balancing loss is part of the training loss, logged
        assert all(r["aux_loss"] > 0 for r in rows if r["step"])
    at = random.Random().randint(1, 5)
    cfg = make_cfg(tmp_path / "crash", "crashy", *over, "checkpoint.async=false")
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config.to_dict(cfg)), fbase, "step", str(at)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, f"killed at step {at}: rc={child.returncode}\n{child.stderr[-2000:]}"
    resumed = stage.run(cfg, fbase)
    assert resumed.step == 6 and final_hashes(resumed) == final_hashes(ref), f"{family}: killed at {at}"
