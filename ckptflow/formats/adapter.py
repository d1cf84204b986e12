"""LoRA adapters, whatever holds them (a LoRA step checkpoint, a PEFT directory, a torchtune
adapter file): the Adapter they read into, its identity, and the base model with the adapter
merged in lazily (`merged_view`), which merge, convert and export write like any other view.

An Adapter is per tune module ("layers.0.attn.q_proj") its lora_a [r, in] and lora_b [out, r] as
lazy Items in tune layout, with that module's own rank, alpha and scale. Each targeted weight
of the merged view is W' = W + scale * B @ A, computed in float32 and cast to the base dtype
(ckptflow.lora.merge_lora does the arithmetic, one module at a time).

Opening a base model of any format is the caller's: functions that need one take `opener`
(formats.registry.open_view), so this module needs no format but the tune checkpoint's own.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field

from ckptflow import manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats.view import Item, View, cast, tensor_bytes
from ckptflow.formats.view import tensor as view_tensor
from ckptflow.lineage import source_ref
from ckptflow.manifest import Manifest

SUFFIXES = {"a": ".lora_a.weight", "b": ".lora_b.weight"}


@dataclass
class LoraModule:
    a: Item          # lora_a [rank, in]
    b: Item          # lora_b [out, rank], rows in tune layout
    rank: int
    alpha: float
    scale: float
    fused: str | None = None     # the fused HF module (Phi-3 qkv_proj) whose lora_A this part shares


@dataclass
class Adapter:
    uri: str
    format: str                          # "peft" | "tune" (a LoRA step) | "torchtune"
    family: object
    args: object                         # the base model's ModelArgs
    modules: dict[str, LoraModule]       # tune module path -> its tensors and scale, in file order
    rank: int
    alpha: float
    use_rslora: bool = False
    dropout: float = 0.0
    base: str | None = None              # the base model as the adapter names it
    step: int | None = None
    config: dict = field(default_factory=dict)   # adapter_config.json as read (PEFT sources)
    manifest: Manifest | None = None

    @property
    def targets(self) -> list[str]:
        """Tune module names (q_proj, ..., output) that carry LoRA, in first-seen order."""
        return list(dict.fromkeys(m.rsplit(".", 1)[-1] for m in self.modules))

    def lora_config(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": self.targets,
                "use_rslora": self.use_rslora}

    def items(self) -> dict[str, Item]:
        """The adapter as tune-named tensors (what a LoRA step checkpoint holds)."""
        out = {}
        for m in self.modules.values():
            out[m.a.name], out[m.b.name] = m.a, m.b
        return out

    def content_fingerprint(self) -> str:
        """Identity of the adapter's numbers, whatever container holds them (a step, a PEFT dir,
        a torchtune file): scales and the A/B bytes in tune layout. Merge records it and refuses
        to merge the same adapter twice."""
        h, handles = hashlib.sha256(), {}
        try:
            for path, m in sorted(self.modules.items()):
                h.update(f"{path}\0{m.scale!r}\0{m.a.dtype}{m.a.shape}{m.b.dtype}{m.b.shape}\n".encode())
                for it in (m.a, m.b):
                    h.update(tensor_bytes(cast(it, None), handles))
        finally:
            for f in handles.values():
                f.close()
        return "lora:" + h.hexdigest()


def scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling (tuners/lora/layer.py update_layer): alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def base_shape(args, tune_weight_key: str) -> list[int]:
    """[out, in] of the base weight a LoRA module adapts (the tied output head included)."""
    from ckptflow.model_args import expected_shapes

    if tune_weight_key == "output.weight":
        return [args.vocab_size, args.dim]
    shape = expected_shapes(args).get(tune_weight_key)
    if shape is None or len(shape) != 2:
        raise CkptError(f"LoRA target {tune_weight_key!r} is not a linear weight of this model")
    return shape


# --- the arithmetic -------------------------------------------------------------------------

def merge_weight(w, a, b, module: LoraModule, use_rslora: bool):
    """W + scale * B @ A for one module, in float32, cast back to W's dtype (ckptflow.lora's math)."""
    from ckptflow import lora

    cfg = lora.LoraConfig(rank=module.rank, alpha=module.alpha, use_rslora=use_rslora)
    return lora.merge_lora({"m.weight": w}, {"m.lora_a.weight": a, "m.lora_b.weight": b}, cfg)["m.weight"]


def tensor(it: Item, handles: dict):
    """One Item as a torch tensor in tune layout and its source dtype."""
    return view_tensor(cast(it, None), handles)


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
                 inputs={"base": source_ref(bv), "adapter": adapter_ref(ad)}, lineage=merge_lineage(bv, ad, fp, None),
                 extra={"merged": {"adapter": ad.uri, "format": ad.format, "fingerprint": fp, **ad.lora_config()}})
    m.uri = ad.uri
    return m


# --- reading adapters -----------------------------------------------------------------------

def base_view(base: str | View | None, named: list, where: str, opener) -> View:
    """The base model: `base` (a View, or a directory opened with `opener`), else the first of the
    directories the adapter names that exists here."""
    if isinstance(base, View):
        return base
    if base:
        return opener(base)
    for cand in named:
        if cand and storage.isdir(cand):
            return opener(cand)
    hint = next((c for c in named if c), None)
    raise CkptError(f"{where}: its base model {hint!r} is not a directory here; give the base model "
                    "(ckptflow merge ADAPTER BASE DST, or --base)" if hint else
                    f"{where}: names no base model; give it (ckptflow merge ADAPTER BASE DST, or --base)")


def step_bases(m: Manifest) -> list:
    """The base models a step checkpoint names, in the order to try them."""
    return [m.extra.get("base"), (m.inputs.get("base") or {}).get("uri")]


def from_step(uri: str, m: Manifest, bv: View) -> Adapter:
    """The adapter of a LoRA step checkpoint (model.safetensors in tune names, or the "model"
    entries of the DCP step several processes wrote), with its extra.lora settings."""
    from ckptflow.formats import step

    lora = m.extra.get("lora")
    if not lora:
        raise CkptError(f"{uri}: step {m.step} is a full fine-tune checkpoint, not a LoRA adapter")
    items = list(step.weights(uri, m).values())
    ad = from_items(uri, items, lora, bv, "tune", where=step.where(uri, m))
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
    out_f, in_f = base_shape(args, module + ".weight")
    for it, want in ((ab["a"], [rank, in_f]), (ab["b"], [out_f, rank])):
        if list(it.shape) != want:
            raise CkptError(f"{where}: tensor {it.name!r} has shape {list(it.shape)}, expected {want} "
                            f"(rank {rank}, base {module}.weight [{out_f}, {in_f}])")
    return LoraModule(ab["a"], ab["b"], rank, alpha, scale(rank, alpha, rslora))


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
        lin["run"] = ad.manifest.extra.get("run") or run_of_step(ad.uri)
        lin["step"] = ad.step
    return lin


def merge_lineage(bv: View, ad: Adapter, fp: str, dst: str | None) -> dict:
    lin = adapter_lineage(bv, ad)
    lin["stages"].append(merge_stage(ad, fp, dst, bv.format))
    return lin


def run_of_step(step_uri: str) -> str | None:
    """{run}/train/step-000050 -> {run}."""
    parent = storage.parent(step_uri)
    return storage.parent(parent) if storage.basename(parent) == "train" else None
