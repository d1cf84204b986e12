"""The evaluate stage: held-out perplexity, samples, the baseline change, and request.json."""
import json
import os
import shlex

import pytest

from ckptflow import cli, generate, manifest
from ckptflow.errors import CkptError
from ckptflow.stages import download, evaluate
from tests.tinyrun import EVAL, SEED

PROMPTS = ["Q: What is the capital of France?\nA:", "Q: Where does the camel live?\nA:"]


@pytest.fixture
def run(tiny_lora_run):
    return tiny_lora_run


def read(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def test_lora_run_lowers_perplexity_against_its_base(run):
    m = evaluate.run(run, data=EVAL, base=f"{run}/base", prompts=PROMPTS, max_new_tokens=8, device="cpu")
    assert (m.kind, m.uri, m.step) == ("eval", f"{run}/eval", 12)
    assert sorted(m.files) == ["request.json", "results.json"] and manifest.verify(m.uri) == []
    assert set(m.inputs) == {"model", "data", "base"} and m.inputs["data"]["uri"] == EVAL
    results = read(m.uri, "results.json")
    after, before = results["metrics"], results["base"]["metrics"]
    assert after["tokens"] == before["tokens"] > 0
    assert after["perplexity"] < 0.8 * before["perplexity"], results["change"]
    ch = results["change"]["perplexity"]
    assert (ch["before"], ch["after"]) == (before["perplexity"], after["perplexity"]) and ch["ratio"] < 1
    # samples are what `ckptflow generate` prints for the same model
    assert [s["prompt"] for s in results["samples"]] == PROMPTS
    assert results["samples"][0]["completion"] == generate.run(run, PROMPTS[0], max_new_tokens=8,
                                                                device="cpu")["completion"]
    assert results["model"]["step"] == 12 and results["model"]["run"] == run

    again = evaluate.run(run, data=EVAL, base=f"{run}/base", prompts=PROMPTS, max_new_tokens=8, device="cpu")
    assert again.created == m.created, "the same evaluation again must not redo the work"


def test_request_names_a_directory_transformers_loads_with_the_evaluated_weights(run):
    m = evaluate.run(run, data=EVAL, out=f"{run}/eval-request", prompts=PROMPTS[:1], max_new_tokens=4, device="cpu")
    req = read(m.uri, "request.json")
    assert req["model"] == f"{run}/eval-request/hf" and req["format"] == "hf" and req["dtype"] == "float32"
    assert req["step"] == 12 and req["run"] == run and req["tokenizer"] == req["model"]
    assert req["lineage"]["source"] == SEED and req["lineage"]["step"] == 12
    assert [s["stage"] for s in req["lineage"]["stages"]] == ["convert", "train", "merge", "export"]
    assert req["argv"][:5] == ["lm_eval", "--model", "hf", "--model_args", f"pretrained={req['model']},dtype=float32"]
    assert shlex.split(req["command"]) == req["argv"]

    import torch
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(req["model"])
    tok = transformers.AutoTokenizer.from_pretrained(req["model"])
    ours = generate.load(run, device="cpu")
    text = "Q: Where does the monkey live?\nA: The monkey lives in the forest."
    ids = generate.prompt_ids(ours.tokenizer, text)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits
        mine = ours.model(torch.tensor([ids]))
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)


def test_an_hf_directory_is_its_own_request_and_matches_the_base(run, tmp_path):
    src = download.run(SEED, str(tmp_path / "seed")).uri
    m = evaluate.run(src, data=EVAL, out=str(tmp_path / "eval"), prompts=PROMPTS[:1], max_new_tokens=4, device="cpu")
    req = read(m.uri, "request.json")
    assert req["model"] == src and req["step"] is None and not os.path.exists(tmp_path / "eval" / "hf")
    base = evaluate.run(f"{run}/base", data=EVAL, out=str(tmp_path / "eval-base"), prompts=PROMPTS[:1],
                        max_new_tokens=4, device="cpu")
    # The same seed weights as HF and as the run's tune base: the same perplexity.
    assert m.extra["perplexity"] == pytest.approx(base.extra["perplexity"], rel=1e-6)


def test_out_is_required_outside_a_run_and_bad_data_is_named(tmp_path):
    src = download.run(SEED, str(tmp_path / "seed")).uri
    with pytest.raises(CkptError, match="not part of a run; say where the results go with --out"):
        evaluate.run(src, data=EVAL, device="cpu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(CkptError, match=r"bad.jsonl:2: expected a string 'text'"):
        evaluate.run(src, data=str(bad), out=str(tmp_path / "eval"), device="cpu")
    assert not os.path.exists(tmp_path / "eval"), "bad data must leave --out untouched"


def test_cli(run, capsys):
    rc = cli.main(["evaluate", run, "--data", EVAL, "--base", f"{run}/base", "--out", f"{run}/eval-cli",
                   "--prompt", PROMPTS[0], "--max-new-tokens", "4", "--device", "cpu", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    s = json.loads(out.out)
    assert s["kind"] == "eval" and s["extra"]["change"]["perplexity"]["ratio"] < 1
    assert read(f"{run}/eval-cli", "results.json")["samples"][0]["prompt"] == PROMPTS[0]


def test_request_reuses_the_runs_hf_export_of_the_same_step(run):
    from ckptflow.stages import export

    exported = export.run(run, f"{run}/export", format="hf")
    try:
        m = evaluate.run(run, data=EVAL, out=f"{run}/eval-export", prompts=PROMPTS[:1], max_new_tokens=2, device="cpu")
        req = read(m.uri, "request.json")
        assert req["model"] == exported.uri and req["lineage"] == exported.lineage
        assert not os.path.exists(f"{run}/eval-export/hf")
    finally:
        import shutil

        shutil.rmtree(exported.uri)   # the other tests expect a run without an export
