"""What torchtune wrote, across its versions (docs/formats.md), read as a View.

    v0.1-v0.4 output_dir: hf_model_{NNNN}_{epoch}.pt (HF keys), model-0NNNN-of-0MMMM_{epoch}.safetensors
                          (HF keys, no index), meta_model_{epoch}.pt (Meta keys), torchtune_model_{epoch}.pt
                          (tune keys), adapter_{epoch}.pt (LoRA, tune keys), recipe_state.pt
    v0.5+ output_dir:     epoch_{N}/ (main: step_{N}/) holding an HF directory (model-*.safetensors + index
                          + the copied config.json), or model-0000i-of-0000n.bin with Meta/tune keys,
                          adapter_model.pt, adapter_model.safetensors + adapter_config.json,
                          recipe_state/recipe_state.pt (main: recipe_state.pt inside the step dir)

The key naming of a weights file is decided by which of the family's tables maps all its keys
(HF, Meta or tune), not by its name. The newest epoch/step is read unless `epoch` names one.
torchtune's LoRA recipes save the merged model beside the adapter: the model is read and the
adapter noted (`ckptflow merge`/`export --format peft` take the adapter). Recipe state is
reported in View.notes and never unpickled. A file needs an architecture: the config.json
torchtune copies beside it, a params.json, or `model_config` (--model-config).

torchtune does not install beside transformers 5 here, so the tests build these layouts by hand.
"""
from __future__ import annotations

import logging
import re

from ckptflow import families, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.formats.view import FilePlan, Item, is_asset

log = logging.getLogger(__name__)

HF_PT = re.compile(r"^hf_model_(\d{4})_(\d+)\.pt$")
HF_ST = re.compile(r"^model-(\d{5})-of-(\d{5})_(\d+)\.safetensors$")
META_PT = re.compile(r"^meta_model_(\d+)\.pt$")
TUNE_PT = re.compile(r"^torchtune_model_(\d+)\.pt$")
BIN_SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.bin$")
ADAPTER_PT = re.compile(r"^adapter_(\d+)\.pt$")
STEP_DIR = re.compile(r"^(epoch|step|dist_epoch)_(\d+)$")
ADAPTER_MODEL_PT = "adapter_model.pt"
ADAPTER_CONFIG = "adapter_config.json"
RECIPE, RECIPE_DIR = "recipe_state.pt", "recipe_state"
CONFIG, PARAMS = "config.json", "params.json"
MARKERS = (HF_PT, HF_ST, META_PT, TUNE_PT, BIN_SHARD, ADAPTER_PT, STEP_DIR)
NOT_ASSETS = {"ckptflow.json", ".ckptflow-writing", PARAMS, ADAPTER_CONFIG, "model.safetensors.index.json",
              "pytorch_model.bin.index.json", "original_repo_id.json"}
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".distcp")
STYLE_TABLES = (("hf", "HF_TO_TUNE"), ("meta", "META_TO_TUNE"))


def is_torchtune(names: list[str]) -> bool:
    return any(p.match(n) for p in MARKERS for n in names) or \
        any(n in names for n in (ADAPTER_MODEL_PT, RECIPE, RECIPE_DIR))


def is_adapter(uri: str) -> bool:
    """A torchtune LoRA adapter lives here (adapter_N.pt or adapter_model.pt)."""
    names = storage.listdir(uri)
    return ADAPTER_MODEL_PT in names or any(ADAPTER_PT.match(n) for n in names)


# --- choosing what to read ---------------------------------------------------------------------

def _number(pattern, name: str, group: int) -> int | None:
    m = pattern.match(name)
    return int(m.group(group)) if m else None


def _pick(found: dict[int, object], epoch: int | None, where: str, what: str):
    if not found:
        return None, None
    if epoch is None:
        epoch = max(found)
    if epoch not in found:
        raise CkptError(f"{where}: no {what} for epoch/step {epoch} (found {sorted(found)})")
    return epoch, found[epoch]


def _step_dirs(uri: str, names: list[str]) -> dict[int, str]:
    dirs: dict[int, str] = {}
    for n in names:
        m = STEP_DIR.match(n)
        if m and storage.isdir(storage.join(uri, n)):
            if int(m.group(2)) in dirs:
                raise CkptError(f"{uri}: both {dirs[int(m.group(2))]} and {n}; name the one to read")
            dirs[int(m.group(2))] = n
    return dirs


def open_view(uri: str, *, epoch: int | None = None, model_config: str | None = None, base=None, opener=None,
              **opts):
    uri = storage.normalize(uri)
    names = storage.listdir(uri)
    dirs = _step_dirs(uri, names)
    if dirs and not _flat_models(names):
        n, name = _pick(dirs, epoch, uri, "epoch or step directory")
        sub = storage.join(uri, name)
        if ".metadata" in storage.listdir(sub):
            raise CkptError(f"{sub}: a DCP checkpoint (its .metadata is a pickle): ckptflow reads it only when you "
                            f"name that directory yourself, e.g. ckptflow convert {sub} DST")
        view = _dir_view(sub, storage.listdir(sub), None, model_config, base, opener, uri_config=_config_of(uri, names))
        others = sorted(v for k, v in dirs.items() if k != n)
        if others:
            view.notes.append(f"read {name}; also here: {', '.join(others)}")
        view.notes += _recipe_notes(uri, names)
        return view
    return _dir_view(uri, names, epoch, model_config, base, opener)


def _flat_models(names: list[str]) -> bool:
    return any(p.match(n) for p in (HF_PT, HF_ST, META_PT, TUNE_PT) for n in names)


def _groups(names: list[str]) -> dict[int, tuple[str, list[str]]]:
    """epoch -> (kind, files) of the flat full-model files of v0.1-v0.4."""
    found: dict[int, dict[str, list[str]]] = {}
    for n in sorted(names):
        for kind, pattern, group in (("hf", HF_PT, 2), ("hf", HF_ST, 3), ("meta", META_PT, 1), ("tune", TUNE_PT, 1)):
            e = _number(pattern, n, group)
            if e is not None:
                found.setdefault(e, {}).setdefault(kind, []).append(n)
    return {e: next(iter(kinds.items())) for e, kinds in found.items()}


def _dir_view(uri: str, names: list[str], epoch: int | None, model_config, base, opener,
              uri_config: str | None = None):
    from ckptflow.formats import hf
    from ckptflow.formats.view import View

    notes = _recipe_notes(uri, names) + _adapter_notes(names)
    groups = _groups(names)
    if groups:
        e, (_, files) = _pick(groups, epoch, uri, "model files")
        if len(groups) > 1:
            notes.append(f"read epoch {e}; also here: epochs {sorted(k for k in groups if k != e)}")
    elif hf.is_hf(names):
        v = hf.open_view(uri)
        return View(v.uri, "torchtune", v.family, v.args, v.items, v.original, v.assets, v.manifest, v.partition,
                    notes)
    else:
        files = sorted(n for n in names if BIN_SHARD.match(n))
    if not files:
        return _adapter_only(uri, names, epoch, base, opener, notes)
    arch = _arch(uri, names, model_config, uri_config)
    return _weights_view(uri, files, arch, notes)


def _config_of(uri: str, names: list[str]) -> str | None:
    for n in (CONFIG, PARAMS):
        if n in names:
            return storage.join(uri, n)
    return None


def _arch(uri: str, names: list[str], model_config: str | None, fallback: str | None):
    from ckptflow.formats import arch

    source = model_config or _config_of(uri, names) or fallback
    if source is None:
        raise CkptError(f"{uri}: torchtune's weight files here say nothing of the architecture and no config.json "
                        "or params.json is beside them; give it with --model-config (the base model's config.json "
                        "or directory)")
    return arch.load(source)


def _recipe_notes(uri: str, names: list[str]) -> list[str]:
    notes = []
    if RECIPE in names:
        notes.append(f"{RECIPE}: torchtune's recipe state (optimizer, epochs, seed), left out and not unpickled")
    if RECIPE_DIR in names and storage.isfile(storage.join(uri, RECIPE_DIR, RECIPE)):
        notes.append(f"{RECIPE_DIR}/{RECIPE}: torchtune's recipe state, left out and not unpickled")
    return notes


def _adapter_notes(names: list[str]) -> list[str]:
    found = sorted(n for n in names if ADAPTER_PT.match(n) or n == ADAPTER_MODEL_PT or n.startswith("adapter_model."))
    if not found:
        return []
    return [f"LoRA adapter files {', '.join(found)} left out (the model here is already merged); "
            "ckptflow merge / export --format peft read the adapter"]


# --- the weights --------------------------------------------------------------------------------

def _raw_items(path: str) -> list[Item]:
    """Items under their own names, in file order (safetensors header, or a tensors-only pickle)."""
    from ckptflow.formats import hf

    if path.endswith(".safetensors"):
        return [Item(t.name, t.dtype, list(t.shape), info=t) for t in st.read_header(path)[1]]
    sd = hf.load_pickle_weights(path)
    return [Item(k, st.code_of(v.dtype, path, k), list(v.shape), load=hf.bin_loader(path, k)) for k, v in sd.items()]


def key_style(family, args, keys: list[str], where: str) -> str:
    """"hf", "meta" or "tune": the naming whose table maps every key. Otherwise an error naming
    the first key that the closest naming cannot place."""
    from ckptflow.model_args import expected_shapes

    known = expected_shapes(args)
    unmapped = {"tune": [k for k in keys if k not in known]}
    for style, table in STYLE_TABLES:
        if hasattr(family, table):
            unmapped[style] = [k for k in keys if not _maps(family, table, k)]
    best = min(unmapped, key=lambda s: len(unmapped[s]))
    if unmapped[best]:
        raise CkptError(f"{where}: tensor {unmapped[best][0]!r} has no place in a {family.NAME} model "
                        f"with this config (the other keys are {best} names)")
    return best


def _maps(family, table: str, key: str) -> bool:
    try:
        families.foreign_key_to_tune(family, table, key)
    except families.UnknownKeyError:
        return False
    return True


def _weights_view(uri: str, files: list[str], arch, notes: list[str]):
    from ckptflow.formats.view import View

    per_file = {f: _raw_items(storage.join(uri, f)) for f in files}
    keys = [it.name for items in per_file.values() for it in items]
    style = key_style(arch.family, arch.args, keys, storage.join(uri, files[0]))
    if style == "hf":
        items, original, partition = _from_hf(uri, files, per_file, arch)
    else:
        items, original, partition = _from_named(uri, files, per_file, arch, style)
    from ckptflow.formats.tune import check_items

    check_items([FilePlan("", list(items.values()))], arch.args, uri)
    assets = dict(arch.assets)
    assets.update({n: storage.join(uri, n) for n in storage.listdir(uri) if _is_asset(uri, n)})
    return View(uri, "torchtune", arch.family, arch.args, items, original, assets, manifest.read(uri), partition,
                notes)


def _is_asset(uri: str, name: str) -> bool:
    return name != RECIPE_DIR and is_asset(uri, name, NOT_ASSETS, WEIGHT_SUFFIXES)


def _from_hf(uri, files, per_file, arch):
    """HF-named files: HF's own plan (q/k permute for interleaved families), exported under the
    names transformers gives a checkpoint of this many files."""
    from ckptflow.formats import hf

    names = _hf_names(len(files))
    src = hf.Source(uri, {}, arch.family, arch.args, "safetensors" if files[0].endswith(".safetensors") else "bin",
                    None, names, {n: per_file[f] for n, f in zip(names, files)}, {n: {"format": "pt"} for n in names})
    plans, original = hf.tune_plan(src)
    config = storage.read_json(arch.assets["config.json"]) if "config.json" in arch.assets else None
    original.update(config=config, assets=[], index=None, torchtune_files=files)
    items = {it.name: it for p in plans for it in p.items}
    return items, original, [[it.name for it in p.items] for p in plans]


def _hf_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _from_named(uri, files, per_file, arch, style: str):
    items, partition = {}, []
    for f in files:
        group = []
        for it in per_file[f]:
            tune = it.name if style == "tune" else families.foreign_key_to_tune(arch.family, "META_TO_TUNE", it.name)
            if tune is None or (tune == "output.weight" and arch.args.tie_embeddings):
                continue
            items[tune] = Item(tune, it.dtype, it.shape, info=it.info, load=it.load)
            group.append(tune)
        partition.append(group)
    return items, None, partition


# --- adapters -----------------------------------------------------------------------------------

def adapter_file(uri: str, names: list[str] | None = None, epoch: int | None = None) -> str:
    names = storage.listdir(uri) if names is None else names
    if ADAPTER_MODEL_PT in names:
        return storage.join(uri, ADAPTER_MODEL_PT)
    found = {int(ADAPTER_PT.match(n).group(1)): n for n in names if ADAPTER_PT.match(n)}
    _, name = _pick(found, epoch, uri, "adapter")
    if name is None:
        raise CkptError(f"{uri}: no torchtune adapter (adapter_N.pt or adapter_model.pt)")
    return storage.join(uri, name)


def adapter_tensors(uri: str, epoch: int | None = None) -> tuple[dict[str, Item], dict]:
    """(tune LoRA tensors {"layers.0.attn.q_proj.lora_a.weight": Item, ...}, {"rank", "alpha"}):
    alpha is None unless an adapter_config.json (PEFT, written beside it since v0.2) says it."""
    uri = storage.normalize(uri)
    path = adapter_file(uri, epoch=epoch)
    items = {it.name: it for it in _raw_items(path)}
    for k in items:
        if k.endswith(".magnitude"):
            raise CkptError(f"{path}: {k!r} is a DoRA magnitude; DoRA adapters are not supported")
        if not k.endswith((".lora_a.weight", ".lora_b.weight")):
            raise CkptError(f"{path}: tensor {k!r} is not a LoRA weight (…lora_a.weight / …lora_b.weight)")
    ranks = {it.shape[0] for k, it in items.items() if k.endswith(".lora_a.weight")}
    if len(ranks) != 1:
        raise CkptError(f"{path}: LoRA ranks {sorted(ranks)}; torchtune adapters have one rank")
    alpha = None
    if ADAPTER_CONFIG in storage.listdir(uri):
        alpha = storage.read_json(storage.join(uri, ADAPTER_CONFIG)).get("lora_alpha")
    return items, {"rank": ranks.pop(), "alpha": alpha}


def read_adapter(uri: str, base=None, opener=None, *, lora_alpha: float | None = None, epoch: int | None = None):
    """(Adapter, base View) of a torchtune adapter, for merge and export. The base is `base`
    (a View, or a URI opened with `opener`) or the one adapter_config.json names."""
    from ckptflow.formats import adapter

    uri = storage.normalize(uri)
    items, info = adapter_tensors(uri, epoch)
    alpha = lora_alpha if lora_alpha is not None else info["alpha"]
    if alpha is None:
        raise CkptError(f"{uri}: torchtune's adapter file does not store lora_alpha and no adapter_config.json "
                        "is beside it; the merge scale (alpha / rank) is unknown")
    cfg = storage.read_json(storage.join(uri, ADAPTER_CONFIG)) if ADAPTER_CONFIG in storage.listdir(uri) else {}
    bv = adapter.base_view(base, [cfg.get("base_model_name_or_path")], uri, opener)
    groups: dict[str, dict] = {}
    for k, it in items.items():
        part = "a" if k.endswith(".lora_a.weight") else "b"
        groups.setdefault(k[: -len(adapter.SUFFIXES[part])], {})[part] = it
    rank = info["rank"]
    modules = {m: adapter.tune_module(bv.args, m, ab, rank, float(alpha), False, uri) for m, ab in groups.items()}
    ad = adapter.Adapter(uri, "torchtune", bv.family, bv.args, modules, rank, float(alpha), base=bv.uri, config=cfg)
    return ad, bv


def _adapter_only(uri: str, names: list[str], epoch, base, opener, notes: list[str]):
    if not (ADAPTER_MODEL_PT in names or any(ADAPTER_PT.match(n) for n in names)):
        raise CkptError(f"{uri}: torchtune output without model weights or an adapter (found "
                        f"{', '.join(names[:10])})")
    if base is None:
        raise CkptError(f"{uri}: holds only a torchtune LoRA adapter; give its base model "
                        "(ckptflow merge ADAPTER BASE DST, or --base)")
    from ckptflow.formats.adapter import merged_view

    ad, bv = read_adapter(uri, base, opener, epoch=epoch)
    view = merged_view(bv, ad)
    view.notes += [n for n in notes if not n.startswith("LoRA adapter")]
    return view


def describe(uri: str):
    """Detection for `ckptflow detect`: what would be read, with its epoch, adapters and recipe state."""
    from ckptflow.formats.view import Detection, summarize

    uri = storage.normalize(uri)
    names = storage.listdir(uri)
    details: dict = {"recipe_state": bool(_recipe_notes(uri, names)), "adapter": bool(_adapter_notes(names))}
    try:
        view = open_view(uri)
    except CkptError as e:        # an architecture may be missing: still say what is here
        details["unread"] = str(e)
        return Detection("torchtune", uri, files=storage.list_files(uri), details=details)
    dtype, n = summarize((it.shape, it.dtype) for it in view.items.values())
    details["notes"] = view.notes
    details["recipe_state"] = any(RECIPE in note for note in view.notes)
    details["adapter"] = any("adapter" in note for note in view.notes)
    return Detection("torchtune", uri, view.family.NAME, dtype, n, storage.list_files(uri), details)
