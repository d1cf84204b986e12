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
