"""Evaluate a model: held-out perplexity, benchmark scores from lm-evaluation-harness, samples,
and the hand-off request for other evaluators.

    ckptflow evaluate SRC [--data URI] [--tasks TASKS [--limit N]] [--base BASE] [--out DIR] [--step N]

SRC is anything `ckptflow generate` loads: a run (its newest step), a step, an adapter, a tune,
HF or exported directory. With --data the stage computes the held-out token loss and perplexity
(JSONL `text` or `prompt`/`response`, or plain text; ckptflow.data) and greedy samples for a few
prompts (ckptflow.generate, the code `ckptflow generate` runs). With --tasks it runs
lm-evaluation-harness in process (ckptflow.benchmarks: lm-eval task names, or local task YAML
files or folders) on the model as transformers loads it: SRC itself when it is a local HF
directory, the run's HF export of the same step, else an HF export written to a temporary folder
and removed afterwards. With --base it evaluates BASE the same way and reports the change.

Written to DIR (committed with a manifest, kind "eval"; the same model, data, tasks and
settings evaluated again return it without work):
- `results.json`: `metrics` (loss, perplexity), `samples`, `lm_eval` ({task: {metric: value}}),
  `lm_eval_details` (task versions, sample counts, shots), `versions` (lm_eval, transformers,
  torch), and `base` / `change` with --base.
- `request.json`, what another evaluator needs: the model as a directory that transformers loads
  (SRC itself when it is an HF directory, `{run}/export` when that is HF and of the same step, else
  an HF export written to `{out}/hf`: with --tasks, a copy of the one lm-eval ran on, so the model
  is exported once), its format, dtype, tokenizer, step and lineage, and the
  lm-evaluation-harness command line that evaluates it (local tasks: their resolved YAMLs are
  written to `{out}/tasks/`, which the command includes).

DIR defaults to `{run}/eval` when SRC belongs to a run. A model outside a run without DIR is
evaluated all the same and nothing is written (`measure`; the CLI prints the numbers).
"""
from __future__ import annotations

import hashlib
import logging
import shlex
import shutil
import tempfile

from ckptflow import commit, manifest, storage
from ckptflow.benchmarks import is_stderr
from ckptflow.commit import Output
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

RESULTS, REQUEST, HF_DIR, TASKS_DIR = "results.json", "request.json", "hf", "tasks"
PROMPTS = ("The capital of France is", "A checkpoint is")
TASKS = ("hellaswag", "arc_easy", "lambada_openai")   # request.json's suggestion when no --tasks ran


def run(src: str, *, data: str | None = None, tasks: list[str] | tuple[str, ...] = (), limit: int | None = None,
        base: str | None = None, out: str | None = None, step: int | None = None,
        prompts: list[str] | tuple[str, ...] = PROMPTS, max_new_tokens: int = 32, batch_size: int = 8,
        seq_len: int = 256, max_batches: int | None = None, lm_eval_batch_size: str = "auto",
        device: str = "auto", overwrite: bool = False, wait: float = 0.0) -> Manifest:
    """Evaluate SRC (and BASE) and commit results.json and request.json to OUT (default {run}/eval)."""
    job = plan(src, data=data, tasks=tasks, limit=limit, base=base, step=step, prompts=prompts,
               max_new_tokens=max_new_tokens, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches,
               lm_eval_batch_size=lm_eval_batch_size, device=device)
    out = storage.normalize(out) if out else default_out(job.source)
    existing = commit.reusable(out, manifest.read(out), job.inputs, job.settings, overwrite=overwrite)
    if existing is not None:
        log.info("%s: already evaluated %s; nothing to do", out, src)
        return existing
    # Everything is computed before DIR is touched: bad data or a failed load leave it as it was.
    # The scratch folder outlives the commit: the HF export lm-eval ran on, if one was made, is
    # the hand-off's {out}/hf too (copied, not exported again).
    with tempfile.TemporaryDirectory(prefix="ckptflow-lm-eval-") as scratch:
        results = compute(job, scratch)
        with Output(out, overwrite=overwrite, wait=wait, expect=(job.inputs, job.settings)) as output:
            if output.done is not None:     # another writer committed the same while we waited
                return output.done
            request = hand_off(job.source, results["model"]["tokenizer"], out, tasks=job.tasks,
                               batch_size=lm_eval_batch_size, exported=manifest.read(storage.join(scratch, HF_DIR)))
            for rel, text in (job.tasks.texts() if job.tasks is not None else {}).items():
                output.put(f"{TASKS_DIR}/{rel}", text.encode())
            output.put(RESULTS, _json(results))
            output.put(REQUEST, _json(request))
            m = Manifest(kind="eval", format="eval", family=job.source.view.family.NAME,
                         model_args=job.source.view.args.to_dict(), dtype=request["dtype"], step=job.source.step,
                         inputs=job.inputs, params=job.settings, lineage=request["lineage"],
                         extra={**headline(results), "model": request["model"]})
            return output.commit(m)


def measure(src: str, **kw) -> dict:
    """The numbers of `run`, computed the same way, with nothing written anywhere."""
    with tempfile.TemporaryDirectory(prefix="ckptflow-lm-eval-") as scratch:
        return compute(plan(src, **kw), scratch)


def destination(src: str, out: str | None = None, step: int | None = None) -> str | None:
    """Where `run` writes: OUT, or {run}/eval for a model of a run, or None (outside a run)."""
    from ckptflow import generate

    if out:
        return storage.normalize(out)
    return run_default(generate.resolve(storage.normalize(src), step=step))


def headline(results: dict) -> dict:
    """The numbers a reader wants first: perplexity, loss, benchmark scores and the change."""
    metrics = results.get("metrics") or {}
    keys = ("change", "lm_eval")
    return {"perplexity": metrics.get("perplexity"), "loss": metrics.get("loss"),
            **{k: results[k] for k in keys if k in results}}


# --- the plan: every input checked before any weight is read ---------------------------------

class Job:
    """What `plan` checked: the resolved model(s), data, tasks, settings (the manifest's params)."""

    def __init__(self, source, base_source, data, tasks, settings: dict, inputs: dict, device: str):
        self.source, self.base_source, self.data, self.tasks = source, base_source, data, tasks
        self.settings, self.inputs, self.device = settings, inputs, device


def plan(src: str, *, data: str | None = None, tasks=(), limit: int | None = None, base: str | None = None,
         step: int | None = None, prompts=PROMPTS, max_new_tokens: int = 32, batch_size: int = 8,
         seq_len: int = 256, max_batches: int | None = None, lm_eval_batch_size: str = "auto",
         device: str = "auto") -> Job:
    from ckptflow import benchmarks, generate

    if not data and not tasks:
        raise CkptError(f"{src}: nothing to evaluate; give --data (perplexity) and/or --tasks (lm-eval)")
    if limit is not None and limit < 1:
        raise CkptError(f"--limit {limit}: must be at least 1")
    src = storage.normalize(src)
    data = storage.normalize(data) if data else None
    bench = None
    if tasks:
        benchmarks.require()
        bench = benchmarks.resolve_tasks(list(tasks))
    source = generate.resolve(src, step=step)
    base_source = generate.resolve(base) if base else None
    settings = {"data": data, "prompts": list(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "seq_len": seq_len, "max_batches": max_batches, "tasks": list(tasks), "limit": limit,
                "step": source.step, "lm_eval_batch_size": lm_eval_batch_size}
    inputs = {"model": model_ref(source)}
    if data:
        inputs["data"] = data_ref(data)
    if bench is not None and bench.files:
        inputs["tasks"] = tasks_ref(bench)
    if base_source is not None:
        inputs["base"] = model_ref(base_source)
    return Job(source, base_source, data, bench, settings, inputs, device)


def compute(job: Job, scratch: str) -> dict:
    """results.json's content. One model in memory at a time; lm-eval set up once for both. An
    HF export that lm-eval needed of the model is left in {scratch}/hf (the base's is removed)."""
    from ckptflow import benchmarks

    harness = benchmarks.Harness(job.tasks, scratch) if job.tasks is not None else None
    results = {**one(job, job.source, harness, storage.join(scratch, HF_DIR)), "data": job.data}
    if job.base_source is not None:
        base_hf = storage.join(scratch, f"{HF_DIR}-base")
        try:
            results["base"] = one(job, job.base_source, harness, base_hf)
        finally:
            shutil.rmtree(base_hf, ignore_errors=True)
        results["change"] = change(results["base"], results)
    if harness is not None:
        results["versions"] = benchmarks.versions()
    results["settings"] = job.settings
    return results


def one(job: Job, source, harness, scratch_hf: str) -> dict:
    """describe, metrics and samples (with data), lm_eval scores (with tasks) of one model;
    scratch_hf: where an HF export for lm-eval goes when the model has no local HF directory."""
    from ckptflow import generate

    s = job.settings
    out = {"model": describe(source, None)}
    if job.data:
        loaded = generate.load_source(source, device=job.device)
        out["model"] = describe(source, loaded.tokenizer)
        out["metrics"] = evaluate(loaded, job.data, batch_size=s["batch_size"], seq_len=s["seq_len"],
                                  max_batches=s["max_batches"])
        out["samples"] = samples(loaded, s["prompts"], s["max_new_tokens"])
        del loaded
    if harness is not None:
        out["lm_eval"], out["lm_eval_details"] = benchmark(job, source, harness, scratch_hf)
    return out


def benchmark(job: Job, source, harness, tmp_hf: str) -> tuple[dict, dict]:
    """lm-eval's scores and details for SOURCE, on an HF directory (an export to tmp_hf if need be)."""
    from ckptflow import benchmarks
    from ckptflow.trainer import pick_device

    s = job.settings
    device = str(pick_device(job.device, "--device"))
    hf_dir = lm_eval_dir(source, tmp_hf)
    raw = harness.run(hf_dir, limit=s["limit"], device=device, batch_size=_batch(s["lm_eval_batch_size"], device))
    details = benchmarks.details(raw, job.tasks, s["limit"])
    details["model"] = hf_dir if hf_dir != tmp_hf else "a temporary HF export of " + source.uri
    return benchmarks.scores(raw), details


def lm_eval_dir(source, scratch_hf: str) -> str:
    """A local HF directory with exactly SOURCE's weights: its own, the run's export, or a new one."""
    uri, _ = hf_model(source, scratch_hf)
    if not storage.is_local(uri):     # transformers reads local directories only
        from ckptflow.stages import export

        uri = export.run(uri, scratch_hf, format="hf").uri
    return storage.local_path(uri)


def _batch(value, device: str):
    """lm-eval's batch size: a number as given; "auto" probes memory, which only pays off on a GPU."""
    from ckptflow import benchmarks

    text = str(value)
    if text.isdigit():
        return int(text)
    return text if device.startswith("cuda") else benchmarks.DEFAULT_BATCH_SIZE


# --- where things go ------------------------------------------------------------------------

def run_of_source(source) -> str | None:
    """The run a resolved source belongs to: its own, its lineage's, or the directory above it."""
    if source.run:
        return source.run
    m = source.manifest
    if m is not None and (m.lineage or {}).get("run"):
        return m.lineage["run"]
    parent = storage.parent(source.uri)
    names = storage.listdir(parent)
    return parent if "run.json" in names or "train" in names else None


def default_out(source) -> str:
    out = run_default(source)
    if out is None:
        raise CkptError(f"{source.uri}: not part of a run; say where the results go with --out DIR")
    return out


def run_default(source) -> str | None:
    run = run_of_source(source)
    return storage.join(run, "eval") if run is not None else None


def model_ref(source) -> dict:
    from ckptflow.lineage import source_ref

    return manifest.input_ref(source.manifest) if source.manifest is not None else source_ref(source.view)


def data_ref(uri: str) -> dict:
    return {"uri": uri, "fingerprint": "sha256:" + hashlib.sha256(storage.read_bytes(uri)).hexdigest()}


def tasks_ref(tasks) -> dict:
    """The local task files and the data they read: a changed YAML or data file evaluates again."""
    h = hashlib.sha256()
    for rel, text in sorted(tasks.texts().items()):
        h.update(rel.encode() + b"\0" + text.encode() + b"\0")
    for path in sorted(tasks.data):
        h.update(path.encode() + b"\0" + storage.read_bytes(path) + b"\0")
    return {"uri": ",".join(sorted(set(tasks.sources.values()))), "fingerprint": "sha256:" + h.hexdigest()}


def describe(s, tokenizer) -> dict:
    return {"uri": s.uri, "format": s.view.format, "family": s.view.family.NAME, "step": s.step, "run": s.run,
            "base": s.base.uri if s.base is not None else None, "tokenizer": tokenizer.uri if tokenizer else None,
            "num_params": s.view.args.num_params()}


# --- the numbers ----------------------------------------------------------------------------

def evaluate(loaded, data: str, *, batch_size: int, seq_len: int, max_batches: int | None) -> dict:
    """Mean token cross-entropy and perplexity on held-out data (ckptflow.data, as training evaluates)."""
    from ckptflow import data as data_mod

    batches = data_mod.eval_batches(data, loaded.tokenizer, batch_size=batch_size, seq_len=seq_len,
                                    max_batches=max_batches)
    return data_mod.eval_loss(loaded.model, batches)


def samples(loaded, prompts, max_new_tokens: int) -> list[dict]:
    from ckptflow import generate

    return [generate.complete(loaded, p, max_new_tokens=max_new_tokens) for p in prompts]


def change(before: dict, after: dict) -> dict:
    """after - before for loss and perplexity (with data) and every lm-eval score (with tasks)."""
    out = {}
    b, a = before.get("metrics"), after.get("metrics")
    if b and a:
        out["loss"] = {"before": b["loss"], "after": a["loss"], "delta": a["loss"] - b["loss"]}
        out["perplexity"] = {"before": b["perplexity"], "after": a["perplexity"],
                             "delta": a["perplexity"] - b["perplexity"], "ratio": a["perplexity"] / b["perplexity"]}
    if "lm_eval" in after:
        out["lm_eval"] = {task: {k: {"before": (before.get("lm_eval") or {}).get(task, {}).get(k), "after": v,
                                     "delta": _delta((before.get("lm_eval") or {}).get(task, {}).get(k), v)}
                                 for k, v in scores.items() if not is_stderr(k)}
                          for task, scores in after["lm_eval"].items()}
    return out


def _delta(before, after):
    return after - before if isinstance(before, (int, float)) and isinstance(after, (int, float)) else None


# --- the hand-off ---------------------------------------------------------------------------

def hand_off(source, tokenizer_uri: str | None, out: str, *, tasks, batch_size: str,
             exported: Manifest | None = None) -> dict:
    """request.json: an HF directory of the evaluated weights and the lm_eval command for it
    (the tasks that ran, their resolved YAMLs in {out}/tasks; else TASKS). `exported`: the HF
    export of SOURCE that lm-eval ran on, if one was made."""
    model_uri, export_m = hf_model(source, storage.join(out, HF_DIR), exported)
    dtype = export_m.dtype if export_m is not None and export_m.dtype else _view_dtype(source.view)
    lineage = dict((export_m.lineage if export_m is not None else None) or _lineage(source))
    include = storage.join(out, TASKS_DIR) if tasks is not None and tasks.files else None
    names = list(tasks.names) if tasks is not None else list(TASKS)
    argv = lm_eval_argv(model_uri, dtype, names, batch_size, storage.join(out, "lm_eval"), include)
    return {"model": model_uri, "format": "hf", "dtype": dtype, "tokenizer": model_uri,
            "evaluated_tokenizer": tokenizer_uri, "step": source.step, "run": source.run,
            "family": source.view.family.NAME, "lineage": lineage, "tasks": names, "include_path": include,
            "argv": argv, "command": shlex.join(argv)}


def hf_model(s, dst: str, exported: Manifest | None = None):
    """(URI of an HF directory holding exactly the evaluated weights, its manifest or None): S
    itself, the run's HF export of the same step, or an HF export at dst (a copy of `exported`,
    an export of S already made elsewhere, when there is one)."""
    from ckptflow.stages import export

    if s.view.format == "hf" and s.view.adapter is None:
        return s.uri, s.manifest
    if s.run:
        run_export = manifest.read(storage.join(s.run, "export"))
        if run_export is not None and run_export.format == "hf" and run_export.step == s.step and s.step is not None:
            return run_export.uri, run_export
    if exported is not None:
        m = copy_export(exported, dst)
    else:
        m = export.run(s.uri, dst, format="hf", step=None, base=s.base.uri if s.base is not None else None)
    return m.uri, m


def copy_export(m: Manifest, dst: str) -> Manifest:
    """Committed export `m` copied file by file to dst, each file's hash checked against m's, with
    the same manifest but for its export stage naming dst: the export is made once."""
    copy = Manifest.from_dict(m.to_dict())
    stages = list(m.lineage.get("stages") or [])
    if stages and stages[-1].get("stage") == "export":
        stages[-1] = {**stages[-1], "uri": dst}
    copy.lineage = {**m.lineage, "stages": stages}
    with Output(dst) as out:
        out.reserve(sum(f["size"] for f in m.files.values()))
        for name, want in m.files.items():
            if out.copy(storage.join(m.uri, name), name)["sha256"] != want["sha256"]:
                raise CkptError(f"{storage.join(m.uri, name)}: changed while copied to {dst}")
        return out.commit(copy)


def lm_eval_argv(model_uri: str, dtype: str | None, tasks, batch_size: str, output_path: str,
                 include: str | None = None) -> list[str]:
    model_args = f"pretrained={model_uri}" + (f",dtype={dtype}" if dtype else "")
    return ["lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", ",".join(tasks),
            *(["--include_path", include] if include else []),
            "--batch_size", str(batch_size), "--output_path", output_path]


def _view_dtype(view) -> str | None:
    from ckptflow.formats import st

    codes = [it.final_dtype for it in view.items.values()]
    return st.TORCH_NAME[max(set(codes), key=codes.count)] if codes else None


def _lineage(source) -> dict:
    m = source.manifest or (source.base.manifest if source.base is not None else None)
    lin = dict((m.lineage if m is not None else None) or {})
    lin.setdefault("source", source.uri)
    lin.update(run=source.run or lin.get("run"), step=source.step)
    return lin


def _json(obj) -> bytes:
    import json

    return (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()
