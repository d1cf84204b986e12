import json

import pytest

from ckptflow import manifest, seed
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest
from ckptflow.tokenizer import load_tokenizer


def tok_dir(d, **specials):
    d.mkdir(parents=True, exist_ok=True)
    files, _ = seed.tokenizer_files(512)
    (d / "tokenizer.json").write_bytes(files["tokenizer.json"])
    if specials:
        (d / "tokenizer_config.json").write_text(json.dumps(specials))
    return d


def test_specials_from_tokenizer_config_strings(tmp_path):
    t = load_tokenizer(str(tok_dir(tmp_path / "hf", bos_token="<|bos|>", eos_token={"content": "<|eos|>"},
                                   pad_token="<|pad|>")))
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 0)
    ids = t.encode("the checkpoint")
    assert ids and t.bos_id not in ids and t.decode(ids) == "the checkpoint"


def test_eos_list_from_generation_config(tmp_path):
    d = tok_dir(tmp_path / "hf")
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    t = load_tokenizer(str(d))
    assert t.bos_id == 1 and t.eos_ids == [2, 0] and t.eos_id == 2 and t.pad_id is None


def test_follows_tune_assets_step_base_and_run(tmp_path):
    tok_dir(tmp_path / "run" / "base" / "assets", bos_token="<|bos|>")
    manifest.write(str(tmp_path / "run" / "base"), Manifest(kind="model", format="tune"))
    step = tmp_path / "run" / "train" / "step-000010"
    step.mkdir(parents=True)
    manifest.write(str(step), Manifest(kind="train_state", format="tune", extra={"base": str(tmp_path / "run" / "base")}))
    for uri in (tmp_path / "run" / "base", step, tmp_path / "run"):
        t = load_tokenizer(str(uri))
        assert t.uri.endswith("base/assets/tokenizer.json") and t.bos_id == 1


def test_missing_and_broken_tokenizers_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CkptError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with pytest.raises(CkptError, match="bad/tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad"))
