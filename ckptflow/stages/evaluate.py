"""Evaluate a model and write the hand-off request for lm-evaluation-harness.

    ckptflow evaluate SRC --data URI [--base BASE] [--out DIR] [--step N] [--prompt TEXT ...]

SRC is anything `ckptflow generate` loads: a run (its newest step), a step, an adapter, a tune,
HF or exported directory. The stage computes the held-out token loss and perplexity on --data
(JSONL `text` or `prompt`/`response`, or plain text; ckptflow.data) and greedy samples for a few
prompts (ckptflow.generate, the code `ckptflow generate` runs). With --base it evaluates BASE
the same way and reports the change. Everything goes to `{out}/results.json`.

`{out}/request.json` is what another evaluator needs: the model as a directory that
transformers loads (SRC itself when it is an HF directory, `{run}/export` when that is HF and of
the same step, else an HF export written to `{out}/hf`), its format, dtype, tokenizer, step and
lineage, and the lm-evaluation-harness command line that evaluates it.

DIR defaults to `{run}/eval` when SRC belongs to a run. The output is committed with a manifest
(kind "eval"); the same model, data and settings evaluated again return it without work.
"""
from __future__ import annotations

import hashlib
import logging
import shlex

from ckptflow import manifest, storage
from ckptflow.commit import Output
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

RESULTS, REQUEST, HF_DIR = "results.json", "request.json", "hf"
PROMPTS = ("The capital of France is", "A checkpoint is")
TASKS = ("hellaswag", "arc_easy", "lambada_openai")


def run(src: str, *, data: str, base: str | None = None, out: str | None = None, step: int | None = None,
        prompts: list[str] | tuple[str, ...] = PROMPTS, max_new_tokens: int = 32, batch_size: int = 8,
        seq_len: int = 256, max_batches: int | None = None, tasks: list[str] | tuple[str, ...] = TASKS,
        lm_eval_batch_size: str = "auto", device: str = "auto", overwrite: bool = False) -> Manifest:
    from ckptflow import generate

    src, data = storage.normalize(src), storage.normalize(data)
    source = generate.resolve(src, step=step)
    base_source = generate.resolve(base) if base else None
    out = storage.normalize(out) if out else default_out(source)
    settings = {"data": data, "prompts": list(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "seq_len": seq_len, "max_batches": max_batches, "tasks": list(tasks), "step": source.step,
                "lm_eval_batch_size": lm_eval_batch_size}
    inputs = {"model": model_ref(source), "data": data_ref(data)}
    if base_source is not None:
        inputs["base"] = model_ref(base_source)
    existing = manifest.read(out)
    if manifest.matches(existing, inputs, settings) and not overwrite:
        log.info("%s: already evaluated %s on %s; nothing to do", out, src, data)
        return existing
    # Everything is computed before DIR is touched: bad data or a failed load leave it as it was.
    # One model in memory at a time.
    shape = {"batch_size": batch_size, "seq_len": seq_len, "max_batches": max_batches}
    loaded = generate.load_source(source, device=device)
    results = {"model": describe(loaded), "data": data, "metrics": evaluate(loaded, data, **shape),
               "samples": samples(loaded, prompts, max_new_tokens)}
    tokenizer_uri = loaded.tokenizer.uri
    del loaded
    if base_source is not None:
        bl = generate.load_source(base_source, device=device)
        results["base"] = {**describe(bl), "metrics": evaluate(bl, data, **shape),
                           "samples": samples(bl, prompts, max_new_tokens)}
        del bl
        results["change"] = change(results["base"]["metrics"], results["metrics"])
    results["settings"] = settings
    output = Output(out, overwrite=overwrite or existing is not None)
    request = hand_off(source, tokenizer_uri, out, tasks=tasks, batch_size=lm_eval_batch_size)
    output.put(RESULTS, _json(results))
    output.put(REQUEST, _json(request))
    m = Manifest(kind="eval", format="eval", family=source.view.family.NAME, model_args=source.view.args.to_dict(),
                 dtype=request["dtype"], step=source.step, inputs=inputs, params=settings,
                 lineage=request["lineage"],
                 extra={"perplexity": results["metrics"]["perplexity"], "model": request["model"],
                        **({"change": results["change"]} if "change" in results else {})})
    return output.commit(m)


# --- where things go ------------------------------------------------------------------------

def run_of(source) -> str | None:
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
    run = run_of(source)
    if run is None:
        raise CkptError(f"{source.uri}: not part of a run; say where the results go with --out DIR")
    return storage.join(run, "eval")


def model_ref(source) -> dict:
    from ckptflow.lineage import source_ref

    return manifest.input_ref(source.manifest) if source.manifest is not None else source_ref(source.view)


def data_ref(uri: str) -> dict:
    return {"uri": uri, "fingerprint": "sha256:" + hashlib.sha256(storage.read_bytes(uri)).hexdigest()}


def describe(loaded) -> dict:
    s = loaded.source
    return {"uri": s.uri, "format": s.view.format, "family": s.view.family.NAME, "step": s.step, "run": s.run,
            "base": s.base.uri if s.base is not None else None, "tokenizer": loaded.tokenizer.uri,
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
    return {"loss": {"before": before["loss"], "after": after["loss"], "delta": after["loss"] - before["loss"]},
            "perplexity": {"before": before["perplexity"], "after": after["perplexity"],
                           "delta": after["perplexity"] - before["perplexity"],
                           "ratio": after["perplexity"] / before["perplexity"]}}


# --- the hand-off ---------------------------------------------------------------------------

def hand_off(source, tokenizer_uri: str, out: str, *, tasks, batch_size: str) -> dict:
    """request.json: an HF directory of the evaluated weights and the lm_eval command for it."""
    model_uri, export_m = hf_model(source, out)
    dtype = export_m.dtype if export_m is not None and export_m.dtype else _view_dtype(source.view)
    lineage = dict((export_m.lineage if export_m is not None else None) or _lineage(source))
    argv = lm_eval_argv(model_uri, dtype, tasks, batch_size, storage.join(out, "lm_eval"))
    return {"model": model_uri, "format": "hf", "dtype": dtype, "tokenizer": model_uri,
            "evaluated_tokenizer": tokenizer_uri, "step": source.step, "run": source.run,
            "family": source.view.family.NAME, "lineage": lineage, "tasks": list(tasks), "argv": argv,
            "command": shlex.join(argv)}


def hf_model(s, out: str):
    """(URI of an HF directory holding exactly the evaluated weights, its manifest or None)."""
    from ckptflow.stages import export

    if s.view.format == "hf" and s.view.adapter is None:
        return s.uri, s.manifest
    if s.run:
        exported = manifest.read(storage.join(s.run, "export"))
        if exported is not None and exported.format == "hf" and exported.step == s.step and s.step is not None:
            return exported.uri, exported
    m = export.run(s.uri, storage.join(out, HF_DIR), format="hf", step=None,
                   base=s.base.uri if s.base is not None else None)
    return m.uri, m


def lm_eval_argv(model_uri: str, dtype: str | None, tasks, batch_size: str, output_path: str) -> list[str]:
    model_args = f"pretrained={model_uri}" + (f",dtype={dtype}" if dtype else "")
    return ["lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", ",".join(tasks),
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
