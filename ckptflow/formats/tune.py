"""The tune format: ckptflow's internal checkpoint.

safetensors shards keyed by ckptflow.model's parameter names (torchtune naming), with
{"format": "pt"} metadata, never pickle; non-weight files of the original (config.json,
tokenizer files, the index) under assets/; and ckptflow.json holding the family, the model
args and `extra.original`: the source format, its key order, file partition and per-file
metadata, so export writes the same files back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ckptflow import manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.formats.plan import write_file
from ckptflow.formats.view import FilePlan, Item
from ckptflow.manifest import Manifest
from ckptflow.model_args import ModelArgs, expected_shapes

log = logging.getLogger(__name__)

ASSETS = "assets"


def _blame(a: ModelArgs, want: list[int], got: list[int]) -> str:
    """The config fields (config.json names) that set the dimensions where `got` differs from `want`."""
    sizes = {"hidden_size": a.dim, "intermediate_size": a.hidden_dim, "vocab_size": a.vocab_size,
             "head_dim": a.hd, "num_attention_heads * head_dim": a.n_heads * a.hd,
             "num_key_value_heads * head_dim": a.kv_heads * a.hd}
    if a.n_experts:
        sizes.update({"moe_intermediate_size": a.expert_dim, "num_experts": a.n_experts})
    named = []
    for w, g in zip(want, got):
        named += [f"{name} = {value}" for name, value in sizes.items() if w != g and value == w]
    return f" (from the config's {' or '.join(dict.fromkeys(named))})" if named else ""


def check_items(plans: list[FilePlan], args: ModelArgs, where: str) -> None:
    """Shapes must match the config, and nothing may be missing: one error naming the key."""
    want = expected_shapes(args)
    seen = set()
    for plan in plans:
        for it in plan.items:
            if it.name not in want:
                raise CkptError(f"{where}: tensor {it.name!r} has no place in a model with this config")
            if list(it.shape) != want[it.name]:
                raise CkptError(f"{where}: tensor {it.name!r} has shape {list(it.shape)} but the config "
                                f"implies {want[it.name]}{_blame(args, want[it.name], list(it.shape))}")
            if it.name in seen:
                raise CkptError(f"{where}: tensor {it.name!r} appears twice")
            seen.add(it.name)
    missing = [k for k in want if k not in seen]
    if missing:
        raise CkptError(f"{where}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def dominant_dtype(plans: list[FilePlan]) -> str:
    counts: dict[str, int] = {}
    for p in plans:
        for it in p.items:
            counts[it.final_dtype] = counts.get(it.final_dtype, 0) + it.out_nbytes
    code = max(counts, key=counts.get) if counts else "F32"
    return st.TORCH_NAME[code]


def write(out, plans: list[FilePlan], *, family: str, args: ModelArgs, original: dict,
          assets: dict[str, str], progress=None) -> Manifest:
    """Write tune shards and assets into Output `out`; returns the (uncommitted) manifest."""
    for plan in plans:
        plan.metadata = {"format": "pt"}
        write_file(out, plan, progress)
    for name, src in assets.items():
        out.copy(src, f"{ASSETS}/{name}")
    return Manifest(kind="model", format="tune", family=family, model_args=args.to_dict(),
                    dtype=dominant_dtype(plans),
                    extra={"original": original, "layout": [{"name": p.name, "keys": [i.name for i in p.items]} for p in plans]})


@dataclass
class TuneDir:
    uri: str
    manifest: Manifest
    tensors: dict[str, st.TensorInfo]   # tune key -> bytes on storage, in layout order

    @property
    def args(self) -> ModelArgs:
        return ModelArgs.from_dict(self.manifest.model_args)

    @property
    def original(self) -> dict | None:
        return self.manifest.extra.get("original")

    def asset(self, name: str) -> str | None:
        path = f"{ASSETS}/{name}"
        return storage.join(self.uri, path) if path in self.manifest.files else None


def open_dir(uri: str) -> TuneDir:
    m = manifest.require(uri)
    if m.format != "tune":
        raise CkptError(f"{uri}: format is {m.format}, not tune")
    tensors: dict[str, st.TensorInfo] = {}
    for entry in m.extra.get("layout", []):
        path = storage.join(m.uri, entry["name"])
        want = m.files.get(entry["name"], {}).get("size")
        _, infos = st.read_header(path, file_size=None)
        if want is not None and infos and infos[-1].end != want:
            raise CkptError(f"{path}: size differs from ckptflow.json (truncated or replaced)")
        for t in infos:
            tensors[t.name] = t
    return TuneDir(m.uri, m, tensors)


def items(d: TuneDir) -> dict[str, Item]:
    return {k: Item(k, t.dtype, t.shape, info=t) for k, t in d.tensors.items()}


def open_view(uri: str, **_):
    """A committed tune directory (a model, or a full fine-tune step) as a View."""
    from ckptflow import families
    from ckptflow.formats.view import View

    d = open_dir(uri)
    assets = {name[len(ASSETS) + 1:]: storage.join(d.uri, name)
              for name in d.manifest.files if name.startswith(ASSETS + "/")}
    layout = [e["keys"] for e in d.manifest.extra.get("layout", [])]
    return View(d.uri, "tune", families.get(d.manifest.family), d.args, items(d), d.original, assets,
                manifest=d.manifest, partition=layout)


def write_view(view, out, *, out_dtype: str | None = None, max_shard: int | None = None, progress=None) -> Manifest:
    plans = view.plans(max_shard, out_dtype)
    check_items(plans, view.args, view.uri)
    original = dict(view.original or {"format": view.format})
    return write(out, plans, family=view.family.NAME, args=view.args, original=original,
                 assets=dict(view.assets), progress=progress)
