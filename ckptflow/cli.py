"""The `ckptflow` command: one subcommand per stage verb, plus tools.

Exit 0 on success, 2 on bad input (one line on stderr naming the file or key), 1 on an internal
error. Subcommands that report take --json and then print one JSON object on stdout.
Imports stay lazy: the conversion path never imports prefect or transformers.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Optional

import typer

from ckptflow.errors import CkptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Checkpoint stages of an LLM fine-tuning run: download, detect, convert, train, merge, export, evaluate.")
JSON = typer.Option(False, "--json", help="print one JSON object on stdout")
WAIT = typer.Option(False, "--wait", help="when another process is writing DST, wait for it instead of failing")


def wait_s(wait: bool) -> float:
    return float("inf") if wait else 0.0


def emit(obj: dict, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=None, sort_keys=True, default=str) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def manifest_summary(m) -> dict:
    d = m.to_dict()
    d["uri"] = m.uri
    d["num_files"] = len(m.files)
    d["size_bytes"] = sum(f.get("size", 0) for f in m.files.values())
    return d


@app.command()
def detect(uri: str, as_json: bool = JSON):
    """Format, family, dtype, parameter count and files of a checkpoint."""
    from ckptflow.formats import registry as det

    d = det.detect(uri).to_dict()
    emit(d, as_json, f"format: {d['format']}\nfamily: {d['family']}\ndtype: {d['dtype']}\n"
                     f"num_params: {d['num_params']}\nfiles: {len(d['files'])}"
                     + "".join(f"\n{k}: {v}" for k, v in d.get("details", {}).items() if k in ("seed", "checkpoint")))


@app.command()
def convert(src: str, dst: str, to: str = typer.Option("tune", "--to", help="tune | hf | meta | dcp | peft"),
            dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16 | float16 | float32 (default: keep)"),
            max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="e.g. 5GB; default: the source's partition"),
            overwrite: bool = typer.Option(False, "--overwrite", help="replace a committed destination"),
            rope_scaling_factor: Optional[float] = typer.Option(
                None, "--rope-scaling-factor", help="Meta params.json with use_scaled_rope: the llama3 factor (8 or 32)"),
            model_config: Optional[str] = typer.Option(
                None, "--model-config", help="architecture for sources without one (DCP, torchtitan, torchtune .pt): "
                                             "a config.json, params.json, model_config.yaml or model directory"),
            epoch: Optional[int] = typer.Option(None, "--epoch", help="torchtune output dir: this epoch/step (default: the last)"),
            wait: bool = WAIT, as_json: bool = JSON):
    """Convert SRC to DST, streaming one tensor at a time."""
    from ckptflow.stages import convert as stage

    opts = {"rope_scaling_factor": rope_scaling_factor, "model_config": model_config, "epoch": epoch}
    m = stage.run(src, dst, to=to, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                  reader_opts={k: v for k, v in opts.items() if v is not None} or None, wait=wait_s(wait))
    s = manifest_summary(m)
    emit(s, as_json, f"{m.uri}: {m.format} {m.family} {m.dtype}, {s['num_files']} files, {s['size_bytes']} bytes")


@app.command()
def verify(uri: str, as_json: bool = JSON):
    """Re-hash every file against ckptflow.json; a run: every committed directory in it; exit 1 on any mismatch."""
    from ckptflow import manifest

    if manifest.read(uri) is not None:
        problems = manifest.verify(uri)
        emit({"uri": uri, "ok": not problems, "problems": problems}, as_json,
             "\n".join(problems) if problems else f"{uri}: ok")
    else:
        problems = _verify_tree(uri, as_json)
    if problems:
        raise typer.Exit(1)


def _verify_tree(uri: str, as_json: bool) -> list[str]:
    """A run (or any directory): every committed directory below it, and the shared base its run.json names."""
    from ckptflow import manifest, runfile, storage

    dirs, interrupted = manifest.committed_under(uri)
    run = storage.read_json(runfile.uri_of(uri)) if storage.isfile(runfile.uri_of(uri)) else {}
    base = run.get("base") or {}
    dirs += [u for u in (base.get("source"), base.get("tune")) if base.get("shared") and u and manifest.is_committed(u)]
    if not dirs:
        raise CkptError(f"{uri}: not a committed ckptflow directory, and no committed directory below it")
    results = {d: manifest.verify(d) for d in dirs}
    problems = [p for ps in results.values() for p in ps]
    lines = [f"{d}: " + ("ok" if not ps else "\n  ".join(["FAILED"] + ps)) for d, ps in results.items()]
    lines += [f"{d}: uncommitted (an interrupted write; `ckptflow gc` deletes it), not checked" for d in interrupted]
    emit({"uri": uri, "ok": not problems, "problems": problems, "checked": {d: not ps for d, ps in results.items()},
          "uncommitted": interrupted}, as_json, "\n".join(lines))
    return problems


@app.command()
def gc(uri: str, dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be deleted"),
       as_json: bool = JSON):
    """Delete uncommitted leftovers under a run (interrupted writes); never a committed directory."""
    from ckptflow import collect as collector

    r = collector.run(uri, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    lines = [f"{verb} {u}" for u in r["deleted"]] + [f"left alone (being written) {u}" for u in r["live"]]
    emit(r, as_json, "\n".join(lines) or f"{r['uri']}: nothing to delete")


@app.command()
def inspect(uri: str, as_json: bool = JSON):
    """Show a manifest, a run, or the step checkpoints of a run."""
    from ckptflow import describe as insp

    info = insp.describe(uri)
    emit(info, as_json, insp.as_text(info))


@app.command()
def download(source: str, dst: str,
             format: str = typer.Option("hf", "--format", help="hf (safetensors over .bin) | meta (original/) | all"),
             endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)"),
             in_place: bool = typer.Option(False, "--in-place", help="storage URIs: record the source where it is, copy nothing"),
             overwrite: bool = typer.Option(False, "--overwrite"), wait: bool = WAIT, as_json: bool = JSON):
    """Download SOURCE (seed://..., hf://ORG/NAME[@REV], any fsspec URI) into DST. Token: HF_TOKEN."""
    from ckptflow.stages import download as stage

    m = stage.run(source, dst, format=format, endpoint=endpoint, in_place=in_place, overwrite=overwrite,
                  wait=wait_s(wait))
    s = manifest_summary(m)
    rev = m.lineage.get("revision")
    emit(s, as_json, f"{m.uri}: {m.format} from {source}" + (f" at {rev}" if rev and rev != "seed" else "")
         + f", {s['num_files']} files" + (f" (in place: {m.extra['location']})" if m.extra.get("location") else ""))


@app.command()
def generate(src: str, prompt: str = typer.Option(..., "--prompt", help="text to continue"),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
             temperature: float = typer.Option(0.0, "--temperature", help="0: greedy"),
             top_k: Optional[int] = typer.Option(None, "--top-k"),
             seed: int = typer.Option(0, "--seed", help="sampling seed (temperature > 0)"),
             step: Optional[int] = typer.Option(None, "--step", help="a run's step (default: the newest committed)"),
             base: Optional[str] = typer.Option(None, "--base", help="the base model of an adapter (default: the one it names)"),
             device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
             as_json: bool = JSON):
    """Continue --prompt with the model at SRC (any format, a run, a step or an adapter)."""
    from ckptflow import generate as gen

    out = gen.run(src, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                  step=step, base=base, device=device)
    emit(out, as_json, out["completion"])


@app.command()
def evaluate(src: str, data: Optional[str] = typer.Option(None, "--data", help="held-out JSONL or text (any fsspec URI): perplexity"),
             tasks: Optional[str] = typer.Option(
                 None, "--tasks", help="lm-eval tasks, comma-separated: names, or task YAML files / folders with local data"),
             limit: Optional[int] = typer.Option(None, "--limit", help="lm-eval: at most N examples per task"),
             base: Optional[str] = typer.Option(None, "--base", help="also evaluate this model and report the change"),
             out: Optional[str] = typer.Option(None, "--out", help="default: {run}/eval; a model outside a run: "
                                                                  "print the numbers, write nothing"),
             step: Optional[int] = typer.Option(None, "--step", help="a run's step (default: the newest committed)"),
             prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="sample prompts (repeat the option)"),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
             batch_size: int = typer.Option(8, "--batch-size"), seq_len: int = typer.Option(256, "--seq-len"),
             max_batches: Optional[int] = typer.Option(None, "--max-batches"),
             lm_eval_batch_size: str = typer.Option("auto", "--lm-eval-batch-size",
                                                    help="a number, or auto (probes memory on a GPU; 16 on CPU)"),
             device: str = typer.Option("auto", "--device"),
             overwrite: bool = typer.Option(False, "--overwrite"), wait: bool = WAIT, as_json: bool = JSON):
    """Perplexity, lm-eval scores and samples of SRC; {out}/results.json and request.json for other evaluators."""
    from ckptflow.stages import evaluate as stage

    kw = {"data": data, "tasks": [t.strip() for t in (tasks or "").split(",") if t.strip()], "limit": limit,
          "base": base, "step": step, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seq_len": seq_len,
          "max_batches": max_batches, "lm_eval_batch_size": lm_eval_batch_size, "device": device,
          **({"prompts": prompt} if prompt else {})}
    dst = stage.destination(src, out, step=step)
    if dst is None:   # a model outside a run and no --out: the numbers only
        res = stage.measure(src, **kw)
        emit({"uri": None, **stage.headline(res), "results": res}, as_json, _eval_text(None, stage.headline(res)))
        return
    m = stage.run(src, out=dst, overwrite=overwrite, wait=wait_s(wait), **kw)
    head = {k: m.extra.get(k) for k in ("perplexity", "loss", "lm_eval", "change") if k in m.extra}
    emit({**manifest_summary(m), **head}, as_json,
         _eval_text(m.uri, head) + f"\nmodel for lm_eval: {m.extra['model']}")


def _eval_text(uri: str | None, head: dict) -> str:
    from ckptflow.benchmarks import is_stderr

    ch = head.get("change") or {}
    lines = [f"{uri}: written" if uri else "(nothing written: give --out DIR to keep the results)"]
    if head.get("perplexity") is not None:
        before = (ch.get("perplexity") or {}).get("before")
        lines.append(f"perplexity {head['perplexity']:.3f}" + (f" (base {before:.3f})" if before is not None else ""))
    for task, scores in (head.get("lm_eval") or {}).items():
        shown = []
        for k, v in scores.items():
            if is_stderr(k):
                continue
            before = ((ch.get("lm_eval") or {}).get(task) or {}).get(k, {}).get("before")
            shown.append(f"{k} {v:.4g}" + (f" (base {before:.4g})" if isinstance(before, (int, float)) else ""))
        lines.append(f"{task}: " + ", ".join(shown))
    return "\n".join(lines)


@app.command()
def train(config: str = typer.Argument(..., help="run config YAML (any fsspec URI)"),
          overrides: Optional[list[str]] = typer.Argument(None, help="dotted KEY=VALUE overrides, e.g. train.steps=100"),
          stop_after: Optional[int] = typer.Option(None, "--stop-after", help="stop (with a checkpoint) at this step"),
          wait: bool = typer.Option(False, "--wait", help="when another process is writing the run, wait for it"),
          node_rank: int = typer.Option(0, "--node-rank", help="this machine's rank, 0..train.nnodes-1 (several nodes)"),
          as_json: bool = JSON):
    """Train (full or LoRA) with step checkpoints; resumes from the newest committed step."""
    from ckptflow import config as cfg_mod
    from ckptflow.stages import train as stage

    cfg = cfg_mod.load_config(config, overrides or [])
    m = stage.run(cfg, stop_after=stop_after, on_metrics=_train_progress(cfg.train.steps),
                  wait=wait_s(wait), node_rank=node_rank)
    s = manifest_summary(m)
    emit(s, as_json, f"{m.uri}: step {m.step} ({cfg.train.method}), {s['num_files']} files, {s['size_bytes']} bytes")


def _train_progress(total: int):
    """`ckptflow train` says what it does: ckptflow's INFO lines (where it resumes from, each
    checkpoint) unless CKPTFLOW_LOG says otherwise, and the progress: tqdm's bar on a terminal,
    else a line every ~5% of the steps with loss, lr and tokens/s."""
    import os

    from ckptflow import progress

    if "CKPTFLOW_LOG" not in os.environ:
        logging.getLogger("ckptflow").setLevel(logging.INFO)
    return None if sys.stderr.isatty() else progress.StepLines(total, logging.getLogger("ckptflow.trainer"))


@app.command()
def merge(adapter: str, base: str, dst: str, overwrite: bool = typer.Option(False, "--overwrite"), wait: bool = WAIT,
          as_json: bool = JSON):
    """Merge ADAPTER (LoRA step, PEFT or torchtune adapter) into BASE ("-": the base it names) as a tune dir."""
    from ckptflow.stages import merge as stage

    m = stage.run(adapter, base, dst, overwrite=overwrite, wait=wait_s(wait))
    s = manifest_summary(m)
    emit(s, as_json, f"{m.uri}: {m.format} {m.family} {m.dtype}, merged {m.extra.get('merged', {}).get('adapter')}")


@app.command()
def export(src: str, dst: str,
           format: str = typer.Option("original", "--format", help="original | hf | meta | peft | gguf"),
           step: Optional[int] = typer.Option(None, "--step", help="a run's step (default: the newest committed)"),
           dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16 | float16 | float32 (default: keep); "
                                                "gguf: f32 | f16 | bf16 | q8_0"),
           base: Optional[str] = typer.Option(None, "--base", help="the base model of an adapter (default: the one it names)"),
           overwrite: bool = typer.Option(False, "--overwrite", help="replace a committed destination"),
           wait: bool = WAIT, as_json: bool = JSON):
    """Export SRC (a run, a step, a model or an adapter) to DST in a format other tools load as is."""
    from ckptflow.stages import export as stage

    m = stage.run(src, dst, format=format, step=step, dtype=dtype, base=base, overwrite=overwrite, wait=wait_s(wait))
    s = manifest_summary(m)
    emit(s, as_json, f"{m.uri}: {m.format} {m.family} {m.dtype} step={m.step}, {s['num_files']} files")


@app.command()
def run(config: str = typer.Argument(..., help="run config YAML (any fsspec URI)"),
        overrides: Optional[list[str]] = typer.Argument(None, help="dotted KEY=VALUE overrides, e.g. train.steps=100"),
        as_json: bool = JSON):
    """Run the whole pipeline as the Prefect flow `finetune`; a failed run started again resumes.

    Uses the Prefect server at PREFECT_API_URL, else an embedded API server of its own."""
    from ckptflow import config as cfg_mod
    from ckptflow import credentials
    from ckptflow.api_server import prefect_api
    from ckptflow.settings import apply_prefect_defaults

    cfg = cfg_mod.load_config(config, overrides or [])   # bad config: one line, before Prefect starts
    apply_prefect_defaults()
    # Literal credentials stay in this process (its environment); the flow gets references.
    cfg = cfg.model_copy(update={"storage_options": credentials.stash(cfg.storage_options)})
    _hand_logging_to_prefect()
    with prefect_api():     # PREFECT_API_URL, else an embedded server that dies with this process
        from flows.finetune import finetune

        try:
            out = finetune(cfg)
        finally:
            _flush_prefect()
    emit(out, as_json, f"run: {out['run']}\nsummary: {out['summary']}\nexport: {out['export']}")


def _flush_prefect() -> None:
    """Send the run's last log lines and events while its API is still up: at interpreter exit
    Prefect would send them to an embedded server already stopped ("Error logging to API")."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    except Exception:  # noqa: BLE001 - best effort: the run itself is done either way
        logging.getLogger(__name__).debug("flushing Prefect's log and event workers failed", exc_info=True)


@app.command()
def serve(prefect_file: str = typer.Option("deployments/prefect.yaml", "--prefect-file", help="deployments to serve"),
          limit: Optional[int] = typer.Option(None, "--limit", help="at most this many flow runs at once")):
    """Serve the deployments of prefect.yaml from this process (needs a Prefect server: PREFECT_API_URL)."""
    from ckptflow.settings import apply_prefect_defaults

    apply_prefect_defaults()
    _hand_logging_to_prefect()
    from flows import deploy

    deploy.serve(prefect_file, limit=limit)


def _hand_logging_to_prefect() -> None:
    # Prefect keeps a root handler it finds; without ours, its console shows which task run
    # logged each line.
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)


def _setup_logging() -> None:
    import os

    level = os.environ.get("CKPTFLOW_LOG", "WARNING").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    from ckptflow import lease

    args = sys.argv[1:] if argv is None else argv
    lease.OWNER = f"ckptflow {args[0]}" if args and not args[0].startswith("-") else "ckptflow"
    try:
        # standalone_mode=False: click returns the code of a typer.Exit instead of raising it
        rc = app(args=argv, standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except CkptError as e:
        sys.stderr.write(f"ckptflow: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n")
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("ckptflow: aborted\n")
        return 130
    except Exception as e:  # noqa: BLE001 - the top of the program: report and exit 1
        if hasattr(e, "show") and hasattr(e, "exit_code"):   # a usage error (typer vendors click)
            e.show()
            return 2
        logging.getLogger("ckptflow").exception("internal error")
        return 1


if __name__ == "__main__":
    sys.exit(main())
