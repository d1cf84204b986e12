"""Generation from any checkpoint: HF and tune directories, a run, a LoRA step merged in memory."""
import json

import pytest

from ckptflow import cli, generate
from ckptflow.errors import CkptError
from ckptflow.stages import convert, download, export
from tests.tinyrun import SEED

PROMPT = "Q: What is the capital of France?\nA:"


@pytest.fixture(scope="module")
def seed_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen") / "seed"
    download.run(SEED, str(d))
    return str(d)


@pytest.fixture
def run(tiny_lora_run):
    return tiny_lora_run


def reference_greedy(loaded, prompt, n):
    """Greedy decoding without a cache: the whole sequence through the model for every token."""
    import torch

    ids = generate.prompt_ids(loaded.tokenizer, prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(loaded.model(torch.tensor([ids + out]))[0, -1].argmax())
            out.append(nxt)
            if nxt in loaded.tokenizer.eos_ids:
                break
    return out


def test_greedy_equals_uncached_decoding_and_uses_the_cache(seed_hf):
    loaded = generate.load(seed_hf, device="cpu")
    seen = []
    hook = loaded.model.tok_embeddings.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    got = generate.complete(loaded, PROMPT, max_new_tokens=12)
    hook.remove()
    want = reference_greedy(loaded, PROMPT, 12)
    assert got["tokens"] == len(want) == 12
    assert got["completion"] == loaded.tokenizer.decode(want)
    n_prompt = len(generate.prompt_ids(loaded.tokenizer, PROMPT))
    assert seen == [n_prompt] + [1] * 11, "after the prompt every step must feed one token (KV cache)"


def test_same_text_from_hf_and_tune(seed_hf, tmp_path):
    tune = convert.run(seed_hf, str(tmp_path / "tune"), to="tune").uri
    a = generate.run(seed_hf, PROMPT, max_new_tokens=8, device="cpu")
    b = generate.run(tune, PROMPT, max_new_tokens=8, device="cpu")
    assert a["completion"] == b["completion"] and a["tokens"] == 8


def test_run_and_step_merge_lora_in_memory(run, tmp_path):
    from_run = generate.run(run, PROMPT, max_new_tokens=10, device="cpu")
    assert from_run["step"] == 12 and from_run["uri"].endswith("train/step-000012")
    from_step = generate.run(from_run["uri"], PROMPT, max_new_tokens=10, device="cpu")
    exported = export.run(from_run["uri"], str(tmp_path / "merged-hf"), format="hf").uri
    from_export = generate.run(exported, PROMPT, max_new_tokens=10, device="cpu")
    base = generate.run(f"{run}/base", PROMPT, max_new_tokens=10, device="cpu")
    assert from_run["completion"] == from_step["completion"] == from_export["completion"]
    assert from_run["completion"] != base["completion"], "the adapter was not applied"


def test_sampling_is_seeded(seed_hf):
    loaded = generate.load(seed_hf, device="cpu")
    a = generate.complete(loaded, PROMPT, max_new_tokens=12, temperature=1.0, seed=1)
    b = generate.complete(loaded, PROMPT, max_new_tokens=12, temperature=1.0, seed=1)
    c = generate.complete(loaded, PROMPT, max_new_tokens=12, temperature=1.0, seed=2)
    greedy = generate.complete(loaded, PROMPT, max_new_tokens=12)
    assert a == b and (a != c or a != greedy)


def test_bad_settings(seed_hf):
    loaded = generate.load(seed_hf, device="cpu")
    with pytest.raises(CkptError, match="--max-new-tokens 0"):
        generate.complete(loaded, PROMPT, max_new_tokens=0)
    with pytest.raises(CkptError, match="--temperature -1"):
        generate.complete(loaded, PROMPT, temperature=-1)


def test_cli_prints_the_continuation(seed_hf, capsys):
    assert cli.main(["generate", seed_hf, "--prompt", PROMPT, "--max-new-tokens", "6", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert cli.main(["generate", seed_hf, "--prompt", PROMPT, "--max-new-tokens", "6", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert text == out["completion"] + "\n" and out["tokens"] == 6 and out["prompt"] == PROMPT
    assert cli.main(["generate", seed_hf + "-missing", "--prompt", "x"]) == 2
