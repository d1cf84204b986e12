"""Merge a LoRA adapter into its base model, streaming one tensor at a time.

    ckptflow merge ADAPTER BASE DST      # BASE "-": the base the adapter names

ADAPTER is a LoRA step checkpoint (`train/step-000050`, base from its `extra.base`), a PEFT
adapter directory, or an imported torchtune adapter. Each targeted weight becomes
W' = W + scale * B @ A, computed in float32 and cast to the base dtype (ckptflow.lora.merge_lora
does the arithmetic, one module at a time); every other tensor is copied as raw bytes. The
output is a tune directory with the base's layout, original format and assets, so export
writes the original format back. The manifest records the adapter's content fingerprint in its
lineage; merging the same adapter into that output again is refused.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging

from ckptflow import manifest, progress, storage
from ckptflow.commit import Output
from ckptflow.errors import CkptError
from ckptflow.formats import WRITERS, View, open_view, peft, st
from ckptflow.formats.peft import Adapter, LoraModule
from ckptflow.formats.plan import Item
from ckptflow.lineage import source_ref
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

SUFFIXES = {"a": ".lora_a.weight", "b": ".lora_b.weight"}


def run(adapter: str, base: str | None, dst: str, *, overwrite: bool = False) -> Manifest:
    dst = storage.normalize(dst)
    ad, base_view = open_adapter(adapter, None if base in (None, "", "-") else base)
    if dst in (ad.uri, base_view.uri):
        raise CkptError(f"{dst}: the destination is the adapter or the base itself")
    inputs = {"adapter": adapter_ref(ad), "base": source_ref(base_view)}
    params: dict = {}
    existing = manifest.read(dst)
    if manifest.matches(existing, inputs, params):
        log.info("%s: already merged from %s; nothing to do", dst, ad.uri)
        return existing
    fp = ad.content_fingerprint()
    view = merged_view(base_view, ad, fp)     # refuses an adapter that is merged in already
    out = Output(dst, overwrite=overwrite or existing is not None)
    with progress.bar(sum(it.out_nbytes for it in view.items.values()), "merge") as bar:
        m = WRITERS["tune"](view, out, out_dtype=None, max_shard=None, progress=bar)
    m.inputs, m.params, m.step = inputs, params, ad.step
    m.lineage = lineage(base_view, ad, fp, dst)
    m.extra["merged"] = {"adapter": ad.uri, "format": ad.format, "fingerprint": fp, **ad.lora_config()}
    return out.commit(m)


# --- the arithmetic -------------------------------------------------------------------------

def merge_weight(w, a, b, module: LoraModule, use_rslora: bool):
    """W + scale * B @ A for one module, in float32, cast back to W's dtype (ckptflow.lora's math)."""
    from ckptflow import lora

    cfg = lora.LoraConfig(rank=module.rank, alpha=module.alpha, use_rslora=use_rslora)
    return lora.merge_lora({"m.weight": w}, {"m.lora_a.weight": a, "m.lora_b.weight": b}, cfg)["m.weight"]


def tensor(it: Item, handles: dict):
    """One Item as a torch tensor in tune layout and its source dtype."""
    from ckptflow.formats.plan import _transformed_bytes

    return st.to_torch(_transformed_bytes(peft._plain(it), handles), it.dtype, it.shape)


def _merged_tensor(w_item: Item, module: LoraModule, use_rslora: bool):
    handles: dict = {}
    try:
        w, a, b = (tensor(it, handles) for it in (w_item, module.a, module.b))
    finally:
        for f in handles.values():
            f.close()
    return merge_weight(w, a, b, module, use_rslora)


def merged_view(base_view: View, ad: Adapter, fp: str | None = None) -> View:
    """The base with every targeted weight replaced by a lazy merged tensor; `adapter` kept for
    writers that want it unmerged (peft). Its manifest (not committed anywhere) names base and
    adapter as inputs and carries the merge in its lineage, so whatever writes this view (convert,
    export) is idempotent per adapter and records the merge."""
    if ad.family.NAME != base_view.family.NAME or ad.args.to_dict() != base_view.args.to_dict():
        raise CkptError(f"{ad.uri}: adapter was read for a {ad.family.NAME} model that differs from "
                        f"the base {base_view.uri} ({base_view.family.NAME})")
    items = dict(base_view.items)
    for path, m in ad.modules.items():
        key = path + ".weight"
        if key not in items:
            tied = " (the output head is tied to tok_embeddings)" if key == "output.weight" else ""
            raise CkptError(f"{ad.uri}: adapter module {path!r} has no base weight {key!r} in {base_view.uri}{tied}")
        w = items[key]
        items[key] = Item(key, w.dtype, list(w.shape), load=functools.partial(_merged_tensor, w, m, ad.use_rslora))
    fp = fp or ad.content_fingerprint()
    refuse_remerge(base_view, ad, fp)
    m = merged_manifest(base_view, ad, fp)
    return View(base_view.uri, base_view.format, base_view.family, base_view.args, items, base_view.original,
                dict(base_view.assets), manifest=m, partition=base_view.partition,
                notes=list(base_view.notes), adapter=ad)


def merged_manifest(bv: View, ad: Adapter, fp: str) -> Manifest:
    bm = bv.manifest
    m = Manifest(kind="model", format=bv.format, family=bv.family.NAME, model_args=bv.args.to_dict(),
                 dtype=bm.dtype if bm is not None else None, step=ad.step,
                 inputs={"base": source_ref(bv), "adapter": adapter_ref(ad)}, lineage=lineage(bv, ad, fp, None),
                 extra={"merged": {"adapter": ad.uri, "format": ad.format, "fingerprint": fp, **ad.lora_config()}})
    m.uri = ad.uri
    return m


# --- reading adapters -----------------------------------------------------------------------

def open_adapter(uri: str, base: str | View | None = None) -> tuple[Adapter, View]:
    """(the adapter at `uri`, its base model's View). `base` overrides the base the adapter names."""
    uri = storage.normalize(uri)
    m = manifest.read(uri)
    if m is not None and m.kind == "train_state":
        bv = base_view(base, [m.extra.get("base"), (m.inputs.get("base") or {}).get("uri")], uri)
        return from_step(uri, m, bv), bv
    names = storage.listdir(uri)
    torchtune = _torchtune()
    if torchtune is not None and m is None and torchtune.is_adapter(uri):
        # torchtune's own adapter file (tune names) wins over the PEFT copy it writes beside it,
        # whose q/k rows torchtune permutes even for Qwen2 (formats.md 4.6).
        return torchtune.read_adapter(uri, base)
    if (m is not None and m.format == "peft") or peft.is_peft(names):
        named = [m.extra.get("base") if m else None, peft.read_config(uri).get("base_model_name_or_path")]
        bv = base_view(base, named, uri)
        return peft.open_adapter(uri, bv.family, bv.args, base=bv.uri), bv
    raise CkptError(f"{uri}: not a LoRA adapter (a LoRA step checkpoint, a PEFT adapter directory "
                    f"or a torchtune adapter); found {', '.join(names[:8]) or 'nothing'}")


def base_view(base: str | View | None, named: list, where: str) -> View:
    if isinstance(base, View):
        return base
    if base:
        return open_view(base)
    for cand in named:
        if cand and storage.isdir(cand):
            return open_view(cand)
    hint = next((c for c in named if c), None)
    raise CkptError(f"{where}: its base model {hint!r} is not a directory here; give the base model "
                    "(ckptflow merge ADAPTER BASE DST, or --base)" if hint else
                    f"{where}: names no base model; give it (ckptflow merge ADAPTER BASE DST, or --base)")


def from_step(uri: str, m: Manifest, bv: View) -> Adapter:
    """The adapter of a LoRA step checkpoint: model.safetensors in tune names, extra.lora settings."""
    lora = m.extra.get("lora")
    if not lora:
        raise CkptError(f"{uri}: step {m.step} is a full fine-tune checkpoint, not a LoRA adapter")
    path = storage.join(uri, "model.safetensors")
    items = [Item(t.name, t.dtype, t.shape, info=t) for t in st.read_header(path)[1]]
    ad = from_items(uri, items, lora, bv, "tune", where=path)
    ad.step, ad.manifest = m.step, m
    return ad


def from_items(uri: str, items: list[Item], lora: dict, bv: View, fmt: str, where: str) -> Adapter:
    """An Adapter from tune-named lora_a/lora_b Items (a step checkpoint, a torchtune adapter file)
    and {rank, alpha, use_rslora, dropout}; shapes are checked against the base."""
    groups: dict[str, dict] = {}
    for it in items:
        part = next((p for p, s in SUFFIXES.items() if it.name.endswith(s)), None)
        if part is None:
            raise CkptError(f"{where}: tensor {it.name!r} is not a LoRA weight (…lora_a.weight / …lora_b.weight)")
        groups.setdefault(it.name[: -len(SUFFIXES[part])], {})[part] = it
    if not groups:
        raise CkptError(f"{where}: holds no lora_a/lora_b tensors")
    rank, alpha, rslora = int(lora["rank"]), float(lora["alpha"]), bool(lora.get("use_rslora"))
    modules = {path: tune_module(bv.args, path, ab, rank, alpha, rslora, where) for path, ab in groups.items()}
    return Adapter(uri, fmt, bv.family, bv.args, modules, rank, alpha, use_rslora=rslora,
                   dropout=float(lora.get("dropout") or 0.0), base=bv.uri)


def tune_module(args, module: str, ab: dict, rank: int, alpha: float, rslora: bool, where: str) -> LoraModule:
    """One module of a tune-named adapter, its shapes checked against the base."""
    for part in "ab":
        if part not in ab:
            raise CkptError(f"{where}: module {module!r} has no {SUFFIXES[part][1:]}")
    out_f, in_f = peft.base_shape(args, module + ".weight")
    for it, want in ((ab["a"], [rank, in_f]), (ab["b"], [out_f, rank])):
        if list(it.shape) != want:
            raise CkptError(f"{where}: tensor {it.name!r} has shape {list(it.shape)}, expected {want} "
                            f"(rank {rank}, base {module}.weight [{out_f}, {in_f}])")
    return LoraModule(ab["a"], ab["b"], rank, alpha, peft.scale(rank, alpha, rslora))


def _torchtune():
    try:
        from ckptflow.formats import torchtune
    except ImportError:     # the importer is optional: merge works without it
        return None
    return torchtune if hasattr(torchtune, "read_adapter") and hasattr(torchtune, "is_adapter") else None


# --- identity and lineage -------------------------------------------------------------------

def adapter_ref(ad: Adapter) -> dict:
    """How the merged manifest names its adapter: the manifest's fingerprint, or for a foreign
    directory a digest of its files' contents (adapters are small; names and sizes are not enough
    to tell two adapters of the same shape apart)."""
    if ad.manifest is not None:
        return manifest.input_ref(ad.manifest)
    digests = {name: storage.file_digest(storage.join(ad.uri, name))["sha256"]
               for name in storage.list_files(ad.uri) if not name.startswith(".")}
    h = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    return {"uri": ad.uri, "fingerprint": "sha256:" + h}


def merges_of(m: Manifest | None) -> list[dict]:
    """The merge stages in a manifest's lineage (a merged model carries them through convert/export)."""
    stages = (m.lineage or {}).get("stages", []) if m is not None else []
    return [s for s in stages if isinstance(s, dict) and s.get("stage") == "merge"]


def refuse_remerge(bv: View, ad: Adapter, fp: str) -> None:
    for s in merges_of(bv.manifest):
        if s.get("adapter_fingerprint") == fp:
            raise CkptError(f"{bv.uri}: already has adapter {ad.uri} merged in (merge recorded at {s.get('uri')}); "
                            "merging it again would apply its update twice")


def merge_stage(ad: Adapter, fp: str, dst: str | None, base_format: str) -> dict:
    stage = {"stage": "merge", "from": base_format, "to": "tune", "uri": dst, "adapter": ad.uri,
             "adapter_format": ad.format, "adapter_fingerprint": fp}
    if ad.step is not None:
        stage["step"] = ad.step
    return stage


def adapter_lineage(bv: View, ad: Adapter) -> dict:
    """Source and revision of the base and how the adapter came to be (a step records its
    training); an adapter that records nothing starts from its base's lineage."""
    own = (ad.manifest.lineage if ad.manifest is not None else None) or {}
    lin = dict(own if own.get("stages") else (bv.manifest.lineage if bv.manifest is not None else None) or {})
    lin.setdefault("source", bv.uri)
    lin.setdefault("revision", None)
    lin["stages"] = list(lin.get("stages", []))
    if ad.manifest is not None and ad.manifest.kind == "train_state":
        lin["run"] = ad.manifest.extra.get("run") or run_of(ad.uri)
        lin["step"] = ad.step
    return lin


def lineage(bv: View, ad: Adapter, fp: str, dst: str | None) -> dict:
    lin = adapter_lineage(bv, ad)
    lin["stages"].append(merge_stage(ad, fp, dst, bv.format))
    return lin


def run_of(step_uri: str) -> str | None:
    """{run}/train/step-000050 -> {run}."""
    parent = storage.parent(step_uri)
    return storage.parent(parent) if storage.basename(parent) == "train" else None
