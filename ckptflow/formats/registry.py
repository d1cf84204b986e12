"""Every format in one table, and what goes through it: sniff, detect, open and write.

A format is one module (its sniff, open, write and describe functions) and one line in FORMATS.
Directory detection asks every format's sniff: no match is an error that lists what was found,
two matches an error that names both (never a guess), unless one format claims the other's
files (torchtune's output directories carry an HF checkpoint and a PEFT adapter beside its own).
A committed ckptflow directory is identified by its manifest alone.

Readers that open a second directory (an adapter's base model) get `opener=open_view`, so no
format module imports this one.
"""
from __future__ import annotations

from ckptflow import manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats import adapter, arch, dcp, gguf, hf, litgpt, meta, peft, torchtune, tune
from ckptflow.formats.view import Detection, Format, View


def _open_adapter_view(uri: str, *, base: str | View | None = None, **_) -> View:
    """An adapter (a LoRA step, a PEFT or torchtune adapter) merged lazily into its base."""
    ad, bv = open_adapter(uri, base)
    return adapter.merged_view(bv, ad)


def _open_tune(uri: str, *, base: str | View | None = None, **_) -> View:
    m = manifest.read(uri)
    if m is not None and m.kind == "train_state" and m.extra.get("lora"):
        return _open_adapter_view(uri, base=base)    # a LoRA step holds only the adapter
    return tune.open_view(uri)


def _open_dcp(uri: str, *, base: str | View | None = None, **opts) -> View:
    m = manifest.read(uri)
    if m is not None and m.kind == "train_state" and m.extra.get("lora"):
        return _open_adapter_view(uri, base=base)    # a LoRA step of several processes: the adapter's shards
    return dcp.open_view(uri, **opts)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("hf", sniff=hf.is_hf, open=hf.open_view, write=hf.write_view, describe=hf.describe),
    Format("tune", open=_open_tune, write=tune.write_view),
    Format("peft", sniff=peft.is_peft, open=_open_adapter_view, write=peft.write_view, describe=peft.describe),
    Format("meta", sniff=meta.is_meta, open=meta.open_view, write=meta.write_view, describe=meta.describe),
    Format("dcp", sniff=dcp.is_dcp, open=_open_dcp, write=dcp.write_view, describe=dcp.describe),
    Format("torchtune", sniff=torchtune.is_torchtune, open=torchtune.open_view, describe=torchtune.describe,
           claims=("hf", "peft")),
    Format("litgpt", sniff=litgpt.is_litgpt, open=litgpt.open_view, describe=litgpt.describe),
    Format("gguf", write=gguf.write_view),      # export only: llama.cpp / Ollama
)}


def writable() -> list[str]:
    """The formats ckptflow writes, sorted."""
    return sorted(name for name, f in FORMATS.items() if f.write is not None)


def sniff(uri: str, *, interrupted_ok: bool = True) -> str:
    """The format name of directory `uri`. With interrupted_ok=False (readers that are about to
    use the checkpoint) a directory that ckptflow began writing and never committed is refused."""
    uri = storage.normalize(uri)
    m = manifest.read(uri)
    if m is not None:
        return m.format
    names = storage.listdir(uri)
    if not names:
        if storage.isfile(uri):
            raise CkptError(f"{uri}: is a file; give the directory that holds the checkpoint")
        raise CkptError(f"{uri}: empty or missing directory")
    if manifest.MARKER in names and not interrupted_ok:   # ckptflow began writing here and never committed
        raise CkptError(f"{uri}: an interrupted ckptflow write ({manifest.MARKER}, no {manifest.NAME}); "
                        "re-run the stage that writes it, or delete it with `ckptflow gc`")
    hits = [f.name for f in FORMATS.values() if f.sniff is not None and f.sniff(names)]
    hits = [h for h in hits if not any(h in FORMATS[other].claims for other in hits)]
    if not hits:
        raise CkptError(f"{uri}: no known checkpoint format (found: {', '.join(names[:12])}"
                        + (", ..." if len(names) > 12 else "") + ")")
    if len(hits) > 1:
        raise CkptError(f"{uri}: ambiguous, matches formats {' and '.join(hits)} (found: {', '.join(names[:12])})")
    return hits[0]


def open_view(uri: str, **opts) -> View:
    """Any checkpoint directory ckptflow reads, as a View. Reader options: base (an adapter's base
    model), model_config (a config file or model directory for weights that carry none), epoch,
    rope_scaling_factor."""
    fmt = sniff(uri, interrupted_ok=False)
    f = FORMATS.get(fmt)
    if f is None or f.open is None:
        raise CkptError(f"{uri}: reading format {fmt!r} is not supported")
    model_config = opts.get("model_config")
    if isinstance(model_config, str) and storage.isdir(model_config):   # a model directory: read it here
        view = open_view(model_config)
        opts = dict(opts, model_config=arch.Arch(view.family, view.args, dict(view.assets), view.original,
                                                 storage.normalize(model_config)))
    return f.open(uri, opener=open_view, **opts)


def write(fmt: str, view: View, out, *, out_dtype: str | None = None, max_shard: int | None = None,
          progress=None):
    """Write `view` in format `fmt` into commit.Output `out`; the manifest, not yet committed."""
    f = FORMATS.get(fmt)
    if f is None or f.write is None:
        raise CkptError(f"writing format {fmt!r} is not available (available: {', '.join(writable())})")
    return f.write(view, out, out_dtype=out_dtype, max_shard=max_shard, progress=progress)


def open_adapter(uri: str, base: str | View | None = None) -> tuple[adapter.Adapter, View]:
    """(the adapter at `uri`, its base model's View). `base` overrides the base the adapter names."""
    uri = storage.normalize(uri)
    m = manifest.read(uri)
    if m is not None and m.kind == "train_state":
        bv = adapter.base_view(base, adapter.step_bases(m), uri, open_view)
        return adapter.from_step(uri, m, bv), bv
    names = storage.listdir(uri)
    if m is None and torchtune.is_adapter(uri):
        # torchtune's own adapter file (tune names) wins over the PEFT copy it writes beside it,
        # whose q/k rows torchtune permutes even for Qwen2 (docs/formats.md).
        return torchtune.read_adapter(uri, base, open_view)
    if (m is not None and m.format == "peft") or peft.is_peft(names):
        named = [m.extra.get("base") if m else None, peft.read_config(uri).get("base_model_name_or_path")]
        bv = adapter.base_view(base, named, uri, open_view)
        return peft.open_adapter(uri, bv.family, bv.args, base=bv.uri), bv
    raise CkptError(f"{uri}: not a LoRA adapter (a LoRA step checkpoint, a PEFT adapter directory "
                    f"or a torchtune adapter); found {', '.join(names[:8]) or 'nothing'}")


def detect(uri: str) -> Detection:
    """Format, family, dtype, parameter count and files of a checkpoint directory (or of the
    model a seed:// URI generates, or of a run's newest committed step)."""
    if uri.startswith("seed://"):
        from ckptflow import seed

        return seed.describe(uri)
    uri = storage.normalize(uri)
    m = manifest.read(uri)
    if m is None and _is_run(uri):
        return _describe_run(uri)
    fmt = sniff(uri)
    if m is not None:
        args = m.model_args or {}
        from ckptflow.model_args import ModelArgs

        n = ModelArgs.from_dict(args).num_params() if args else None
        return Detection(m.format, uri, m.family, m.dtype, n, sorted(m.files), {"kind": m.kind, "step": m.step})
    f = FORMATS.get(fmt)
    if f is None or f.describe is None:
        return Detection(fmt, uri, files=storage.list_files(uri))
    return f.describe(uri)


def _is_run(uri: str) -> bool:
    from ckptflow import checkpointer

    return checkpointer.is_run(uri)


def _describe_run(uri: str) -> Detection:
    """A run directory: its newest committed step, as export and generate would take it."""
    from ckptflow import checkpointer

    step = checkpointer.newest_of_run(uri)
    d = detect(step.uri)
    d.details["checkpoint"] = f"{step.uri} (step {step.step}, the newest committed step of run {uri})"
    d.details["run"] = uri
    return d
