"""A tiny LoRA run for tests that need a trained step: seed model, the demo corpus, a few steps.

Loaded as a pytest plugin (tests/conftest.py), so `tiny_lora_run` is trained once per session.
Tests may add directories to the run (eval/, ...) but must leave its base and steps alone.
"""
from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "deployments", "data", "demo.jsonl")
EVAL = os.path.join(ROOT, "deployments", "data", "demo-eval.jsonl")
SEED = "seed://llama?dim=64&n_layers=2"


# A whole `ckptflow run` (every stage) of the seed model as YAML, for the flow tests.
FLOW_YAML = """\
run_id: {run_id}
storage: {storage}
model:
  source: %s
data:
  train: %s
  eval: %s
  eval_batches: 2
train:
  method: lora
  steps: {steps}
  batch_size: 4
  seq_len: 32
  lr: 1.0e-2
  lora: {{rank: 4, alpha: 8, targets: [q_proj, v_proj, output]}}
checkpoint:
  every_steps: 2
  keep_last: null
eval:
  prompts: ["Q: Where does the camel live?\\nA:"]
  max_new_tokens: 4
""" % (SEED, TRAIN, EVAL)


def flow_yaml(path, run_id: str, storage, steps: int) -> None:
    """Write FLOW_YAML for `run_id` at `path`."""
    with open(path, "w") as f:
        f.write(FLOW_YAML.format(run_id=run_id, storage=storage, steps=steps))


def seed_base(d) -> str:
    """Download and convert the seed model under directory `d`; returns the base's uri."""
    from ckptflow.stages import convert, download

    download.run(SEED, os.path.join(d, "source"))
    return convert.run(os.path.join(d, "source"), os.path.join(d, "base")).uri


def full_config(storage_dir, run_id: str, train: dict, checkpoint: dict, *overrides: str):
    """A full-training config of the seed model on the demo corpus on one CPU thread: `train` and
    `checkpoint` are the test's own settings, then `overrides` (key=value) apply."""
    from ckptflow import config

    d = {"run_id": run_id, "storage": str(storage_dir), "model": {"source": SEED}, "data": {"train": TRAIN},
         "train": {"method": "full", "batch_size": 2, "threads": 1, "device": "cpu", **train},
         "checkpoint": {"every_steps": 2, "keep_last": None, **checkpoint}}
    for o in overrides:
        config.apply_override(d, o)
    return config.validate(d)


def lora_config(storage: str, run_id: str = "run", steps: int = 12):
    from ckptflow import config

    return config.validate({
        "run_id": run_id, "storage": storage, "model": {"source": SEED},
        "data": {"train": TRAIN, "eval": EVAL, "eval_batches": 1},
        "train": {"method": "lora", "steps": steps, "batch_size": 8, "lr": 1e-2, "seq_len": 64, "seed": 0,
                  "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj", "output"]}},
        "checkpoint": {"every_steps": steps, "async": False},
    })


def lora_run(storage: str, run_id: str = "run", steps: int = 12) -> str:
    """Train `steps` LoRA steps; returns the run directory ({storage}/{run_id})."""
    from ckptflow import config
    from ckptflow.stages import train

    cfg = lora_config(storage, run_id, steps)
    train.run(cfg)
    return config.run_dir(cfg)


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory) -> str:
    """A run directory with base/ and one LoRA step checkpoint, train/step-000012."""
    return lora_run(str(tmp_path_factory.mktemp("tiny-lora-run")))


def assert_same_dcp_steps(a_uri: str, b_uri: str, like: dict) -> None:
    """Two DCP step checkpoints hold the same weights and optimizer state, bit for bit."""
    import torch

    from ckptflow.checkpointer import read_dcp_step

    a, oa = read_dcp_step(a_uri, like, with_optimizer=True)
    b, ob = read_dcp_step(b_uri, like, with_optimizer=True)
    for k in like:
        assert torch.equal(a[k], b[k]), k
    for k in ob:
        assert torch.equal(oa[k], ob[k]), k
