"""What every stage task shares: the cache key, the retry condition, where results live.

Cache key: sha256 of the stage name, the ckptflow version, the task's parameters and the
fingerprints of the input manifests (never the flow run id, so a new flow run of the same
config hits the cache). A recorded result is honoured only while the output it names is still
committed with the same manifest and every listed file is there with its size; otherwise the
key function forgets the record and the stage runs again (and then the library's own
idempotency decides whether there is work to do). Sizes, not sha256: re-hashing a 14 GB model on
every resume would cost more than most stages; `ckptflow verify` does the full check.

A stage whose inputs are not all committed manifests (an export from a run directory, whose
newest step may still change) gets no key: Prefect does not cache it, the library skips it
when its output already matches.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import re

from prefect.filesystems import RemoteFileSystem

from ckptflow import __version__, credentials, manifest, storage
from ckptflow.errors import CkptError

log = logging.getLogger(__name__)

RETRIES = 3
BACKOFF_SECONDS = 10.0    # 10, 20, 40 s: long enough to outlast a storage or hub hiccup
JITTER = 0.5              # +-50 %, so parallel runs that failed together do not retry together
RESULTS_DIR = ".cache/prefect-results"


def artifact_key(run_id: str, what: str) -> str:
    """A run's artifact key: Prefect allows only lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-") or "run"
    return f"{slug}-{what}"


def record(m: manifest.Manifest) -> dict:
    """What a task returns: where its output is and what it is, never the tensors."""
    return {"uri": m.uri, "fingerprint": manifest.fingerprint(m), "kind": m.kind, "format": m.format,
            "family": m.family, "dtype": m.dtype, "step": m.step, "created": m.created,
            "size_bytes": sum(f.get("size", 0) for f in m.files.values()),
            "source": (m.lineage or {}).get("source"), "revision": (m.lineage or {}).get("revision")}


# ---- cache keys ------------------------------------------------------------------------------

def stage_key(*manifest_params: str, view=None):
    """A cache_key_fn: the parameters (or `view(params)`) plus the fingerprints of the
    manifests at the URIs in `manifest_params`."""
    def key_fn(ctx, params: dict) -> str | None:
        inputs = {}
        for name in manifest_params:
            uri = params.get(name)
            m = manifest.read(uri) if uri else None
            if uri and m is None:
                return None                      # not a committed input: no caching
            inputs[name] = manifest.fingerprint(m) if m else None
        body = {"stage": ctx.task.name, "tool": __version__, "inputs": inputs,
                "params": view(params) if view else params}
        key = f"{ctx.task.name}-" + hashlib.sha256(canonical(body)).hexdigest()
        forget_if_stale(ctx.result_store, key)
        return key
    return key_fn


def canonical(obj) -> bytes:
    from pydantic_core import to_jsonable_python

    return json.dumps(to_jsonable_python(obj), sort_keys=True, separators=(",", ":")).encode()


def forget_if_stale(store, key: str) -> None:
    """Delete the cached record under `key` when the output it names is gone or was replaced."""
    try:
        if not store.exists(key):
            return
        rec = store.read(key).result
    except Exception as e:  # noqa: BLE001 - an unreadable record is as good as none
        log.warning("cache record %s unreadable (%s); running the stage", key, e)
        rec = None
    problem = output_problem(rec)
    if problem is None:
        return
    log.info("cache record %s not honoured: %s", key, problem)
    storage.remove(storage.join(str(store.result_storage.basepath), key))
    store.cache.clear()


def output_problem(rec) -> str | None:
    """Why the output a cached record names cannot be trusted, or None when it can."""
    if not isinstance(rec, dict) or not rec.get("uri") or not rec.get("fingerprint"):
        return "the record names no committed output"
    m = manifest.read(rec["uri"])
    if m is None:
        return f"{rec['uri']}: no longer committed"
    if manifest.fingerprint(m) != rec["fingerprint"]:
        return f"{rec['uri']}: rewritten since"
    for name, want in m.files.items():
        path = storage.join(rec["uri"], name)
        if not storage.isfile(path) or storage.size(path) != want.get("size"):
            return f"{path}: missing or resized"
    return None


# ---- retries ---------------------------------------------------------------------------------

def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry anything but a CkptError: bad input fails the same way every time."""
    try:
        state.result()
    except CkptError:
        return False
    except Exception:  # noqa: BLE001 - a fault worth another try
        return True
    return True


def retry_options() -> dict:
    from prefect.tasks import exponential_backoff

    return {"retries": RETRIES, "retry_delay_seconds": exponential_backoff(BACKOFF_SECONDS),
            "retry_jitter_factor": JITTER, "retry_condition_fn": retry_unless_bad_input}


# ---- where results live ----------------------------------------------------------------------

def results_uri(storage_uri: str) -> str:
    return storage.join(storage.normalize(storage_uri), RESULTS_DIR)


def use_options(uris, storage_options: dict | None) -> None:
    """Register `storage_options` for the store (bucket) of each URI in this process, credential
    references ({"env": ...}, {"secret": ...}) resolved here: the values never go back to
    Prefect. The whole bucket: a step names its base model elsewhere in it."""
    if not storage_options:
        return
    resolved = credentials.resolve(storage_options)
    for uri in uris:
        if uri and not storage.is_local(storage.normalize(uri)):
            scheme, _, rest = storage.normalize(uri).partition("://")
            storage.set_options(f"{scheme}://{rest.split('/', 1)[0]}", resolved)


def result_storage(storage_uri: str, storage_options: dict | None = None):
    """Prefect result storage beside the runs: a Path locally (a str would be read as a block
    slug), a saved ResultsStorage block for object stores (an unsaved one is refused). The block
    holds the base path only; the options (credentials resolved) stay in this process."""
    uri = results_uri(storage_uri)
    if storage.is_local(uri):
        return pathlib.Path(storage.local_path(uri))
    use_options([uri], storage_options)
    block = ResultsStorage(basepath=uri)
    block.save("ckptflow-results-" + hashlib.sha256(uri.encode()).hexdigest()[:12], overwrite=True)
    return block


class ResultsStorage(RemoteFileSystem):
    """A RemoteFileSystem whose saved document holds the base path only: its filesystem comes
    from ckptflow.storage, with the options this process registered or the environment (AWS_*)."""

    _block_type_name = "ckptflow results"
    _block_type_slug = "ckptflow-results"
    _description = "Task results of ckptflow runs; credentials stay in the process that runs the task."

    @property
    def filesystem(self):
        if self.settings:
            raise ValueError("a ckptflow-results block takes no settings (credentials stay out of blocks)")
        if not self._filesystem:
            self._filesystem = storage.fs_and_path(self.basepath)[0]
        return self._filesystem


def load_secret(name: str) -> str:
    """{"secret": NAME} in storage_options: the value of the Prefect Secret block NAME."""
    from prefect.blocks.system import Secret

    return Secret.load(name).get()


def bind(task, results) -> object:
    """The task with its results stored in `results` (from result_storage)."""
    return task.with_options(result_storage=results)
