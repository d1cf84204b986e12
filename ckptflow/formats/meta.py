"""Meta's original format: consolidated.NN.pth (one file per model-parallel rank), params.json and
tokenizer.model (docs/formats.md). Mistral's own release (consolidated.safetensors, or .pth, with a
params.json that gives hidden_dim) uses the same key names and is read here too.

Reading joins each weight's model-parallel shards on the dimension Meta's reference code split it
on (the family's META_MP_DIM table): q/k/v/w1/w3/output on rows, wo/w2 on columns, norms
replicated, the embedding on columns in Llama 1/2 and on rows in Llama 3 (told apart by the shard
shape), and KV heads de-duplicated when there are more files than KV heads. Files are loaded with
torch.load(weights_only=True, mmap=True) once each and kept mapped while the View lives, so one
joined tensor at a time is in memory. The tune layout of llama is Meta's own, so nothing is permuted.

params.json cannot say the llama3 RoPE scaling factor: it comes from the `rope_scaling_factor`
reader option (CLI --rope-scaling-factor), a ckptflow manifest beside the files, or the family's
table of released models; use_scaled_rope without any of these is an error.

Writing produces the same number of files as the source (one for a model from elsewhere), each a
torch.save of tensors only, plus params.json (the source's own bytes when the architecture is
unchanged) and the tokenizer. A tied model gets an output.weight copied from the embedding, as
Meta's loader expects one.
"""
from __future__ import annotations

import json
import logging
import re

from ckptflow import families, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.formats.view import FilePlan, Item, cast, is_asset
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

PARAMS, TOKENIZER, CHECKLIST = "params.json", "tokenizer.model", "checklist.chk"
ST_FILE = "consolidated.safetensors"
_PTH = re.compile(r"^consolidated\.(\d{2})\.pth$")
TABLE, MP_TABLE = "META_TO_TUNE", "META_MP_DIM"
NOT_ASSETS = {PARAMS, CHECKLIST, "ckptflow.json", ".ckptflow-writing"}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".distcp")


def is_meta(names: list[str]) -> bool:
    return PARAMS in names and (ST_FILE in names or any(_PTH.match(n) for n in names))


def weight_files(uri: str, names: list[str]) -> list[str]:
    """consolidated.00.pth ... in rank order; numbering must be 00..N-1 with no gap."""
    pth = sorted(n for n in names if _PTH.match(n))
    if pth and ST_FILE in names:
        raise CkptError(f"{uri}: holds both {ST_FILE} and {pth[0]}; keep one")
    if not pth:
        return [ST_FILE]
    for rank, name in enumerate(pth):
        if int(_PTH.match(name).group(1)) != rank:
            raise CkptError(f"{uri}: model-parallel files must be consolidated.00.pth .. "
                            f"consolidated.{len(pth) - 1:02d}.pth; {name} is out of sequence")
    return pth


class Shards:
    """Each rank's {meta key: tensor}, loaded once (mmap) and kept while the View lives."""

    def __init__(self, uris: list[str]):
        self.uris = uris
        self._sd: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.uris)

    def get(self, rank: int) -> dict:
        if rank not in self._sd:
            from ckptflow.formats import hf

            self._sd[rank] = hf.load_pickle_weights(self.uris[rank])
        return self._sd[rank]


# --- reading --------------------------------------------------------------------------------

def open_view(uri: str, *, rope_scaling_factor: float | None = None, **_):
    """A View of a Meta directory: tune-named lazy tensors joined across model-parallel files."""
    from ckptflow.formats.view import View

    uri = storage.normalize(uri)
    names = storage.listdir(uri)
    params_uri = storage.join(uri, PARAMS)
    params_text = storage.read_text(params_uri)
    try:
        params = json.loads(params_text)
    except ValueError as e:
        raise CkptError(f"{params_uri}: not valid JSON ({e})") from e
    family = families.for_meta_params(params, params_uri) if isinstance(params, dict) else None
    if family is None:
        raise CkptError(f"{params_uri}: not a JSON object")
    files = weight_files(uri, names)
    m = manifest.read(uri)
    shards = Shards([storage.join(uri, f) for f in files]) if files[0] != ST_FILE else None
    shapes, dtypes, order = _layout(uri, files, shards)
    emb_dim = _embedding_dim(uri, files, shapes, params)
    factor = rope_scaling_factor if rope_scaling_factor is not None else _manifest_factor(m)
    args = family.args_from_meta(params, params_uri, vocab_size=_vocab(shapes, emb_dim, len(files)),
                                 rope_factor=float(factor) if factor is not None else None)
    if "output.weight" not in order:
        args.tie_embeddings = True   # some converters drop the head of tied models
    items, notes = _items(uri, family, args, files, shards, shapes, dtypes, order, emb_dim)
    from ckptflow.formats.tune import check_items

    check_items([FilePlan("", list(items.values()))], args, uri)
    original = {"format": "meta", "files": files, "keys": order, "embedding_dim": emb_dim,
                "params": params, "params_text": params_text}
    assets = {n: storage.join(uri, n) for n in names if is_asset(uri, n, NOT_ASSETS, WEIGHT_SUFFIXES)}
    if TOKENIZER in assets and "tokenizer.json" not in assets:
        notes.append(f"{TOKENIZER} (sentencepiece for Llama 1/2, tiktoken for Llama 3) is copied as is; no HF "
                     "tokenizer.json is made from it (transformers' convert_llama_weights_to_hf can)")
    return View(uri, "meta", family, args, items, original, assets, manifest=m, notes=notes)


def _manifest_factor(m: Manifest | None):
    scaling = ((m.model_args or {}).get("rope_scaling") or {}) if m is not None else {}
    return scaling.get("factor") if scaling.get("rope_type") == "llama3" else None


def _layout(uri: str, files: list[str], shards: Shards | None) -> tuple[list[dict], dict, list[str]]:
    """Per rank {key: shape}, {key: dtype code}, rank 0's key order; every rank must hold the same keys."""
    shapes, dtypes = [], {}
    for rank, name in enumerate(files):
        if shards is None:
            _, infos = st.read_header(storage.join(uri, name))
            shapes.append({t.name: list(t.shape) for t in infos})
            dtypes.update({t.name: t.dtype for t in infos})
            continue
        sd = shards.get(rank)
        shapes.append({k: list(v.shape) for k, v in sd.items()})
        dtypes.update({k: st.ST_NAME.get(str(v.dtype).removeprefix("torch."), "?") for k, v in sd.items()})
    for name, rank in zip(files[1:], shapes[1:]):
        if rank.keys() != shapes[0].keys():
            diff = sorted(set(rank) ^ set(shapes[0]))
            raise CkptError(f"{storage.join(uri, name)}: holds different keys than {files[0]} ({diff[0]!r})")
    bad = next((k for k, d in dtypes.items() if d == "?"), None)
    if bad:
        raise CkptError(f"{uri}: tensor {bad!r} has a dtype ckptflow does not handle")
    return shapes, dtypes, list(shapes[0])


def _embedding_dim(uri: str, files: list[str], shapes: list[dict], params: dict) -> int | None:
    """Llama 1/2 split the embedding on its columns (ParallelEmbedding), Llama 3 on its rows."""
    emb = shapes[0].get("tok_embeddings.weight")
    if emb is None or len(files) == 1:
        return None
    dim = params.get("dim")
    if len(emb) == 2 and emb[1] == dim:
        return 0
    if len(emb) == 2 and emb[1] * len(files) == dim:
        return 1
    raise CkptError(f"{storage.join(uri, files[0])}: tok_embeddings.weight shard {emb} fits neither a row nor "
                    f"a column split of dim {dim} over {len(files)} files")


def _vocab(shapes: list[dict], emb_dim: int | None, n: int) -> int | None:
    emb = shapes[0].get("tok_embeddings.weight")
    if emb is None:
        return None
    return emb[0] * n if emb_dim == 0 else emb[0]


def _rule(family, key: str, emb_dim: int | None):
    split = families.table(family, MP_TABLE)
    template = families.template_of(key)
    if template not in split:
        raise families.UnknownKeyError(key, family.NAME, MP_TABLE)
    rule = split[template]
    return emb_dim if rule == "embedding" else rule


def _items(uri, family, args, files, shards, shapes, dtypes, order, emb_dim) -> tuple[dict[str, Item], list[str]]:
    infos = {t.name: t for t in st.read_header(storage.join(uri, ST_FILE))[1]} if shards is None else {}
    items, notes = {}, []
    for key in order:
        tune = families.foreign_key_to_tune(family, TABLE, key, where=storage.join(uri, files[0]))
        if tune is None:
            notes.append(f"{key}: a derived buffer, left out (Meta's loader does not need it)")
            continue
        if shards is None:
            t = infos[key]
            items[tune] = Item(tune, t.dtype, list(t.shape), info=t)
            continue
        rule = _rule(family, key, emb_dim)
        shape = _joined_shape(uri, key, rule, [s[key] for s in shapes], args.kv_heads)
        items[tune] = Item(tune, dtypes[key], shape, load=_joiner(shards, key, rule, args.kv_heads, uri))
    return items, notes


def _joined_shape(uri: str, key: str, rule, parts: list[list[int]], n_kv: int) -> list[int]:
    if any(p != parts[0] for p in parts):
        raise CkptError(f"{uri}: {key!r} has different shard shapes across files ({parts[0]} vs others)")
    if rule is None or len(parts) == 1:
        return list(parts[0])
    n, dim = len(parts), rule
    if rule == "kv":
        n, dim = (n_kv, 0) if len(parts) > n_kv else (n, 0)
    shape = list(parts[0])
    shape[dim] *= n
    return shape


def _joiner(shards: Shards, key: str, rule, n_kv: int, uri: str):
    def load():
        import torch

        parts = [shards.get(r)[key] for r in range(len(shards))]
        if len(parts) == 1:
            return parts[0]
        if rule is None:
            _same(parts, key, uri, "replicated")
            return parts[0]
        dim, mp = (0 if rule == "kv" else rule), len(parts)
        if rule == "kv" and mp > n_kv:
            if mp % n_kv:
                raise CkptError(f"{uri}: {mp} files do not replicate {n_kv} KV heads evenly ({key!r})")
            repeat = mp // n_kv
            for g in range(n_kv):
                _same(parts[g * repeat:(g + 1) * repeat], key, uri, f"KV head {g}")
            parts = parts[::repeat]
        return torch.cat(parts, dim=dim)
    return load


def _same(parts: list, key: str, uri: str, what: str) -> None:
    import torch

    for p in parts[1:]:
        if not torch.equal(p, parts[0]):
            raise CkptError(f"{uri}: {key!r} ({what}) differs between model-parallel files")


# --- writing --------------------------------------------------------------------------------

def write_view(view, out, *, out_dtype: str | None = None, max_shard: int | None = None, progress=None,
               mp: int | None = None) -> Manifest:
    """Write `view` as consolidated.NN.pth + params.json + tokenizer into Output `out`.
    mp: number of model-parallel files (default: the source's, or 1)."""
    fam, args = view.family, view.args
    families.table(fam, TABLE)
    original = view.original if (view.original or {}).get("format") == "meta" else None
    mp = mp or (len(original["files"]) if original and original["files"][0] != ST_FILE else 1)
    params_bytes, params = _params(fam, args, original)
    emb_dim = (original or {}).get("embedding_dim")
    if emb_dim is None:
        emb_dim = 1 if params.get("vocab_size", -1) <= 0 else 0
    keys = _meta_keys(fam, view, original)
    plan = [(mkey, cast(view.items[src], out_dtype), _rule(fam, mkey, emb_dim)) for mkey, src in keys]
    for mkey, it, rule in plan:
        _check_split(mkey, it.shape, rule, mp, args.kv_heads)
    for rank in range(mp):
        _write_rank(out, f"consolidated.{rank:02d}.pth", plan, rank, mp, args.kv_heads, progress)
    out.put(PARAMS, params_bytes)
    for name, src in view.assets.items():
        if name not in NOT_ASSETS and not name.endswith(WEIGHT_SUFFIXES) and name != "config.json":
            out.copy(src, name)
    from ckptflow.formats.tune import dominant_dtype

    return Manifest(kind="model", format="meta", family=fam.NAME, model_args=args.to_dict(),
                    dtype=dominant_dtype([FilePlan("", [it for _, it, _ in plan])]),
                    extra={"model_parallel": mp, "embedding_dim": emb_dim})


def _params(fam, args, original: dict | None) -> tuple[bytes, dict]:
    """params.json: the source's own bytes when it describes the same architecture."""
    new = fam.meta_params(args)
    if original:
        factor = (args.rope_scaling or {}).get("factor")
        try:
            old = fam.meta_params(fam.args_from_meta(original["params"], vocab_size=args.vocab_size, rope_factor=factor))
        except CkptError:
            old = None
        if old == new:
            return original["params_text"].encode(), original["params"]
    return (json.dumps(new, indent=2) + "\n").encode(), new


def _meta_keys(fam, view, original: dict | None) -> list[tuple[str, str]]:
    """(Meta key, tune key of the source tensor) in the order to write them."""
    if original:
        keys = [k for k in original["keys"] if families.foreign_key_to_tune(fam, TABLE, k) is not None]
    else:
        keys = [families.tune_key_to_foreign(fam, TABLE, k) for k in view.items]
    pairs = [(k, families.foreign_key_to_tune(fam, TABLE, k)) for k in keys]
    pairs = [(k, t) for k, t in pairs if t in view.items or t == "output.weight"]
    if "output.weight" not in view.items:    # tied: Meta's loader wants its own output.weight
        pairs = [(k, t) for k, t in pairs if t != "output.weight"]
        pairs.append((families.tune_key_to_foreign(fam, TABLE, "output.weight"), "tok_embeddings.weight"))
    missing = [t for t in view.items if t not in {s for _, s in pairs}]
    if missing:
        raise CkptError(f"{view.uri}: tensor {missing[0]!r} has no place in the Meta layout")
    return pairs


def _check_split(key: str, shape: list, rule, mp: int, n_kv: int) -> None:
    if rule is None or mp == 1:
        return
    if rule == "kv":
        if mp > n_kv and mp % n_kv:
            raise CkptError(f"cannot spread {n_kv} KV heads over {mp} model-parallel files")
        rule = 0
        if mp > n_kv:
            return
    if shape[rule] % mp:
        raise CkptError(f"tensor {key!r} {shape} does not split into {mp} equal parts on dim {rule}")


def _write_rank(out, name: str, plan: list, rank: int, mp: int, n_kv: int, progress) -> None:
    import torch

    from ckptflow.formats.view import tensor

    handles: dict = {}
    sd = {}
    try:
        for mkey, it, rule in plan:
            full = tensor(it, handles)
            sd[mkey] = _shard(full, rule, rank, mp, n_kv)
            if progress is not None:
                progress(it.out_nbytes // mp)
    finally:
        for h in handles.values():
            h.close()
    with out.open(name) as f:
        torch.save(sd, _Flushable(f))


def _shard(x, rule, rank: int, mp: int, n_kv: int):
    """This rank's part of a full tensor, as Meta's reference code splits it (a copy, so that
    torch.save stores only the part, not the whole storage it was cut from)."""
    if rule is None or mp == 1:
        return x.clone()
    if rule == "kv":
        if mp > n_kv:
            rows = x.shape[0] // n_kv
            head = rank // (mp // n_kv)
            return x[head * rows:(head + 1) * rows].clone()
        rule = 0
    size = x.shape[rule] // mp
    return x.narrow(rule, rank * size, size).clone()


class _Flushable:
    """torch.save wants write() and flush(); Output's hashing writer has write()."""

    def __init__(self, f):
        self._f = f

    def write(self, data) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        pass


def describe(uri: str):
    """Detection for `ckptflow detect`: works without the RoPE factor (nothing is loaded)."""
    from ckptflow.formats.view import Detection, summarize

    uri = storage.normalize(uri)
    names = storage.listdir(uri)
    params = storage.read_json(storage.join(uri, PARAMS))
    family = families.for_meta_params(params, storage.join(uri, PARAMS))
    files = weight_files(uri, names)
    shards = Shards([storage.join(uri, f) for f in files]) if files[0] != ST_FILE else None
    shapes, dtypes, order = _layout(uri, files, shards)
    emb_dim = _embedding_dim(uri, files, shapes, params)
    n_kv = params.get("n_kv_heads") or params.get("n_heads")
    pairs = [(_joined_shape(uri, k, _rule(family, k, emb_dim), [s[k] for s in shapes], n_kv), dtypes[k])
             for k in order if families.foreign_key_to_tune(family, TABLE, k) is not None]
    dtype, n = summarize(pairs)
    return Detection("meta", uri, family.NAME, dtype, n, storage.list_files(uri),
                     {"model_parallel": len(files) if files[0] != ST_FILE else 1,
                      "use_scaled_rope": bool(params.get("use_scaled_rope")),
                      "known_model": family.meta_known(params).get("model") if hasattr(family, "meta_known") else None})
