"""seed://: deterministic, loadable by transformers (model and tokenizer), usable by ckptflow."""
import hashlib
import os

import pytest
import torch

from ckptflow.errors import CkptError
from ckptflow.stages import download


def digest(path):
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(path)) if f != "ckptflow.json"}


def test_same_uri_same_bytes(tmp_path):
    uri = "seed://llama?dim=64&n_layers=2&seed=3"
    download.run(uri, str(tmp_path / "a"))
    download.run(uri, str(tmp_path / "b"))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    download.run("seed://llama?dim=64&n_layers=2&seed=4", str(tmp_path / "c"))
    assert digest(tmp_path / "a")["model.safetensors"] != digest(tmp_path / "c")["model.safetensors"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                    "smollm3", "olmo2", "phi3", "mixtral", "qwen3_moe"])
def test_transformers_loads_the_seed_model_with_ckptflows_logits(tmp_path, family):
    import transformers

    import ckptflow

    path = str(tmp_path / family)
    download.run(f"seed://{family}?dim=64&n_layers=2", path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("A checkpoint is a promise that work will not be lost.", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "A checkpoint is a promise that work will not be lost."
    model, _ = ckptflow.load(path)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_bad_seed_options_name_the_option(tmp_path):
    with pytest.raises(CkptError, match="colour"):
        download.run("seed://llama?colour=red", str(tmp_path / "x"))
    with pytest.raises(CkptError, match="gpt9"):
        download.run("seed://gpt9", str(tmp_path / "y"))
    assert not (tmp_path / "x" / "ckptflow.json").exists()
