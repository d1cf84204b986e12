import glob
import os

import pytest

from ckptflow import config, storage
from ckptflow.errors import CkptError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMAL = "run_id: r1\nmodel: {source: 'seed://llama'}\ndata: {train: d.jsonl}\n"


def write(tmp_path, text: str) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "deployments", "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
    cfg = config.load_config(path)
    assert cfg.run_id and cfg.model.source and cfg.data.train


def test_demo_config_has_the_design_keys():
    cfg = config.load_config(os.path.join(ROOT, "deployments/configs/demo.yaml"))
    d = config.to_dict(cfg)
    assert d["checkpoint"]["async"] is True and "async_" not in d["checkpoint"]
    assert cfg.train.method == "lora" and cfg.checkpoint.every_steps == 20 and cfg.checkpoint.keep_last == 2
    assert cfg.export.format == "original" and cfg.export.dtype is None


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, MINIMAL + "train: {steps: 60, lr: 0.001}\n")
    cfg = config.load_config(path, ["train.steps=100"])
    assert cfg.train.steps == 100        # override beats YAML
    assert cfg.train.lr == 0.001         # YAML beats default
    assert cfg.train.grad_accum == 1     # default


def test_override_values_are_yaml_typed(tmp_path):
    cfg = config.load_config(write(tmp_path, MINIMAL), [
        "train.lora.targets=[q_proj,k_proj]", "train.max_grad_norm=null", "checkpoint.async=false",
        "train.lr=1e-3", "checkpoint.pin=[step-000500, 20]", "storage_options={anon: true}"])
    assert cfg.train.lora.targets == ["q_proj", "k_proj"]
    assert cfg.train.max_grad_norm is None
    assert cfg.checkpoint.async_ is False
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.checkpoint.pin == [500, 20]
    assert cfg.storage_options == {"anon": True}


@pytest.mark.parametrize("text,overrides,needle", [
    (MINIMAL + "train: {stepz: 3}\n", [], "'train.stepz'"),
    (MINIMAL, ["checkpoint.every_step=5"], "'checkpoint.every_step'"),
    (MINIMAL, ["train.steps=many"], "train.steps"),
    (MINIMAL, ["train.method=qlora"], "train.method"),
    (MINIMAL, ["checkpoint.exclude_from_loading=[weights]"], "checkpoint.exclude_from_loading"),
    ("run_id: r1\ndata: {train: d.jsonl}\n", [], "missing key 'model'"),
    (MINIMAL, ["train.lora=3", "train.lora.rank=4"], "train.lora is not a section"),
    (MINIMAL, ["novalue"], "KEY=VALUE"),
])
def test_bad_input_names_the_key(tmp_path, text, overrides, needle):
    with pytest.raises(CkptError) as e:
        config.load_config(write(tmp_path, text), overrides)
    assert needle in str(e.value)


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(CkptError, match="did you mean 'every_steps'"):
        config.load_config(write(tmp_path, MINIMAL), ["checkpoint.every_step=5"])


def test_not_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "run_id: [unclosed\n")
    with pytest.raises(CkptError, match="run.yaml"):
        config.load_config(path)


def test_loads_over_fsspec():
    storage.put_atomic("memory://cfgtest/run.yaml", MINIMAL.encode())
    assert config.load_config("memory://cfgtest/run.yaml").run_id == "r1"


def test_fingerprints_follow_the_part_that_changed(tmp_path):
    path = write(tmp_path, MINIMAL)
    a = config.load_config(path)
    more_steps = config.load_config(path, ["train.steps=999"])
    bigger_batch = config.load_config(path, ["train.batch_size=16"])
    assert config.fingerprint(a, "resume") == config.fingerprint(more_steps, "resume")
    assert config.fingerprint(a, "resume") != config.fingerprint(bigger_batch, "resume")
    assert config.fingerprint(a, "train") != config.fingerprint(more_steps, "train")
    assert config.fingerprint(a, "data") == config.fingerprint(bigger_batch, "data")
    assert config.fingerprint(a) == config.fingerprint(config.load_config(path))


def test_run_dir_and_run_id(tmp_path):
    cfg = config.load_config(write(tmp_path, MINIMAL), [f"storage={tmp_path}/runs"])
    assert config.run_dir(cfg) == f"{tmp_path}/runs/r1"
    with pytest.raises(CkptError, match="run_id"):
        config.load_config(write(tmp_path, MINIMAL), ["run_id=a/b"])


def test_round_trip_through_a_flow_parameter_dict(tmp_path):
    cfg = config.load_config(write(tmp_path, MINIMAL), ["checkpoint.async=false"])
    again = config.validate(config.to_dict(cfg))
    assert again == cfg and again.checkpoint.async_ is False
