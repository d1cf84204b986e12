"""ckptflow.load / ckptflow.save: any format in, any format out, laid out like the source."""
import os

import torch

import ckptflow
from ckptflow import manifest
from tests import hfmodels


def test_save_like_the_source_reproduces_its_files(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "src"), shard="40KB")
    model, view = ckptflow.load(src)
    m = ckptflow.save(model, str(tmp_path / "out"), format="hf", like=view)
    assert m.format == "hf" and manifest.verify(str(tmp_path / "out")) == []
    for f in os.listdir(src):
        assert open(os.path.join(src, f), "rb").read() == open(tmp_path / "out" / f, "rb").read(), f


def test_save_tune_then_load_gives_the_same_model(tmp_path):
    src = hfmodels.save("qwen2", str(tmp_path / "src"))
    model, view = ckptflow.load(src)
    ckptflow.save(model, str(tmp_path / "tune"), format="tune", like=view)
    again, view2 = ckptflow.load(str(tmp_path / "tune"))
    assert view2.format == "tune"
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_save_with_dtype_casts(tmp_path):
    src = hfmodels.save("llama", str(tmp_path / "src"))
    model, view = ckptflow.load(src)
    ckptflow.save(model, str(tmp_path / "bf16"), format="hf", like=view, dtype="bfloat16")
    back, _ = ckptflow.load(str(tmp_path / "bf16"))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16)), k
