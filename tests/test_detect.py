"""`detect` names every format ckptflow reads, reports format/family/dtype/num_params/files for each
(`ckptflow detect DIR --json`), and refuses a directory that matches two formats, naming both."""
import json
import os
import shutil
import warnings

import pytest
import torch

from ckptflow import cli
from ckptflow.errors import CkptError
from ckptflow.formats import registry
from ckptflow.stages import convert
from tests import foreign


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    model = foreign.tiny("llama")
    path = str(tmp_path_factory.mktemp("detect") / "hf")
    model.save_pretrained(path)
    return model, path


def _hf(tmp, model, hf_dir):
    return hf_dir


def _tune(tmp, model, hf_dir):
    convert.run(hf_dir, str(tmp / "tune"))
    return str(tmp / "tune")


def _meta(tmp, model, hf_dir):
    return foreign.write_meta(model, str(tmp / "meta"), mp=2)


def _dcp(tmp, model, hf_dir):
    import torch.distributed.checkpoint as tdcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tdcp.save({**foreign.meta_state_dict(model), "train_state": {"step": 3}},
                  checkpoint_id=str(tmp / "step-3"), no_dist=True)
    return str(tmp / "step-3")


def _torchtune(tmp, model, hf_dir):
    out = tmp / "tt"
    out.mkdir()
    torch.save(foreign.tune_state_dict(model), out / "torchtune_model_0.pt")
    shutil.copy(os.path.join(hf_dir, "config.json"), out / "config.json")
    return str(out)


def _litgpt(tmp, model, hf_dir):
    return foreign.write_lit(model, str(tmp / "lit"))


BUILDERS = {"hf": _hf, "tune": _tune, "meta": _meta, "dcp": _dcp, "torchtune": _torchtune, "litgpt": _litgpt}


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_detect_json_for_every_format(tmp_path, hf, capsys, fmt):
    model, hf_dir = hf
    uri = BUILDERS[fmt](tmp_path, model, hf_dir)
    assert cli.main(["detect", uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == fmt and out["dtype"] == "float32" and out["files"]
    n_hf = sum(v.numel() for v in model.state_dict().values())
    assert out["num_params"] == n_hf
    # a torchtitan step says no architecture; everything else does
    assert out["family"] == (None if fmt == "dcp" else "llama")


def test_two_formats_in_one_directory_is_an_error_naming_both(tmp_path, hf):
    model, hf_dir = hf
    both = foreign.write_meta(model, str(tmp_path / "both"))
    foreign.write_lit(model, both)
    with pytest.raises(CkptError, match="ambiguous.*meta and litgpt"):
        registry.sniff(both)

    hf_and_meta = shutil.copytree(hf_dir, str(tmp_path / "hf_and_meta"))
    foreign.write_meta(model, hf_and_meta)
    with pytest.raises(CkptError, match="hf and meta"):
        registry.detect(hf_and_meta)


def test_cli_says_ambiguous_in_one_line_exit_2(tmp_path, hf, capsys):
    model, hf_dir = hf
    both = foreign.write_meta(model, str(tmp_path / "both"))
    foreign.write_lit(model, both)
    assert cli.main(["detect", both]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "meta and litgpt" in err


def test_unknown_directory_lists_what_it_found(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(CkptError, match="no known checkpoint format.*weights.gguf"):
        registry.sniff(str(tmp_path))


def test_original_subfolder_of_an_hf_repo_is_meta(tmp_path, hf):
    model, hf_dir = hf
    repo = shutil.copytree(hf_dir, str(tmp_path / "repo"))
    foreign.write_meta(model, os.path.join(repo, "original"))     # how Llama 3 repos ship Meta files
    assert registry.sniff(repo) == "hf"
    assert registry.sniff(os.path.join(repo, "original")) == "meta"
