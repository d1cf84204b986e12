"""`ckptflow evaluate --tasks`: lm-evaluation-harness in process, against lm_eval itself.

The tasks are the demo's own (deployments/tasks: a multiple-choice and a cloze task over
deployments/data/demo-bench.jsonl), run offline on the tiny seed model with --limit.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

from ckptflow import benchmarks, cli, manifest, report
from ckptflow.errors import CkptError
from ckptflow.stages import download
from tests.tinyrun import EVAL, ROOT, SEED

import lm_eval  # noqa: E402,F401 - a test dependency: missing means failing, never skipping

TASKS = os.path.join(ROOT, "deployments", "tasks")
QA = os.path.join(TASKS, "demo_qa.yaml")
NAMES = ["ckptflow_demo_cloze", "ckptflow_demo_qa"]
LIMIT = "6"


def files_under(path) -> dict:
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, path)] = os.stat(p).st_mtime_ns
    return out


def lm_eval_cli(model_dir: str, include: str, out: str) -> dict:
    """`python -m lm_eval` on MODEL_DIR, offline, as a person would run it: its results JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": out + "/cache"}
    argv = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}",
            "--tasks", ",".join(NAMES), "--include_path", include, "--limit", LIMIT, "--batch_size", "4",
            "--device", "cpu", "--output_path", out]
    done = subprocess.run(argv, env=env, cwd=out, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = [os.path.join(r, n) for r, _, ns in os.walk(out) for n in ns if n.startswith("results_")]
    assert len(found) == 1, found
    with open(found[0]) as f:
        return json.load(f)


def test_tasks_on_a_lora_run_give_what_lm_eval_gives_on_the_same_export(tiny_lora_run, tmp_path, capsys,
                                                                         monkeypatch):
    from ckptflow.stages import export

    run = tiny_lora_run
    out = f"{run}/eval-lm"
    exported, real_export = [], export.run
    monkeypatch.setattr(export, "run", lambda src, *a, **kw: exported.append(src) or real_export(src, *a, **kw))
    rc = cli.main(["evaluate", run, "--tasks", TASKS, "--limit", LIMIT, "--lm-eval-batch-size", "4",
                   "--base", f"{run}/base", "--out", out, "--device", "cpu", "--json"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    summary = json.loads(printed.out)
    assert summary["kind"] == "eval" and summary["perplexity"] is None
    ours = summary["lm_eval"]
    assert sorted(ours) == NAMES and set(ours["ckptflow_demo_qa"]) == {"acc", "acc_stderr", "acc_norm",
                                                                       "acc_norm_stderr"}
    assert manifest.verify(out) == []
    results = json.load(open(f"{out}/results.json"))
    assert results["lm_eval"] == ours
    assert set(results["versions"]) == {"lm_eval", "transformers", "torch"}
    assert results["lm_eval_details"]["n_samples"] == {n: int(LIMIT) for n in NAMES}
    assert results["lm_eval_details"]["model"].startswith("a temporary HF export of ")
    # the base (a tune dir, exported on the fly too) scored the same way: before / after per metric
    base = results["base"]["lm_eval"]
    assert sorted(base) == NAMES and base != ours
    acc = summary["change"]["lm_eval"]["ckptflow_demo_qa"]["acc"]
    assert acc == {"before": base["ckptflow_demo_qa"]["acc"], "after": ours["ckptflow_demo_qa"]["acc"],
                   "delta": pytest.approx(ours["ckptflow_demo_qa"]["acc"] - base["ckptflow_demo_qa"]["acc"])}
    assert "acc_stderr" not in summary["change"]["lm_eval"]["ckptflow_demo_qa"]

    # request.json: the run's step exported to {out}/hf, and the resolved task YAMLs beside it.
    req = json.load(open(f"{out}/request.json"))
    assert req["model"] == f"{out}/hf" and req["include_path"] == f"{out}/tasks" and req["tasks"] == NAMES
    # One export of the step (lm-eval's, copied to {out}/hf for the hand-off) and one of the base.
    assert len(exported) == 2 and f"{run}/base" in exported, exported
    hf = manifest.require(f"{out}/hf")
    assert manifest.verify(f"{out}/hf") == [] and hf.lineage["stages"][-1]["uri"] == f"{out}/hf"
    theirs = lm_eval_cli(req["model"], req["include_path"], str(tmp_path))
    for task in NAMES:
        row = {k.replace(",none", ""): v for k, v in theirs["results"][task].items() if k.endswith(",none")}
        assert ours[task] == pytest.approx(row, rel=1e-6, abs=1e-9), task


def test_a_model_outside_a_run_without_out_prints_the_numbers_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hub

    src = download.run(SEED, str(tmp_path / "seed")).uri
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    before_tmp, before_repo = files_under(tmp_path), files_under(os.path.join(ROOT, "deployments"))
    rc = cli.main(["evaluate", src, "--data", EVAL, "--tasks", QA, "--limit", "4", "--max-batches", "1",
                   "--prompt", "Q: Where does the camel live?\nA:", "--max-new-tokens", "2", "--device", "cpu",
                   "--json"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    res = json.loads(printed.out)
    assert res["uri"] is None and res["perplexity"] > 1 and res["loss"] > 0
    assert set(res["lm_eval"]) == {"ckptflow_demo_qa"} and 0 <= res["lm_eval"]["ckptflow_demo_qa"]["acc"] <= 1
    assert res["results"]["metrics"]["perplexity"] == res["perplexity"]
    assert files_under(tmp_path) == before_tmp, "nothing written beside the model, no scratch left"
    assert files_under(os.path.join(ROOT, "deployments")) == before_repo
    # Offline for lm-eval only: a download later in this process still reaches the Hub.
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    assert hub.HF_HUB_OFFLINE is False

    rc = cli.main(["evaluate", src, "--tasks", QA, "--limit", "2", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and "nothing written" in text and "ckptflow_demo_qa: acc " in text

    # A data set on the Hub, not cached: offline, so one line that says so (exit 2), not a download.
    hub_task = tmp_path / "hubtask"
    hub_task.mkdir()
    (hub_task / "hub.yaml").write_text("task: hubtask\ndataset_path: ckptflow-test/not-there\ntest_split: test\n"
                                       "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: c\n"
                                       "doc_to_target: g\n")
    rc = cli.main(["evaluate", src, "--tasks", str(hub_task / "hub.yaml"), "--out", str(tmp_path / "ev"),
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Couldn't reach 'ckptflow-test/not-there'" in err and "lm-eval runs offline" in err, err
    assert not (tmp_path / "ev").exists() and os.listdir(scratch) == []


def test_without_lm_eval_one_line_says_how_to_install_it(tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['lm_eval'] = None   # import lm_eval fails\n")
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), ROOT])}
    done = subprocess.run([sys.executable, "-m", "ckptflow.cli", "evaluate", SEED, "--tasks", TASKS,
                           "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("ckptflow: error: lm-evaluation-harness is not installed; "
                           "install it with: pip install 'ckptflow[eval]'\n")
    assert not out.exists()


def test_local_task_yaml_is_resolved_and_bad_ones_are_named(tmp_path):
    tasks = benchmarks.resolve_tasks([QA, "hellaswag"])
    assert tasks.names == ["ckptflow_demo_qa", "hellaswag"] and tasks.builtin
    doc = tasks.files["0/demo_qa.yaml"]
    assert doc["dataset_kwargs"]["data_files"] == {"test": os.path.join(ROOT, "deployments", "data",
                                                                        "demo-bench.jsonl")}
    assert tasks.data == [os.path.join(ROOT, "deployments", "data", "demo-bench.jsonl")]
    assert "cache_dir: /c" in tasks.texts(cache="/c")["0/demo_qa.yaml"]
    assert "cache_dir" not in tasks.texts()["0/demo_qa.yaml"]

    bad = tmp_path / "t"
    bad.mkdir()
    (bad / "mine.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n"
                                   "  data_files: {test: missing.jsonl}\ndoc_to_text: !function utils.text\n")
    with pytest.raises(CkptError, match=r"mine.yaml: data file 'missing.jsonl' not found"):
        benchmarks.resolve_tasks([str(bad / "mine.yaml")])
    (bad / "missing.jsonl").write_text('{"q": 1}\n')
    (bad / "utils.py").write_text("def text(doc):\n    return str(doc)\n")
    resolved = benchmarks.resolve_tasks([str(bad)])
    assert resolved.names == ["mine"] and "!function 'utils.text'" in resolved.texts()["0/mine.yaml"] \
        or "!function utils.text" in resolved.texts()["0/mine.yaml"]
    assert "0/utils.py" in resolved.texts()
    with pytest.raises(CkptError, match=r"nope.yaml: no such task file or folder"):
        benchmarks.resolve_tasks([str(tmp_path / "nope.yaml")])
    (bad / "plain.yaml").write_text("just: data\n")
    with pytest.raises(CkptError, match=r"plain.yaml: not an lm-eval task YAML"):
        benchmarks.resolve_tasks([str(bad / "plain.yaml")])


def test_summary_shows_scores_before_and_after():
    ev = {"before": {"loss": 3.0, "perplexity": 20.0}, "after": {"loss": 2.0, "perplexity": 7.0},
          "lm_eval": {"before": {"qa": {"acc": 0.25, "acc_stderr": 0.05}, "cloze": {"perplexity": 6e10}},
                      "after": {"qa": {"acc": 0.875, "acc_stderr": 0.03}, "cloze": {"perplexity": 2.5}}}}
    md = report.summary_markdown({"run_id": "r", "eval": ev})
    assert "| qa | acc | 0.2500\u00a0±\u00a00.0500 | 0.8750\u00a0±\u00a00.0300 | +0.6250 |" in md
    assert "| cloze | perplexity | 6e+10 | 2.5 | -6e+10 (×4.17e-11) |" in md
    assert "acc_stderr" not in md and "| loss | 3.0000 | 2.0000 |" in md
