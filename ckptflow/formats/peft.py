"""PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors (or legacy adapter_model.bin).

Reading gives ckptflow's LoRA representation, `formats.adapter.Adapter`: per tune module ("layers.0.attn.q_proj")
its lora_a [r, in] and lora_b [out, r] as lazy Items in tune layout, and that module's own rank,
alpha and scale, resolved as PEFT resolves them (rank_pattern, alpha_pattern, use_rslora).
The q/k lora_b rows follow the base weight's rows, so they are permuted HF -> Meta for families
whose tune layout is interleaved (Llama, Mistral) and never for Qwen2 (docs/formats.md).

Writing gives the files `PeftModel.from_pretrained(hf_model, dir)` loads on the original HF model:
keys `base_model.model.<HF module>.lora_A.weight`, {"format": "pt"} metadata (docs/formats.md).
"""
from __future__ import annotations

import json
import logging
import math
import re

from ckptflow import families, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.families import _fused
from ckptflow.formats.adapter import Adapter, LoraModule, base_shape, scale
from ckptflow.formats.plan import write_file
from ckptflow.formats.view import FilePlan, Item, split_rows
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
ST_FILE, BIN_FILE = "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
# On disk PEFT drops the adapter name ("default"); older files may still carry one.
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED = (("lora_embedding_", "LoRA on embeddings"), ("lora_magnitude_vector", "DoRA"),
                ("lora_B.bias", "lora_bias"), (".base_layer.", "base weights saved beside the adapter (save_embedding_layers)"))


def is_peft(names: list[str]) -> bool:
    return CONFIG in names and (ST_FILE in names or BIN_FILE in names)


# --- adapter_config.json --------------------------------------------------------------------

def read_config(uri: str) -> dict:
    """The config with PEFT's defaults for missing keys; unknown keys are kept and ignored."""
    path = storage.join(uri, CONFIG)
    cfg = storage.read_json(path)
    if not isinstance(cfg, dict):
        raise CkptError(f"{path}: not a JSON object")
    if str(cfg.get("peft_type") or "LORA").upper() != "LORA":
        raise CkptError(f"{path}: peft_type {cfg['peft_type']!r} is not supported (only LORA)")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias"), ("modules_to_save", "modules_to_save"),
                      ("trainable_token_indices", "trainable_token_indices"), ("target_parameters", "target_parameters"),
                      ("layer_replication", "layer_replication")):
        if cfg.get(key):
            raise CkptError(f"{path}: {key}={cfg[key]!r} ({what}) is not supported")
    out = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False, "fan_in_fan_out": False,
           "target_modules": None, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
           "base_model_name_or_path": None, "revision": None, **cfg}
    out["rank_pattern"] = dict(cfg.get("rank_pattern") or {})
    out["alpha_pattern"] = dict(cfg.get("alpha_pattern") or {})
    for key in ("r", *out["rank_pattern"]):
        r = out["r"] if key == "r" else out["rank_pattern"][key]
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise CkptError(f"{path}: rank {key!r} must be a positive integer, got {r!r}")
    for key, a in [("lora_alpha", out["lora_alpha"]), *out["alpha_pattern"].items()]:
        if not isinstance(a, (int, float)) or isinstance(a, bool):
            raise CkptError(f"{path}: alpha {key!r} must be a number, got {a!r}")
    if out["fan_in_fan_out"]:
        # Every family's targets are nn.Linear; PEFT itself turns fan_in_fan_out off for them
        # (tuners/lora/layer.py dispatch_default) and stores A/B in Linear layout either way.
        log.warning("%s: fan_in_fan_out=true is ignored for nn.Linear targets, as PEFT does", path)
    return out


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern P with re.match(rf"(.*\\.)?({P})$", module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def targeted(cfg: dict, module: str) -> bool:
    """Whether PEFT would put LoRA on `module` (check_target_module_exists, for Linear layers)."""
    excl = cfg.get("exclude_modules")
    if excl and (re.fullmatch(excl, module) if isinstance(excl, str)
                 else module in excl or any(module.endswith("." + e) for e in excl)):
        return False
    tm = cfg.get("target_modules")
    if tm is None:
        return True     # PEFT's per-model defaults: accept what the file holds
    if isinstance(tm, str):
        if tm.lower() == "all-linear":
            return module.rsplit(".", 1)[-1] != "lm_head"   # every Linear but the output layer
        return re.fullmatch(tm, module) is not None
    if module in tm:
        return True
    return any(module.endswith("." + t) for t in tm) and _in_layers(cfg, module)


def _in_layers(cfg: dict, module: str) -> bool:
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    layers = [layers] if isinstance(layers, int) else layers
    patterns = cfg.get("layers_pattern") or None
    patterns = [patterns] if isinstance(patterns, str) else patterns
    regexes = [r".*?\.[^.]*\.(?P<idx>\d+)\."] if not patterns else [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns]
    for rx in regexes:
        m = re.match(rx, module)
        if m:
            return int(m.group("idx")) in layers
    return False


# --- reading ------------------------------------------------------------------------------

def weights_file(uri: str) -> str:
    names = storage.listdir(uri)
    for name in (ST_FILE, BIN_FILE):
        if name in names:
            return storage.join(uri, name)
    raise CkptError(f"{uri}: no {ST_FILE} or {BIN_FILE} beside {CONFIG}")


def raw_items(path: str) -> list[Item]:
    """The tensors of the weights file with PEFT's names."""
    if path.endswith(".safetensors"):
        _, infos = st.read_header(path)
        return [Item(t.name, t.dtype, t.shape, info=t) for t in infos]
    from ckptflow.formats.hf import load_pickle_weights

    sd = load_pickle_weights(path)
    return [Item(k, st.ST_NAME[str(v.dtype).removeprefix("torch.")], list(v.shape),
                 load=(lambda path=path, k=k: load_pickle_weights(path)[k])) for k, v in sd.items()]


def open_adapter(uri: str, family, args, base: str | None = None) -> Adapter:
    """A PEFT adapter directory as an Adapter for a base model of `family` with `args`."""
    uri = storage.normalize(uri)
    cfg = read_config(uri)
    path = weights_file(uri)
    pairs: dict[str, dict] = {}
    for it in raw_items(path):
        module, ab = _parse_key(it.name, path)
        if not targeted(cfg, module):
            raise CkptError(f"{path}: tensor {it.name!r} is for module {module!r}, which target_modules "
                            f"{cfg.get('target_modules')!r} does not select")
        pairs.setdefault(module, {})[ab] = it
    if not pairs:
        raise CkptError(f"{path}: holds no lora_A/lora_B tensors")
    modules = {}
    for hf_module, ab in pairs.items():
        if _fused.parts_of(family, hf_module + ".weight") is not None:
            modules.update(_fused_modules(family, args, hf_module, ab, cfg, path))
            continue
        tune_path, lm = _module(family, args, hf_module, ab, cfg, path)
        modules[tune_path] = lm
    return Adapter(uri, "peft", family, args, modules, rank=cfg["r"], alpha=cfg["lora_alpha"],
                   use_rslora=bool(cfg["use_rslora"]), dropout=float(cfg["lora_dropout"] or 0.0),
                   base=base or cfg.get("base_model_name_or_path"), config=cfg, manifest=manifest.read(uri))


def _parse_key(key: str, path: str) -> tuple[str, str]:
    for marker, what in _UNSUPPORTED:
        if marker in key:
            raise CkptError(f"{path}: tensor {key!r}: {what} is not supported")
    m = _KEY.match(key)
    if m is None:
        raise CkptError(f"{path}: tensor {key!r} is not a LoRA weight (base_model.model.<module>.lora_A|B.weight)")
    return m.group("module"), m.group("ab")


def _module(family, args, hf_module: str, ab: dict, cfg: dict, path: str) -> tuple[str, LoraModule]:
    for part in "AB":
        if part not in ab:
            raise CkptError(f"{path}: module {hf_module!r} has no lora_{part}.weight")
    try:
        tkey, qk = families.hf_key_to_tune(family, hf_module + ".weight", where=path)
    except CkptError:
        tkey, qk = None, None
    tune_path = tkey.removesuffix(".weight") if tkey else None
    if tune_path is None or tune_path.rsplit(".", 1)[-1] not in family.PEFT_TARGETS:
        raise CkptError(f"{path}: tensor {PREFIX}{hf_module}.lora_A.weight targets {hf_module!r}, "
                        f"which is not a LoRA target of a {family.NAME} model")
    out_f, in_f = base_shape(args, tkey)
    rank = _pattern_value(cfg["rank_pattern"], hf_module, cfg["r"])
    alpha = _pattern_value(cfg["alpha_pattern"], hf_module, cfg["lora_alpha"])
    a, b = ab["A"], ab["B"]
    for it, want in ((a, [rank, in_f]), (b, [out_f, rank])):
        if list(it.shape) != want:
            raise CkptError(f"{path}: tensor {it.name!r} has shape {list(it.shape)}, expected {want} "
                            f"(rank {rank} from adapter_config.json, base {family.NAME} {tkey} [{out_f}, {in_f}])")
    permute = ("to_tune", args.n_heads if qk == "q" else args.kv_heads) if qk else None
    a = Item(f"{tune_path}.lora_a.weight", a.dtype, a.shape, info=a.info, load=a.load)
    b = Item(f"{tune_path}.lora_b.weight", b.dtype, b.shape, info=b.info, load=b.load, permute=permute)
    return tune_path, LoraModule(a, b, rank, alpha, scale(rank, alpha, bool(cfg["use_rslora"])))


def _fused_modules(family, args, hf_module: str, ab: dict, cfg: dict, path: str) -> dict[str, LoraModule]:
    """A LoRA on a fused HF module (Phi-3 qkv_proj): each tune part gets the shared lora_A and its
    own row block of lora_B, so W_part + s * B_part @ A is exactly the fused merge's rows."""
    for part in "AB":
        if part not in ab:
            raise CkptError(f"{path}: module {hf_module!r} has no lora_{part}.weight")
    parts = _fused.parts_of(family, hf_module + ".weight")
    rows = _fused.rows(args, parts)
    in_f = base_shape(args, parts[0])[1]
    rank = _pattern_value(cfg["rank_pattern"], hf_module, cfg["r"])
    alpha = _pattern_value(cfg["alpha_pattern"], hf_module, cfg["lora_alpha"])
    a, b = ab["A"], ab["B"]
    for it, want in ((a, [rank, in_f]), (b, [sum(rows), rank])):
        if list(it.shape) != want:
            raise CkptError(f"{path}: tensor {it.name!r} has shape {list(it.shape)}, expected {want} (rank {rank}, "
                            f"fused {hf_module!r} = {', '.join(p.rsplit('.', 2)[-2] for p in parts)} rows {rows})")
    paths = [p.removesuffix(".weight") for p in parts]
    bs = split_rows(b, [f"{tp}.lora_b.weight" for tp in paths], rows)
    sc = scale(rank, alpha, bool(cfg["use_rslora"]))
    return {tp: LoraModule(Item(f"{tp}.lora_a.weight", a.dtype, a.shape, info=a.info, load=a.load), bpart,
                           rank, alpha, sc, fused=hf_module) for tp, bpart in zip(paths, bs)}


# --- writing ------------------------------------------------------------------------------

def write(adapter: Adapter, out, *, out_dtype: str | None = None, base_name: str | None = None,
          revision: str | None = None, progress=None) -> Manifest:
    """adapter_config.json + adapter_model.safetensors into Output `out`; the uncommitted manifest."""
    fam, args = adapter.family, adapter.args
    items, hf_modules, fused = [], {}, {}
    for tune_path, m in adapter.modules.items():
        found = _fused.fused_key(fam, tune_path + ".weight")
        if found is not None:
            fused.setdefault(found[0].removesuffix(".weight"), {})[found[1]] = m
            continue
        hf_key, qk = families.tune_key_to_hf(fam, tune_path + ".weight")
        hf_module = hf_key.removesuffix(".weight")
        hf_modules[hf_module] = m
        want = ("to_hf", args.n_heads if qk == "q" else args.kv_heads) if qk else None
        items.append(_out_item(f"{PREFIX}{hf_module}.lora_A.weight", m.a, None, out_dtype))
        items.append(_out_item(f"{PREFIX}{hf_module}.lora_B.weight", m.b, want, out_dtype))
    for hf_module, parts in fused.items():
        hf_modules[hf_module] = _fused_items(fam, args, hf_module, parts, adapter.use_rslora, out_dtype, items)
    write_file(out, FilePlan(ST_FILE, items, {"format": "pt"}), progress)
    out.put(CONFIG, config_bytes(adapter, hf_modules, base_name, revision))
    from ckptflow.formats.tune import dominant_dtype

    return Manifest(kind="adapter", format="peft", family=fam.NAME,
                    dtype=dominant_dtype([FilePlan(ST_FILE, items)]),
                    extra={"lora": adapter.lora_config(), "base": adapter.base, "base_model": base_name})


def _fused_items(fam, args, hf_module: str, parts: dict[int, LoraModule], use_rslora: bool,
                 out_dtype: str | None, items: list) -> LoraModule:
    """lora_A/lora_B of one fused HF module from its tune parts; appends them to `items`.

    Parts read from one PEFT module (shared lora_A, same rank and alpha) go back as they came:
    that A, and the B parts concatenated. Otherwise the parts' adapters are stacked block-diagonally:
    A = [A_q; A_k; A_v] (rank = the sum), B = blockdiag(B_q, B_k, B_v) with zero rows for a part
    without LoRA, and alpha chosen so that the fused scale is the parts' scale: the same W' exactly."""
    names = _fused.parts_of(fam, hf_module + ".weight")
    rows = _fused.rows(args, names)
    ms = [parts[i] for i in sorted(parts)]
    a_name, b_name = f"{PREFIX}{hf_module}.lora_A.weight", f"{PREFIX}{hf_module}.lora_B.weight"
    first = ms[0]
    if len(parts) == len(names) and all(m.fused == hf_module and (m.rank, m.alpha) == (first.rank, first.alpha)
                                        for m in ms):
        items.append(_out_item(a_name, first.a, None, out_dtype))
        b_parts = [_out_item(m.b.name, m.b, None, out_dtype) for m in ms]
        items.append(Item(b_name, first.b.dtype, [sum(rows), first.rank], out_dtype=out_dtype, parts=b_parts))
        return first
    rank = sum(m.rank for m in ms)
    alpha = first.scale * (math.sqrt(rank) if use_rslora else rank)
    dtypes = {m.a.dtype for m in ms} | {m.b.dtype for m in ms}
    dt = out_dtype or (dtypes.pop() if len(dtypes) == 1 else "F32")
    a_parts = [_out_item(m.a.name, m.a, None, dt) for m in ms]
    items.append(Item(a_name, dt, [rank, ms[0].a.shape[1]], parts=a_parts))
    items.append(Item(b_name, "F32", [sum(rows), rank], out_dtype=dt,
                      load=lambda: _block_diagonal(parts, rows, first.scale)))
    return LoraModule(None, None, rank, alpha, first.scale)


def _block_diagonal(parts: dict[int, LoraModule], rows: list[int], fused_scale: float):
    """B of the stacked adapter: part i's B (times its scale / the fused scale) in its rows and rank columns."""
    import torch

    from ckptflow.formats.adapter import tensor

    rank = sum(m.rank for m in parts.values())
    out = torch.zeros(sum(rows), rank, dtype=torch.float32)
    handles: dict = {}
    try:
        col = 0
        for i in sorted(parts):
            m, r0 = parts[i], sum(rows[:i])
            b = tensor(m.b, handles).float()
            if m.scale != fused_scale:
                b = b * (m.scale / fused_scale)
            out[r0:r0 + rows[i], col:col + m.rank] = b
            col += m.rank
    finally:
        for f in handles.values():
            f.close()
    return out


def write_view(view, out, *, out_dtype: str | None = None, max_shard: int | None = None, progress=None) -> Manifest:
    """The peft writer: the unmerged adapter of a base + LoRA view (see formats.adapter.merged_view)."""
    if view.adapter is None:
        raise CkptError(f"{view.uri}: the peft format needs a LoRA adapter (a LoRA step checkpoint, "
                        "a PEFT or torchtune adapter); this is a full model")
    name, revision = base_model_name(view)
    return write(view.adapter, out, out_dtype=out_dtype, base_name=name, revision=revision, progress=progress)


def base_model_name(view) -> tuple[str, str | None]:
    """What adapter_config.json names as the base: the Hub id the run started from, else the HF
    directory the base was converted from, else the base directory itself."""
    base = view.adapter.base if view.adapter is not None else None
    m = manifest.read(base) if base and storage.isdir(base) else view.manifest
    lin = (m.lineage if m is not None else None) or {}
    src = str(lin.get("source") or "")
    if src.startswith("hf://"):
        name, _, rev = src[len("hf://"):].partition("@")
        return name, lin.get("revision") or rev or None
    hf_dir = ((m.inputs.get("source") or {}).get("uri") if m is not None else None)
    if hf_dir and storage.isfile(storage.join(hf_dir, "config.json")):
        return hf_dir, None
    return base or view.uri, None


def _out_item(name: str, src: Item, permute: tuple | None, out_dtype: str | None) -> Item:
    if src.permute is not None and permute is not None:   # to_tune then to_hf: the identity
        permute = None
    elif src.permute is not None:
        permute = src.permute
    return Item(name, src.dtype, src.shape, info=src.info, load=src.load, permute=permute, out_dtype=out_dtype)


def config_bytes(adapter: Adapter, hf_modules: dict[str, LoraModule], base_name: str | None,
                 revision: str | None) -> bytes:
    """PEFT's adapter_config.json. Per-module ranks/alphas that differ from the global ones go
    into rank_pattern/alpha_pattern under the module's full name (PEFT matches those exactly)."""
    kinds = {m.rsplit(".", 1)[-1] for m in hf_modules}
    per_layer = {k: [m for m in hf_modules if m.rsplit(".", 1)[-1] == k] for k in kinds}
    everywhere = all(len(v) == adapter.args.n_layers or k == "lm_head" for k, v in per_layer.items())
    targets = sorted(kinds) if everywhere else list(hf_modules)
    cfg = {k: v for k, v in adapter.config.items()
           if k not in ("rank_pattern", "alpha_pattern", "target_modules", "layers_to_transform", "layers_pattern")}
    cfg.update({
        "peft_type": "LORA", "task_type": cfg.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": base_name, "revision": revision, "inference_mode": True,
        "r": adapter.rank, "lora_alpha": _num(adapter.alpha), "lora_dropout": adapter.dropout,
        "use_rslora": adapter.use_rslora, "fan_in_fan_out": False, "bias": cfg.get("bias") or "none",
        "target_modules": targets, "exclude_modules": None, "modules_to_save": None, "use_dora": False,
        "rank_pattern": {k: m.rank for k, m in hf_modules.items() if m.rank != adapter.rank},
        "alpha_pattern": {k: _num(m.alpha) for k, m in hf_modules.items() if m.alpha != adapter.alpha},
    })
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def _num(x):
    return int(x) if float(x).is_integer() else float(x)


# --- detect -------------------------------------------------------------------------------

def describe(uri: str):
    """What `ckptflow detect` says of an adapter directory: its LoRA settings and its base model."""
    from ckptflow.formats.view import Detection

    uri = storage.normalize(uri)
    cfg = read_config(uri)
    items = raw_items(weights_file(uri))
    counts: dict[str, int] = {}
    for it in items:
        n = math.prod(it.shape)
        counts[it.dtype] = counts.get(it.dtype, 0) + n
    dtype = st.TORCH_NAME[max(counts, key=counts.get)] if counts else None
    family = None
    base = cfg.get("base_model_name_or_path")
    if base and storage.isfile(storage.join(base, "config.json")):
        try:
            family = families.for_hf_config(storage.read_json(storage.join(base, "config.json"))).NAME
        except CkptError:
            family = None
    details = {"kind": "adapter", "base_model": base, "revision": cfg.get("revision"), "r": cfg["r"],
               "lora_alpha": cfg["lora_alpha"], "use_rslora": cfg["use_rslora"],
               "target_modules": cfg["target_modules"], "rank_pattern": cfg["rank_pattern"],
               "alpha_pattern": cfg["alpha_pattern"], "tensors": len(items)}
    return Detection("peft", uri, family, dtype, sum(counts.values()), storage.list_files(uri), details)
