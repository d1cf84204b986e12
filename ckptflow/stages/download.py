"""Download a model into a run's source/ directory.

    ckptflow download hf://ORG/NAME[@REVISION] DST [--format hf|meta|all] [--endpoint URL]
    ckptflow download s3://bucket/model DST [--in-place]    # any fsspec URI or local path
    ckptflow download "seed://llama?dim=64" DST

hf:// goes through huggingface_hub. The revision is resolved to its commit sha first, every
file is fetched from that sha and checked against the size and hash the Hub publishes, and the
sha is recorded (params.revision, lineage.revision), so a re-run gets the same bytes. Only the
files the format needs are fetched (FILES below). The token comes from HF_TOKEN (or `token=`).
Files land in DST one by one: an interrupted download keeps the finished ones and the next
run fetches only the rest. Transient faults are retried with backoff (retry.py), per file.

Storage URIs are copied into DST with checksums, or with `in_place=True` used where they are:
DST then holds only ckptflow.json (no files) with `extra.location` naming the source, and
`location(DST)` is where readers find the model.

The result is committed with a manifest; a second download of the same source into the same
place does nothing (for a pinned hf:// revision, not even a request to the Hub). A committed DST
that another request made is refused, naming what differs, unless --overwrite (commit.reusable,
the rule of every stage); --overwrite downloads again even for the same request.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed

from ckptflow import commit, hub, manifest, progress, retry, seed, storage
from ckptflow.commit import MARKER, Output
from ckptflow.errors import CkptError, TransientError
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

FORMATS = ("hf", "meta", "all")
# Non-weight files every format keeps: configs, tokenizers, generation settings, licences.
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
         "vocab.txt", "*.tiktoken", "chat_template.json", "chat_template.jinja",
         "LICENSE", "LICENSE.*", "LICENCE", "USE_POLICY.md", "NOTICE")
# HF weights in order of preference: (kind, index, single file). safetensors wins over .bin.
HF_WEIGHTS = (("safetensors", "model.safetensors.index.json", "model.safetensors"),
              ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"))
# Meta's own layout: original/ in the HF repos of Llama, or at the top (Mistral's consolidated files).
META_TOP = ("params.json", "consolidated*", "tokenizer.model*")
WORKERS = 8


def run(source: str, dst: str, *, format: str = "hf", endpoint: str | None = None, token: str | None = None,
        in_place: bool = False, overwrite: bool = False, cache_dir: str | None = None, wait: float = 0.0) -> Manifest:
    dst = storage.normalize(dst)
    if format not in FORMATS:
        raise CkptError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    existing = manifest.read(dst)
    hub_source = source.startswith(hub.SCHEME)
    params = {"source": source} if not in_place else {"source": source, "in_place": True}
    # The same request again is no work (a hub branch that moved is fetched again); anything else
    # is refused without --overwrite. --overwrite always downloads again: nothing fingerprints
    # the source's content, so "the same request" cannot say that the bytes are the same.
    same = None if overwrite else reusable(dst, existing, {"source": source, "format": format} if hub_source else params)
    replace = overwrite or existing is not None
    if hub_source:
        if in_place:
            raise CkptError(f"{source}: --in-place is for storage URIs; hf:// is always downloaded into DST")
        client = hub.Client(endpoint, token, cache_dir)
        return from_hub(source, dst, client, format=format, existing=same, replace=replace, wait=wait)
    if same is not None:
        log.info("%s: %s already downloaded", dst, source)
        return same
    if source.startswith("seed://"):
        if in_place:
            raise CkptError(f"{source}: --in-place is for storage URIs; a seed model is written into DST")
        with Output(dst, overwrite=replace, wait=wait) as out:
            return out.commit(seed.write(source, out))
    if in_place:
        return link(source, dst, params, overwrite=replace, wait=wait)
    return copy_tree(source, dst, params, overwrite=replace, wait=wait)


def reusable(dst: str, existing: Manifest | None, request: dict) -> Manifest | None:
    """commit.reusable's rule for a download, which has no inputs, only the request's params:
    `existing` when it was made by the same request, None when there is nothing, else the
    CkptError naming what differs. A hub download's params also hold the commit its revision
    resolved to, which the request does not know yet: from_hub compares that after resolving."""
    if existing is None:
        return None
    made_with = {k: v for k, v in existing.params.items() if k != "revision"} \
        if existing.kind == "source" and "format" in request else existing.params
    asked = dataclasses.replace(existing, params=made_with)
    return existing if commit.reusable(dst, asked, {}, request, overwrite=False) is not None else None


def location(uri_or_manifest) -> str:
    """Where the downloaded model's files are: DST itself, or the source of an in-place download."""
    m = uri_or_manifest if isinstance(uri_or_manifest, Manifest) else manifest.require(uri_or_manifest)
    return m.extra.get("location") or m.uri


# -- storage URIs ------------------------------------------------------------------------------

def _source_files(source: str) -> tuple[str, list[str]]:
    src = storage.normalize(source)
    files = [f for f in storage.list_files(src) if f not in (manifest.NAME, MARKER)]
    if not files:
        raise CkptError(f"{source}: nothing to download (empty or missing)")
    return src, files


def _source_manifest(source: str, src: str, params: dict) -> Manifest:
    from ckptflow.formats import registry

    prior = manifest.read(src)       # read once: sniff would read it again for the format
    fmt = prior.format if prior is not None else registry.sniff(src)
    lineage = dict(prior.lineage) if prior else {"source": source, "revision": None, "stages": []}
    return Manifest(kind="source", format=fmt, family=prior.family if prior else None,
                    model_args=prior.model_args if prior else None, dtype=prior.dtype if prior else None,
                    params=params, lineage=lineage, extra=dict(prior.extra) if prior else {})


def copy_tree(source: str, dst: str, params: dict, *, overwrite: bool, wait: float = 0.0) -> Manifest:
    src, files = _source_files(source)
    m = _source_manifest(source, src, params)
    with Output(dst, overwrite=overwrite, wait=wait) as out:
        out.reserve(sum(storage.size(storage.join(src, name)) for name in files))
        for name in files:
            out.copy(storage.join(src, name), name)
        return out.commit(m)


def link(source: str, dst: str, params: dict, *, overwrite: bool, wait: float = 0.0) -> Manifest:
    """Commit a manifest at DST that points at the source, which stays where it is (no copy, no hashing)."""
    src, files = _source_files(source)
    m = _source_manifest(source, src, params)
    m.extra = {**m.extra, "location": src, "source_files": {f: {"size": storage.size(storage.join(src, f))}
                                                            for f in files}}
    with Output(dst, overwrite=overwrite, wait=wait) as out:
        return out.commit(m)


# -- the Hub -----------------------------------------------------------------------------------

class _Resumable(Output):
    """An Output that keeps the files of an interrupted download (its own, or a dead writer's)
    instead of clearing them; a failed attempt leaves them for the next (not on a full disk)."""

    resumable = True

    def _clear(self, overwrite: bool, expect: tuple | None) -> None:
        if not overwrite and manifest.read(self.uri) is None:
            if [n for n in storage.listdir(self.uri) if n != MARKER]:
                log.info("%s: resuming an interrupted download", self.uri)
            return
        super()._clear(overwrite, expect)


def from_hub(source: str, dst: str, client: hub.Client, *, format: str, existing: Manifest | None,
             replace: bool, wait: float = 0.0) -> Manifest:
    """Download `source` into dst; `existing`: dst's committed download of the same request (kept
    for a pinned sha, or when the Hub is unreachable), or None."""
    repo_id, revision = hub.parse(source)
    same = existing is not None
    if same and hub.is_commit(revision):
        log.info("%s: %s already downloaded", dst, source)
        return existing
    try:
        snap = retry.call(client.resolve, repo_id, revision, uri=source, what="resolve the revision")
    except TransientError:
        if not same:
            raise
        log.warning("%s: the Hub is unreachable; keeping the download of %s at %s", dst, source,
                    existing.params.get("revision"))
        return existing
    if same and existing.params.get("revision") == snap.sha:
        log.info("%s: %s already downloaded at %s", dst, source, snap.sha)
        return existing
    first, index = select(snap, format)   # before DST is touched: a repo without weights is bad input
    local = storage.is_local(dst)
    # Local: the files land in DST itself. Remote: in a local staging directory, then copied.
    staging = storage.local_path(dst) if local else _staging_dir(client, snap)
    with (_Resumable if local else Output)(dst, overwrite=replace, wait=wait) as out:
        if local:
            out.reserve(_to_fetch(snap, first, index, staging))
        names = fetch_snapshot(client, snap, first, index, staging)
        if local:
            for name, d in names.items():
                out.adopt(name, d)
            _prune(staging, names)
        else:
            for name, d in names.items():
                got = out.copy(os.path.join(staging, name), name)
                if got["sha256"] != d["sha256"]:
                    raise TransientError(f"{dst}/{name}: changed while copied from {staging}")
        m = _hub_manifest(source, snap, format, staging, client.endpoint)
        committed = out.commit(m)
    if not local:
        shutil.rmtree(staging, ignore_errors=True)
    return committed


def fetch_snapshot(client: hub.Client, snap: hub.Snapshot, first: list[str], index: str | None,
                   local_dir: str) -> dict[str, dict]:
    """Fetch `first`, then the shards `index` names, into local_dir; {repo path: {size, sha256, git_oid}}."""
    got = _fetch_all(client, snap, first, local_dir)
    if index:  # the shards are the files the index names, no more (Mistral repos hold two layouts)
        got.update(_fetch_all(client, snap, _index_shards(snap, os.path.join(local_dir, index), index), local_dir))
    return dict(sorted(got.items()))


def _to_fetch(snap: hub.Snapshot, first: list[str], index: str | None, local_dir: str) -> int:
    """Bytes still to download: `first`, and for an index the top-level files of its weights'
    kind (the shards it will name), less what a resumed download already holds."""
    ext = ".safetensors" if index and "safetensors" in index else ".bin"
    wanted = set(first) | ({p for p in snap.files if "/" not in p and p.endswith(ext)} if index else set())
    have = {n: os.path.getsize(os.path.join(local_dir, n)) for n in _listed(local_dir)} if os.path.isdir(local_dir) else {}
    return sum(max(0, (snap.files[p].size or 0) - have.get(p, 0)) for p in wanted)


def select(snap: hub.Snapshot, format: str) -> tuple[list[str], str | None]:
    """(files to fetch first, the index whose shards to fetch after it, or None)."""
    paths = sorted(snap.files)
    keep = [p for p in paths if "/" not in p and any(fnmatch.fnmatchcase(p, g) for g in FILES)]
    if format == "all":
        return paths, None
    if format == "meta":
        meta = [p for p in paths if p.startswith("original/")] or \
               [p for p in paths if "/" not in p and any(fnmatch.fnmatchcase(p, g) for g in META_TOP)]
        if not any(p.endswith("params.json") for p in meta):
            raise CkptError(f"{snap.uri}: no Meta weights (original/params.json or params.json); "
                            f"files: {', '.join(paths[:12])}")
        return sorted(set(keep) | set(meta)), None
    for _, index, single in HF_WEIGHTS:
        if index in snap.files:
            return sorted(set(keep) | {index}), index
        if single in snap.files:
            return sorted(set(keep) | {single}), None
    raise CkptError(f"{snap.uri}: no model.safetensors, pytorch_model.bin or their index "
                    f"(files: {', '.join(paths[:12])}); for Meta weights pass --format meta")


def _index_shards(snap: hub.Snapshot, local_index: str, index: str) -> list[str]:
    import json

    where = f"{snap.uri}: {index}"
    try:
        with open(local_index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise CkptError(f"{where}: not a valid index ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CkptError(f"{where}: no weight_map")
    shards = sorted({storage.safe_relpath(f, where) for f in weight_map.values()})
    missing = [s for s in shards if s not in snap.files]
    if missing:
        raise CkptError(f"{where}: lists shard {missing[0]!r}, which the repository does not have")
    return shards


def _fetch_all(client: hub.Client, snap: hub.Snapshot, paths: list[str], local_dir: str) -> dict[str, dict]:
    got: dict[str, dict] = {}
    total = sum(snap.files[p].size or 0 for p in paths)
    with progress.bar(total, f"download {snap.repo_id}") as bar, \
            ThreadPoolExecutor(max_workers=max(1, min(WORKERS, len(paths)))) as pool:
        futures = {pool.submit(_fetch_one, client, snap, p, local_dir): p for p in paths}
        try:
            for fut in as_completed(futures):
                path = futures[fut]
                got[path] = fut.result()
                bar(got[path]["size"], file=path)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return got


def _fetch_one(client: hub.Client, snap: hub.Snapshot, path: str, local_dir: str) -> dict:
    what = f"{snap.uri}: {path}"

    def attempt() -> dict:
        local = client.fetch(snap, path, local_dir)
        got = hub.digest(local)
        try:
            hub.check(snap.files[path], got, what)
        except TransientError:
            os.remove(local)  # so the next attempt fetches it again instead of trusting it
            raise
        return got

    return retry.call(attempt, uri=snap.uri, what=f"download {path}")


def _staging_dir(client: hub.Client, snap: hub.Snapshot) -> str:
    """A local directory for a download bound for remote storage; kept across attempts."""
    from huggingface_hub import constants

    root = client.cache_dir or constants.HF_HUB_CACHE
    return os.path.join(root, "ckptflow-staging", f"{snap.repo_id.replace('/', '--')}--{snap.sha}")


def _prune(local_dir: str, keep: dict) -> None:
    """Drop the client's bookkeeping and files an interrupted download of another revision left."""
    shutil.rmtree(os.path.join(local_dir, ".cache"), ignore_errors=True)
    for name in storage.list_files(local_dir):
        if name not in keep and name != MARKER:
            os.remove(os.path.join(local_dir, name))


def _hub_manifest(source: str, snap: hub.Snapshot, format: str, local_dir: str, endpoint: str) -> Manifest:
    fmt, family, args, dtype = _describe(local_dir, format)
    lineage = {"source": f"{hub.SCHEME}{snap.repo_id}", "revision": snap.sha, "requested_revision": snap.revision,
               "endpoint": endpoint, "stages": [{"stage": "download", "source": source, "revision": snap.sha}]}
    skipped = sorted(set(snap.files) - set(_listed(local_dir)))
    return Manifest(kind="source", format=fmt, family=family, model_args=args, dtype=dtype,
                    params={"source": source, "revision": snap.sha, "format": format}, lineage=lineage,
                    extra={"hub": {"repo_id": snap.repo_id, "files": {p: f.to_dict() for p, f in snap.files.items()},
                                   "skipped": skipped}})


def _listed(local_dir: str) -> list[str]:
    return [n for n in storage.list_files(local_dir) if n != MARKER and not n.startswith(".cache/")]


def _describe(local_dir: str, format: str) -> tuple[str, str | None, dict | None, str | None]:
    """(format, family, model_args, dtype) as far as ckptflow reads the download; the source stage
    keeps what came even when a later stage will refuse it."""
    from ckptflow.formats import registry

    try:
        d = registry.detect(local_dir)
    except CkptError as e:
        log.info("%s: kept as downloaded (%s)", local_dir, e)
        return ("meta" if format == "meta" else "hf"), None, None, None
    args = None
    if d.format == "hf":
        from ckptflow.formats import hf

        args = hf.open_source(local_dir).args.to_dict()
    return d.format, d.family, args, d.dtype
