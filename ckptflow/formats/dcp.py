"""torch.distributed.checkpoint (DCP) directories: `.metadata` + `__{rank}_{n}.distcp` (docs/formats.md).

Reading: a View of tune-named tensors, each loaded alone into a preallocated tensor through a
partial-load planner, so converting a DCP checkpoint (sharded by any number of ranks) to HF
holds one tensor in memory, never the model. Keys may be tune names (ckptflow's own DCP,
optionally under "model."), Meta names (torchtitan <= v0.2.2) or torchtitan's later names; every
other entry (optimizer, lr_scheduler, dataloader, train_state, ...) is training state: reported in
View.notes and left out. A DCP directory without ckptflow.json names no architecture: give one
with `model_config` (--model-config).

`.metadata` is a pickle. ckptflow reads it only from a directory the user named, and unpickles
it with an allow-list of the classes DCP's metadata is made of (anything else is refused, naming
the class), not with plain pickle as torch's own reader does.

Writing: `write_view` (convert --to dcp) saves the tensors with DCP, hashing every file while
it is written. `save_state` / `load_state` are the helpers for training code, in one process or
under torch.distributed (DTensor shards reshard on load; docs/formats.md).
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import pickle
from contextlib import contextmanager

from ckptflow import families, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.formats.view import FilePlan, Item, cast, tensor
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

METADATA = ".metadata"
ASSETS = "assets"
FOREIGN_TABLES = ("META_TO_TUNE", "TITAN_TO_TUNE")
# First components of model weight names in every naming we read; an unmapped key under one of
# these is a weight we do not understand (an error), anything else is training state.
WEIGHT_ROOTS = {"tok_embeddings", "layers", "norm", "output", "lm_head"}


def is_dcp(names: list[str]) -> bool:
    return METADATA in names and any(n.endswith(".distcp") for n in names)


# --- .metadata, unpickled with an allow-list ---------------------------------------------------

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "builtins": {"set", "frozenset", "slice"},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str):
        if name in _DCP_CLASSES.get(module, ()) or (module == "torch" and _is_torch_value(name)):
            return super().find_class(module, name)
        raise CkptError(f"{self.where}: refers to {module}.{name}, which DCP metadata never holds; not unpickling it")


def _is_torch_value(name: str) -> bool:
    import torch

    value = getattr(torch, name, None)
    return name == "Size" or isinstance(value, (torch.dtype, torch.memory_format, torch.layout))


def read_metadata(uri: str):
    """The Metadata of DCP directory `uri` (restricted unpickling; see the module docstring)."""
    path = storage.join(uri, METADATA)
    try:
        md = _Unpickler(io.BytesIO(storage.read_bytes(path)), path).load()
    except CkptError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CkptError(f"{path}: not DCP metadata ({type(e).__name__}: {e})") from e
    if not hasattr(md, "state_dict_metadata") or not hasattr(md, "storage_data"):
        raise CkptError(f"{path}: not DCP metadata")
    return md


def storage_reader(uri: str, md=None):
    """A DCP StorageReader for any URI (object stores through ckptflow.storage: its retries and
    storage options) whose metadata comes from read_metadata (cached: dcp.load asks for it on
    every call)."""
    from torch.distributed.checkpoint import FileSystemReader

    if storage.is_local(uri):
        reader = FileSystemReader(storage.local_path(uri))
    else:
        reader = _storage_classes()[1](uri)
    md = md if md is not None else read_metadata(uri)

    def cached(*_, **__):
        if getattr(md, "storage_meta", None) is not None:
            md.storage_meta.load_id = reader.load_id
        return md

    reader.read_metadata = cached
    return reader


# --- reading --------------------------------------------------------------------------------

def tensors_of(md) -> tuple[dict[str, tuple[list, object]], list[str]]:
    """({fqn: (global shape, torch dtype)} in checkpoint order, [fqns of non-tensor entries])."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors, others = {}, []
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            tensors[fqn] = (list(meta.size), meta.properties.dtype)
        else:
            others.append(fqn)
    return tensors, others


def weight_name(family, fqn: str, known: set[str]):
    """The tune key of checkpoint entry `fqn`, "" for a derived buffer to drop, None if not a weight."""
    for cand in (fqn, fqn[len("model."):] if fqn.startswith("model.") else None):
        if cand is None:
            continue
        if cand in known:
            return cand
        for table in FOREIGN_TABLES:
            if not hasattr(family, table):
                continue
            try:
                found = families.foreign_key_to_tune(family, table, cand)
            except families.UnknownKeyError:
                continue
            return found or ""
    return None


def _root(fqn: str) -> str:
    parts = fqn.split(".")
    return parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]


def classify(family, args, tensors: dict, others: list[str], where: str) -> tuple[dict[str, str], list[str]]:
    """({tune key: fqn}, notes): the model's weights, and what was left out."""
    from ckptflow.model_args import expected_shapes

    known = set(expected_shapes(args))
    weights, left, dropped = {}, {}, []
    for fqn in tensors:
        tune = weight_name(family, fqn, known)
        if tune is None and _root(fqn) in WEIGHT_ROOTS:
            raise CkptError(f"{where}: tensor {fqn!r} is not a weight of a {family.NAME} model with this config")
        if tune is None:
            left.setdefault(fqn.split(".")[0], []).append(fqn)
        elif tune == "" or (tune == "output.weight" and args.tie_embeddings):
            dropped.append(fqn)
        else:
            if tune in weights:
                raise CkptError(f"{where}: {fqn!r} and {weights[tune]!r} are both {tune!r}")
            weights[tune] = fqn
    for fqn in others:
        left.setdefault(fqn.split(".")[0], []).append(fqn)
    notes = [f"training state left out: {group} ({len(fqns)} entries)" for group, fqns in left.items()]
    notes += [f"{fqn}: left out (derived, or the tied output head)" for fqn in dropped]
    return weights, notes


def open_view(uri: str, *, model_config: str | None = None, rope_scaling_factor: float | None = None, **_):
    from ckptflow.formats.view import View
    from ckptflow.formats.tune import check_items
    from ckptflow.model_args import ModelArgs

    uri = storage.normalize(uri)
    md = read_metadata(uri)
    tensors, others = tensors_of(md)
    m = manifest.read(uri)
    if model_config is None and m is not None and m.model_args:
        family, args = families.get(m.family), ModelArgs.from_dict(m.model_args)
        original = m.extra.get("original")
        assets = {n[len(ASSETS) + 1:]: storage.join(uri, n) for n in m.files if n.startswith(ASSETS + "/")}
        partition = [e["keys"] for e in m.extra.get("layout", [])] or None
    else:
        arch = _arch(uri, model_config, tensors, rope_scaling_factor)
        family, args, original, assets, partition = arch.family, arch.args, arch.original, dict(arch.assets), None
    weights, notes = classify(family, args, tensors, others, uri)
    reader = storage_reader(uri, md)
    items = {tune: Item(tune, st.code_of(tensors[fqn][1], uri, fqn), tensors[fqn][0],
                        load=_loader(reader, fqn, tensors[fqn])) for tune, fqn in weights.items()}
    check_items([FilePlan("", list(items.values()))], args, uri)
    return View(uri, "dcp", family, args, items, original, assets, manifest=m, partition=partition, notes=notes)


def step_items(uri: str, root: str = "model") -> dict[str, Item]:
    """The tensors a ckptflow trainer saved under `root` ("model": the trained weights) in DCP
    step `uri`, keyed by their names under it (tune names), each read alone when asked."""
    uri = storage.normalize(uri)
    md = read_metadata(uri)
    tensors, _ = tensors_of(md)
    check_files(uri, md)
    reader = storage_reader(uri, md)
    prefix = root + "."
    items = {}
    for fqn, meta in tensors.items():
        if fqn.startswith(prefix):
            key = fqn[len(prefix):]
            items[key] = Item(key, st.code_of(meta[1], uri, fqn), meta[0], load=_loader(reader, fqn, meta, uri))
    if not items:
        raise CkptError(f"{uri}: DCP step checkpoint holds no tensors under {root!r}")
    return items


def _arch(uri: str, model_config: str | None, tensors: dict, factor):
    from ckptflow.formats import arch

    if model_config is None:
        raise CkptError(f"{uri}: a DCP checkpoint without ckptflow.json does not say its architecture; "
                        "give it with --model-config (a config.json, params.json or model directory)")
    emb = next((shape for fqn, (shape, _) in tensors.items() if fqn.endswith("tok_embeddings.weight")), None)
    return arch.load(model_config, vocab_size=emb[0] if emb else None, rope_scaling_factor=factor)


def check_files(uri: str, md) -> None:
    """Every shard file the metadata points into is there (a missing rank's file is named before
    anything is read or written)."""
    have = set(storage.listdir(uri))
    for info in md.storage_data.values():
        name = str(getattr(info, "relative_path", ""))
        if name and name not in have:
            raise CkptError(f"{storage.join(uri, name)}: missing (DCP metadata {METADATA} points into it)")


def _loader(reader, fqn: str, meta, where: str | None = None):
    shape, dtype = meta

    def load():
        return load_tensor(reader, fqn, shape, dtype, where)
    return load


def load_tensor(reader, fqn: str, shape, dtype, where: str | None = None):
    """One whole tensor (all its saved chunks) into a new tensor; nothing else is read."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    t = torch.empty(shape, dtype=dtype)
    with _quiet(), _checked(f"{where}: tensor {fqn!r}" if where else fqn):
        dcp.load({fqn: t}, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    return t


def describe(uri: str):
    """Detection for `ckptflow detect`: tensors that look like model weights, and training state."""
    from ckptflow.formats.view import Detection, summarize

    uri = storage.normalize(uri)
    md = read_metadata(uri)
    tensors, others = tensors_of(md)
    m = manifest.read(uri)
    model = {fqn: v for fqn, v in tensors.items() if _root(fqn) in WEIGHT_ROOTS}
    state = sorted({fqn.split(".")[0] for fqn in tensors if fqn not in model} | {f.split(".")[0] for f in others})
    dtype, n = summarize((shape, st.code_of(dt, uri, fqn)) for fqn, (shape, dt) in model.items())
    ranks = sorted({name.split("_")[2] for name in storage.listdir(uri) if name.startswith("__") and name.endswith(".distcp")})
    return Detection("dcp", uri, m.family if m is not None else None, dtype, n, storage.list_files(uri),
                     {"tensors": len(tensors), "training_state": state, "saved_by_ranks": len(ranks),
                      "version": getattr(md, "version", None)})


# --- writing --------------------------------------------------------------------------------

class _HashingStream:
    """A file DCP writes into: sha256 and size as it goes (never a second read)."""

    def __init__(self, raw):
        self._raw, self._h, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self._h.update(data)
        self.size += len(data) if not isinstance(data, memoryview) else data.nbytes
        return self._raw.write(data)

    def digest(self) -> dict:
        return {"size": self.size, "sha256": self._h.hexdigest()}

    def __getattr__(self, name):      # tell, flush, fileno, close: the real file's
        return getattr(self._raw, name)


class _HashingFS:
    """Wraps a DCP writer's filesystem: every file written is hashed, keyed by its name under root."""

    def __init__(self, fs, root):
        self._fs, self._root, self.digests = fs, os.fspath(root).rstrip("/"), {}

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def _name(self, path) -> str:
        return os.fspath(path)[len(self._root) + 1:]

    @contextmanager
    def create_stream(self, path, mode):
        with self._fs.create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _HashingStream(raw)
            yield stream
        self.digests[self._name(path)] = stream.digest()

    def rename(self, path, new_path) -> None:
        self._fs.rename(path, new_path)
        if self._name(path) in self.digests:
            self.digests[self._name(new_path)] = self.digests.pop(self._name(path))


def storage_writer(uri: str, *, thread_count: int = 1):
    """A DCP StorageWriter for any URI that hashes what it writes (`.fs.digests`). Local files
    are written by DCP's own writer (fsynced); on object stores every file goes through
    ckptflow.storage (spooled, uploaded whole on close, retried), so DCP shards go straight to S3."""
    from torch.distributed.checkpoint import FileSystemWriter

    if storage.is_local(uri):
        writer = FileSystemWriter(storage.local_path(uri), thread_count=thread_count, overwrite=True)
        writer.fs = _HashingFS(writer.fs, writer.path)
        return writer
    return _storage_classes()[0](uri, thread_count)


class _WriteStream:
    """A DCP output file on an object store: storage.HashingWriter, with the tell() DCP asks for."""

    def __init__(self, writer):
        self._w, self._n, self.digest = writer, 0, None

    def write(self, data) -> int:
        n = self._w.write(data)
        self._n += n
        return n

    def tell(self) -> int:
        return self._n

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:          # DCP closes the stream itself, then leaves the context
        if self.digest is None:
            self.digest = self._w.close()


class _ReadStream:
    """A DCP input file on an object store (storage.open_read), with the readinto DCP's views use."""

    def __init__(self, f):
        self._f = f

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        memoryview(b).cast("B")[:len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


@functools.cache
def _storage_classes():
    """(writer class, reader class): DCP's file system writer and reader over ckptflow.storage.
    Built on first use so that importing this module never imports torch."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystemBase

    class StorageFS(FileSystemBase):
        def __init__(self, root: str):
            self.root, self.digests = storage.normalize(root), {}

        def _name(self, path) -> str:
            return str(path)[len(self.root) + 1:]

        @contextmanager
        def create_stream(self, path, mode):
            if "w" not in mode:
                with storage.open_read(str(path)) as f:
                    yield _ReadStream(f)
                return
            with storage.HashingWriter(str(path)) as w:
                stream = _WriteStream(w)
                yield stream
                stream.close()
            self.digests[self._name(path)] = stream.digest

        def concat_path(self, path, suffix):
            return storage.join(str(path), suffix)

        def init_path(self, path, **_):
            return storage.normalize(str(path))

        def rename(self, path, new_path) -> None:       # only `.metadata.tmp` -> `.metadata`
            storage.put_atomic(str(new_path), storage.read_bytes(str(path)))
            storage.remove(str(path))
            if self._name(path) in self.digests:
                self.digests[self._name(new_path)] = self.digests.pop(self._name(path))

        def mkdir(self, path) -> None:
            storage.makedirs(str(path))

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return "://" in str(checkpoint_id)

        def exists(self, path) -> bool:
            return storage.exists(str(path))

        def rm_file(self, path) -> None:
            storage.remove(str(path))

        def ls(self, path) -> list[str]:
            return [storage.join(str(path), n) for n in storage.listdir(str(path))]

    class StorageWriter(FileSystemWriter):
        def __init__(self, uri: str, thread_count: int = 1):
            # sync_files off: DCP would fsync a local file; storage uploads each file whole on close
            super().__init__(uri, sync_files=False, thread_count=thread_count, overwrite=True)
            self.fs = StorageFS(uri)
            self.path = self.fs.init_path(uri)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return StorageFS.validate_checkpoint_id(checkpoint_id)

    class StorageReader(FileSystemReader):
        def __init__(self, uri: str):
            super().__init__(uri)
            self.fs = StorageFS(uri)
            self.path = self.fs.init_path(uri)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id) -> bool:
            return StorageFS.validate_checkpoint_id(checkpoint_id)

    return StorageWriter, StorageReader


@contextmanager
def _checked(uri: str):
    """DCP raises CheckpointException (a BaseException, with one failure per rank): one CkptError."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        failures = getattr(e, "failures", {}) or {}
        first = next(iter(failures.values()), e)
        inner = getattr(first, "exception", first)
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            inner = inner[0]          # torch >= 2.6 keeps (exception, traceback summary) per rank
        raise CkptError(f"{uri}: {type(inner).__name__}: {str(inner).strip().splitlines()[-1] if str(inner).strip() else ''}") from e


@contextmanager
def _quiet():
    """DCP warns on every single-process call that it assumes a single process; we mean it."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        warnings.filterwarnings("ignore", message=r".*overwrite.*", category=FutureWarning)
        yield


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def save_state(state_dict: dict, uri: str, *, process_group=None, thread_count: int = 1) -> dict:
    """Save a (possibly nested, possibly DTensor-sharded) state dict as DCP at `uri`, from one
    process or from every rank of a process group. Returns {file name: {size, sha256}} of every
    file written by every rank (gathered), for the caller's manifest; commit it after this returns.

        out = Output(uri)                                   # rank 0
        digests = dcp.save_state({"model": model_sd, "optimizer": optim_sd, "step": step}, uri)
        out.files.update(digests); out.commit(manifest)     # rank 0
    """
    import torch.distributed.checkpoint as tdcp

    uri = storage.normalize(uri)
    writer = storage_writer(uri, thread_count=thread_count)
    with _quiet():
        tdcp.save(state_dict, storage_writer=writer, process_group=process_group, no_dist=not _distributed())
    return _gather_digests(writer.fs.digests, process_group)


def save_state_async(state_dict: dict, uri: str, *, process_group=None, thread_count: int = 1):
    """save_state in two halves: this returns once every tensor is copied into CPU memory (DCP's
    staging), the files are written by a thread DCP starts; the returned `finish()` waits for
    them and returns what save_state returns. Under torch.distributed give a gloo
    `process_group` of its own: DCP's collectives then run in that thread beside training's.

        finish = dcp.save_state_async(sd, uri, process_group=side)   # training goes on
        out.files.update(finish()); out.commit(manifest)             # later, rank 0
    """
    import torch.distributed.checkpoint as tdcp

    uri = storage.normalize(uri)
    writer = storage_writer(uri, thread_count=thread_count)
    with _quiet():
        fut = tdcp.async_save(state_dict, storage_writer=writer, process_group=process_group,
                              no_dist=not _distributed())

    def finish() -> dict:
        with _quiet(), _checked(uri):
            fut.result()
        return _gather_digests(writer.fs.digests, process_group)
    return finish


def _gather_digests(mine: dict, process_group) -> dict:
    """Every rank's {file: digest} (each rank hashed the files it wrote)."""
    import torch.distributed as dist

    digests = dict(mine)
    if _distributed():
        gathered = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(gathered, digests, group=process_group)
        for part in gathered:
            digests.update(part)
    return dict(sorted(digests.items()))


def load_state(state_dict: dict, uri: str, *, process_group=None, strict: bool = True) -> None:
    """Load DCP `uri` into `state_dict` in place (tensors preallocated, DTensors resharded to
    their current placement). strict=False tolerates keys the checkpoint lacks."""
    from torch.distributed.checkpoint import load as tdcp_load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    uri = storage.normalize(uri)
    with _quiet(), _checked(uri):
        tdcp_load(state_dict, storage_reader=storage_reader(uri), process_group=process_group,
                  planner=DefaultLoadPlanner(allow_partial_load=not strict), no_dist=not _distributed())


def write_view(view, out, *, out_dtype: str | None = None, max_shard: int | None = None, progress=None) -> Manifest:
    """Write `view` as a DCP directory of tune-named tensors (plus assets/) into Output `out`."""
    from ckptflow.formats.tune import check_items, dominant_dtype

    items = [cast(it, out_dtype) for it in view.items.values()]
    check_items([FilePlan("", items)], view.args, view.uri)
    sd = _materialize(items, progress)
    out.files.update(save_state(sd, out.uri))
    for name, src in view.assets.items():
        out.copy(src, f"{ASSETS}/{name}")
    plans = view.plans(max_shard, out_dtype)
    return Manifest(kind="model", format="dcp", family=view.family.NAME, model_args=view.args.to_dict(),
                    dtype=dominant_dtype([FilePlan("", items)]),
                    extra={"original": dict(view.original or {"format": view.format}),
                           "layout": [{"name": p.name, "keys": [i.name for i in p.items]} for p in plans]})


def _materialize(items: list[Item], progress) -> dict:
    """{tune key: tensor}; safetensors sources without a transform are memory-mapped, not copied."""
    sd, handles, mapped = {}, {}, {}
    try:
        for it in items:
            if it.is_raw_copy and storage.is_local(it.info.file):
                sd[it.name] = _mapped(it, mapped)
            else:
                sd[it.name] = tensor(it, handles)
            if progress is not None:
                progress(it.out_nbytes)
    finally:
        for h in handles.values():
            h.close()
    return sd


def _mapped(it: Item, mapped: dict):
    from safetensors import safe_open

    path = storage.local_path(it.info.file)
    if path not in mapped:
        mapped[path] = safe_open(path, "pt")
    return mapped[path].get_tensor(it.info.name)
