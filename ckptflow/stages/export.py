"""Export a model or an adapter in a format other tools load as is, streaming one tensor at a time.

    ckptflow export SRC DST [--format original|hf|meta|peft|gguf] [--step N] [--dtype D] [--base BASE]

SRC is a run directory (its newest committed step, or --step N), a step checkpoint, a tune
directory, an HF or Meta directory, or an adapter (LoRA step, PEFT, torchtune). A LoRA adapter is
merged on the fly for hf/meta/original (one tensor at a time, nothing written in between) and
written unmerged for peft. `original` is the format the model came in (the tune manifest's
`extra.original.format`; PEFT for a PEFT adapter). HF output reproduces the source's key names,
order, partition, index, config and tokenizer files (formats.hf.write_view); --dtype casts every
tensor and updates config.json. GGUF output is one .gguf file for llama.cpp / Ollama (with a
Modelfile), --dtype f32 | f16 | bf16 | q8_0 (formats/gguf.py); the adapter is merged into it.

ckptflow.json of the export (kind "export") records the lineage: source model and revision, the
run, the step, every stage the weights went through, and the dtype.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ckptflow import commit, manifest, progress, storage
from ckptflow.commit import Output
from ckptflow.errors import CkptError
from ckptflow.formats import registry, st
from ckptflow.formats.registry import open_adapter, open_view
from ckptflow.formats.adapter import adapter_lineage, base_view, merged_view, run_of_step
from ckptflow.formats.view import Item, View
from ckptflow.lineage import dtype_code, source_ref
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

FORMATS = ("original", "hf", "meta", "peft", "tune", "gguf")


@dataclass
class Source:
    uri: str                      # what SRC resolved to (a run resolves to one of its steps)
    view: View                    # the model to write (a LoRA adapter merged lazily; view.adapter kept)
    manifest: Manifest | None     # SRC's own manifest (the step's, for a run)
    base: View | None = None      # the base model, when SRC holds only part of it (steps, adapters)
    run: str | None = None
    step: int | None = None


def run(src: str, dst: str, *, format: str = "original", step: int | None = None, dtype: str | None = None,
        base: str | None = None, overwrite: bool = False, wait: float = 0.0) -> Manifest:
    from ckptflow.formats import hf

    src, dst = storage.normalize(src), storage.normalize(dst)
    if src == dst:
        raise CkptError(f"{dst}: source and destination are the same directory")
    damaged: set[str] = set()
    try:
        while True:
            try:
                return _run(src, dst, format, step, dtype, base, overwrite, wait, damaged)
            except manifest.Damaged as e:   # a run's newest step: the next older one, as resume would
                if step is not None or e.uri in damaged or not is_run(src):
                    raise
                log.warning("%s: skipping a damaged checkpoint (%s)", e.uri, e.problems[0])
                damaged.add(e.uri)
    finally:
        hf.drop_copies()     # local copies of remote .bin/.pth files: fetched once, freed here


def _run(src: str, dst: str, format: str, step: int | None, dtype: str | None, base: str | None,
         overwrite: bool, wait: float, damaged: set[str] = frozenset()) -> Manifest:
    source = resolve(src, step=step, base=base, adapter=format == "peft", damaged=damaged)
    fmt = target_format(format, source)
    out_dtype, prepared = (None, _gguf(source.view, dtype)) if fmt == "gguf" else (dtype_code(dtype), None)
    if prepared is not None:
        dtype = prepared.dtype
    inputs = {"source": source_ref(source.view) if source.manifest is None else manifest.input_ref(source.manifest)}
    if source.base is not None:
        inputs["base"] = source_ref(source.base)
    params = {"format": fmt, "dtype": dtype, "step": source.step}
    existing = commit.reusable(dst, manifest.read(dst), inputs, params, overwrite=overwrite)
    if existing is not None:
        log.info("%s: already exported from %s; nothing to do", dst, source.uri)
        return existing
    items = source.view.adapter.items().values() if fmt == "peft" and source.view.adapter else source.view.items.values()
    total = prepared.nbytes if prepared is not None else sum(_nbytes(it, out_dtype) for it in items)
    with Output(dst, overwrite=overwrite, wait=wait, expect=(inputs, params)) as out:
        if out.done is not None:     # another writer committed the same while we waited
            return out.done
        out.reserve(total)
        with manifest.checked_while(source.manifest, source.view.read_uris()), \
                progress.bar(total, f"export -> {fmt}") as bar:
            if prepared is not None:
                from ckptflow.formats import gguf

                m = gguf.write_view(source.view, out, progress=bar, prepared=prepared)
            else:
                m = registry.write(fmt, source.view, out, out_dtype=out_dtype, progress=bar)
        m.kind, m.inputs, m.params, m.step = "export", inputs, params, source.step
        m.lineage = lineage(source, fmt, dst, m.dtype)
        return out.commit(m)


def _gguf(view: View, dtype: str | None):
    """The GGUF file planned (dtype, tensors, tokenizer): a bad key or tokenizer fails before DST
    is touched."""
    from ckptflow.formats import gguf

    return gguf.prepare(view, dtype)


def _nbytes(it: Item, out_dtype: str | None) -> int:
    return it.out_nbytes // st.DTYPE_SIZE[it.final_dtype] * st.DTYPE_SIZE[out_dtype or it.dtype]


# --- what SRC is ----------------------------------------------------------------------------

def resolve(src: str, *, step: int | None = None, base: str | None = None, adapter: bool = False,
            damaged: set[str] = frozenset()) -> Source:
    """What SRC is. `adapter`: prefer the LoRA adapter where a directory holds a model and its
    adapter both (torchtune's LoRA outputs), as a PEFT export wants. A run resolves to its newest
    committed step not in `damaged` (or `step`); its files are checked while they are exported
    (the files the export reads, not the optimizer state), a damaged one fails that write."""
    m = manifest.read(src)
    if m is None and is_run(src):
        from ckptflow import checkpointer

        train = storage.join(src, "train")
        if step is not None:
            sm = checkpointer.find(train, step, verify=False)
        else:
            newest = [uri for _, uri in reversed(checkpointer.list_steps(train)) if uri not in damaged]
            sm = manifest.require(newest[0]) if newest else None
        if sm is None:
            raise CkptError(f"{src}: no committed, verified step checkpoint under train/")
        return from_step(sm.uri, sm, base, run=src)
    if step is not None and (m is None or m.step != step):
        raise CkptError(f"{src}: --step {step} needs a run directory; this is "
                        + (f"step {m.step}" if m is not None and m.step is not None else "not a step checkpoint"))
    if m is not None and m.kind == "train_state":
        return from_step(src, m, base, run=m.extra.get("run") or run_of_step(src))
    if (m is not None and m.format == "peft") or _is_adapter_dir(src, adapter):
        ad, bv = open_adapter(src, base)
        return Source(src, merged_view(bv, ad), m, base=bv, step=ad.step)
    view = open_view(src, **({"base": base} if base else {}))
    lin = (m.lineage if m is not None else None) or {}
    return Source(src, view, m, run=lin.get("run"), step=m.step if m is not None else None)


def is_run(uri: str) -> bool:
    names = storage.listdir(uri)
    return "run.json" in names or "train" in names


def _is_adapter_dir(uri: str, prefer_adapter: bool) -> bool:

    fmt = registry.sniff(uri)
    if fmt == "peft":
        return True
    from ckptflow.formats import torchtune

    # torchtune output: its reader reads the (merged) model beside an adapter, or merges an
    # adapter-only directory onto --base; a PEFT export takes the adapter itself.
    return fmt == "torchtune" and prefer_adapter and torchtune.is_adapter(uri)


def from_step(uri: str, m: Manifest, base: str | None, run: str | None) -> Source:
    if m.extra.get("lora"):
        ad, bv = open_adapter(uri, base)
        return Source(uri, merged_view(bv, ad), m, base=bv, run=run, step=m.step)
    bv = base_view(base, [m.extra.get("base"), (m.inputs.get("base") or {}).get("uri"),
                          storage.join(run, "base") if run else None], uri, open_view)
    return Source(uri, full_step_view(uri, m, bv), m, base=bv, run=run, step=m.step)


def full_step_view(uri: str, m: Manifest, bv: View) -> View:
    """A full fine-tune step (one process's or several processes' DCP): its weights, with the
    base's family, config, tokenizer and layout."""
    from ckptflow.model_args import expected_shapes

    from ckptflow.formats import step

    found = step.weights(uri, m)      # one process's safetensors, or the DCP shards of several
    want = expected_shapes(bv.args)
    for key, it in found.items():
        if key not in want or list(it.shape) != want[key]:
            raise CkptError(f"{uri}: tensor {key!r} {list(it.shape)} does not fit the base model {bv.uri}"
                            + (f" (expects {want[key]})" if key in want else ""))
    missing = [k for k in want if k not in found]
    if missing:
        raise CkptError(f"{uri}: step checkpoint lacks tensor {missing[0]!r}")
    items = {k: found[k] for k in bv.items if k in found} | found
    return View(uri, "tune", bv.family, bv.args, items, bv.original, dict(bv.assets), manifest=m,
                partition=bv.partition)


def target_format(fmt: str, source: Source) -> str:
    if fmt not in FORMATS:
        raise CkptError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
    if fmt == "original":
        ad = source.view.adapter
        if ad is not None and ad.format == "peft" and source.manifest is None:
            fmt = "peft"
        else:
            fmt = (source.view.original or {}).get("format") or source.view.format
    if fmt not in registry.writable():
        raise CkptError(f"{source.uri}: writing format {fmt!r} is not available "
                        f"(available: {', '.join(registry.writable())})")
    return fmt


# --- lineage --------------------------------------------------------------------------------

def lineage(source: Source, fmt: str, dst: str, dtype: str | None) -> dict:
    """Source model and revision, run, step, every stage (download, convert, train, merge), dtype."""
    ad = source.view.adapter
    if ad is not None and fmt == "peft":      # written unmerged: no merge stage
        lin = adapter_lineage(source.base, ad)
    else:                                     # a merged view's manifest already records the merge
        m = source.view.manifest
        lin = dict((m.lineage if m is not None else None) or {})
    lin.setdefault("source", source.view.uri)
    lin.setdefault("revision", None)
    stages = list(lin.get("stages", []))
    stages.append({"stage": "export", "from": source.view.format, "to": fmt, "uri": dst, "dtype": dtype})
    lin.update(stages=stages, run=source.run or lin.get("run"), step=source.step, dtype=dtype)
    return lin
