"""Step checkpoints: asynchronous saves, retention, discovery for resume.

    ck = Checkpointer(train_uri, cfg.checkpoint, device=device)
    if ck.due(step):
        ck.save(step, {"model.safetensors": sd, ...}, {"trainer_state.json": {...}}, manifest)
    ck.close()                      # waits for the save in flight, re-raising its error

A save first waits for the previous one (at most one in flight), then snapshots the tensors
into CPU buffers it reuses (pinned memory when they live on CUDA), and hands the snapshot to a
background thread that writes `step-000050/` through commit.Output: files hashed while written,
ckptflow.json last. Training goes on during the write. With async off the same write happens
in the caller. Retention runs after each commit and only ever deletes steps older than the one
just committed, so a crash at any moment leaves the newest committed step intact.

What a background save costs the training thread, and why (bench/checkpoint.py, issue 16):
- The snapshot copy (12 bytes per parameter for full fine-tuning: weights and both AdamW
  moments; LoRA: only the adapter and its moments) is memory-bound, about 17 GB/s here, and
  on CPU it was most of what an async save blocked. With save(copy_later=True) (the trainer's
  saves of CPU tensors) the writer thread makes that copy, with numpy (one core, GIL released;
  a torch copy from that thread would start an OpenMP team of its own), while the next forward
  and backward run: they only read the tensors. settle() returns once the copy is taken, and the
  trainer calls it before the optimizer step, the first thing that changes them. CUDA tensors
  are still copied in the caller (non-blocking into pinned memory, then one synchronize).
- The writer hashes in its own thread (storage.HashingWriter threaded=False) rather than in a
  hasher thread beside it, so a background save takes one core, not two. A synchronous save
  keeps the hasher thread: training is waiting and both cores are free; so does a background
  save's next file once training waits for it (a save due before the previous one is written).
- On CPU the writer competes with torch's intra-op threads, which use every core. A writer
  that preempts one of them makes every parallel region wait for that straggler: training
  steps ran up to 4x slower while a save was written, and async saves cost more than
  synchronous ones. So the trainer runs one thread fewer while busy(), that is while the writer
  copies, hashes and writes, not while it waits for fsyncs, uploads or the commit
  (trainer._pace_threads, checkpoint.yield_threads). Running the writer at idle priority instead (SCHED_IDLE, or the
  nice 10 this module once used) starves it whenever the cores are busy, including with other
  processes, and training then waits for it at the next save.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from ckptflow import manifest, storage
from ckptflow.commit import MARKER, Output
from ckptflow.errors import CkptError
from ckptflow.formats import st
from ckptflow.manifest import Manifest

log = logging.getLogger(__name__)

PREFIX = "step-"


def step_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def parse_step(name: str) -> int | None:
    rest = name.removeprefix(PREFIX)
    return int(rest) if name.startswith(PREFIX) and rest.isdigit() else None


def list_steps(train_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of the committed step checkpoints, oldest first."""
    out = []
    for name in storage.listdir(train_uri):
        step = parse_step(name)
        uri = storage.join(train_uri, name)
        if step is not None and manifest.is_committed(uri):
            out.append((step, uri))
    return sorted(out)


def latest(train_uri: str, *, verify: bool = True) -> Manifest | None:
    """The newest committed step whose files verify; a damaged one is skipped with a warning."""
    for step, uri in reversed(list_steps(train_uri)):
        problems = manifest.verify(uri) if verify else []
        if not problems:
            return manifest.require(uri)
        log.warning("%s: skipping a damaged checkpoint (%s)", uri, problems[0])
    return None


def is_run(uri: str) -> bool:
    """A run directory (`{storage}/{run_id}`): it has run.json or train/, and no manifest of its own."""
    names = storage.listdir(uri)
    return "run.json" in names or "train" in names


def newest_of_run(run_uri: str) -> Manifest:
    """A run as a checkpoint: its newest committed, verified step (what export and generate take)."""
    m = latest(storage.join(run_uri, "train"))
    if m is None:
        raise CkptError(f"{run_uri}: a run with no committed, verified step checkpoint under train/")
    return m


def find(train_uri: str, step: int, *, verify: bool = True) -> Manifest:
    """Step `step`, committed and verified, or an error listing what there is."""
    uri = storage.join(train_uri, step_name(step))
    m = manifest.read(uri)
    if m is None:
        have = [s for s, _ in list_steps(train_uri)]
        raise CkptError(f"{uri}: no committed checkpoint for step {step} (committed steps: {have or 'none'})")
    problems = manifest.verify(uri) if verify else []
    if problems:
        raise CkptError(f"{uri}: checkpoint does not verify: {problems[0]}")
    return m


def read_tensors(step_uri: str, name: str) -> dict:
    """The tensors of one safetensors file of a step checkpoint."""
    path = storage.join(step_uri, name)
    _, infos = st.read_header(path)
    with storage.open_read(path) as f:
        return {t.name: st.to_torch(st.read_tensor_bytes(t, f), t.dtype, t.shape) for t in infos}


def read_dcp_step(uri: str, trainable: dict, with_optimizer: bool) -> tuple[dict, dict | None]:
    """(weights, flat optimizer state "{name}.{field}") of a DCP step, as full tensors."""
    import torch

    from ckptflow.formats import dcp

    want: dict = {"model": {k: torch.empty_like(v, device="cpu") for k, v in trainable.items()}}
    if with_optimizer:
        want["optimizer"] = {k: {"step": torch.zeros((), dtype=torch.float32),
                                 "exp_avg": torch.empty_like(v, device="cpu"),
                                 "exp_avg_sq": torch.empty_like(v, device="cpu")} for k, v in trainable.items()}
    dcp.load_state(want, uri)
    flat = None
    if with_optimizer:
        flat = {f"{name}.{field}": t for name, fields in want["optimizer"].items() for field, t in fields.items()}
    return want["model"], flat


def rank_rng_tensors(state: dict, rank: int) -> dict | None:
    """RNG tensors of `rank` from a trainer_state.json (None when that rank did not exist)."""
    import torch

    ranks = state.get("rng", {}).get("ranks") or []
    if rank >= len(ranks):
        log.warning("no RNG state saved for rank %d (saved by %d processes): it keeps its seeded state", rank, len(ranks))
        return None
    return {k: torch.tensor(v, dtype=torch.uint8) for k, v in ranks[rank].items()}


def write_tensors(out: Output, name: str, tensors: dict, *, threaded: bool = True) -> None:
    """A safetensors file streamed from CPU tensors, in chunks (no second copy of the whole tensor).
    threaded=False hashes in this thread (Output.open)."""
    import torch

    entries = []
    for key, t in tensors.items():
        code = st.ST_NAME[str(t.dtype).removeprefix("torch.")]
        entries.append((key, code, list(t.shape), t.numel() * t.element_size()))
    with out.open(name, threaded=threaded) as f:
        f.write(st.header_bytes(entries, {"format": "pt"}))
        for t in tensors.values():
            if t.numel() == 0:
                continue
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            for i in range(0, raw.shape[0], storage.CHUNK):
                # A numpy view, not a bytes copy: the file write and the hasher read it with the
                # GIL released. Safe because nothing changes a snapshot (or, in a synchronous
                # save, the live tensors) until this file is closed.
                f.write(raw[i:i + storage.CHUNK])


def plan_retention(steps: list[int], newest: int, *, keep_last: int | None, keep_every: int | None,
                   pin: list[int]) -> list[int]:
    """Steps to delete once `newest` is committed: never `newest` or anything after it."""
    if keep_last is None:
        return []
    upto = sorted(s for s in steps if s <= newest)
    keep = set(upto[-keep_last:]) | set(pin) | {newest}
    if keep_every:
        keep |= {s for s in upto if s % keep_every == 0}
    return [s for s in upto if s not in keep]


def delete_step(uri: str) -> None:
    # The manifest goes first: a crash mid-delete leaves an uncommitted directory, never a
    # half-deleted one that still looks committed.
    manifest.uncommit(uri)
    storage.remove(uri)


class Checkpointer:
    def __init__(self, train_uri: str, cfg, *, on_commit=None):
        """`cfg` is a config.CheckpointConfig; `on_commit(manifest)` runs in the writer thread."""
        self.train_uri = storage.normalize(train_uri)
        self.cfg = cfg
        self.on_commit = on_commit
        self.stats: list[dict] = []          # one record per save: step, blocked_s, write_s, bytes, ...
        self.last: Manifest | None = None    # the newest manifest this checkpointer committed
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptflow-save") if cfg.async_ else None
        self._future: Future | None = None
        self._copied: threading.Event | None = None   # set once the save in flight holds its copy
        self._waited_on = threading.Event()            # training is blocked until the save in flight ends
        self._hot = threading.Event()                  # see busy()
        self._buffers: dict[tuple[str, str], object] = {}
        self._last_save = time.monotonic()
        self.saved_steps: set[int] = set()

    def busy(self) -> bool:
        """A background save is taking a core: copying, hashing and writing its bytes. Not while
        it only waits for fsyncs, uploads or the commit (an upload to an object store may last
        long and takes little CPU)."""
        return self._hot.is_set()

    def due(self, step: int) -> bool:
        every, secs = self.cfg.every_steps, self.cfg.every_seconds
        if every and step % every == 0:
            return True
        return bool(secs) and time.monotonic() - self._last_save >= secs

    def save(self, step: int, tensors: dict[str, dict], json_files: dict[str, dict], m: Manifest, *,
             copy_later: bool = False) -> str:
        """Checkpoint `step`: returns its URI once training may go on (the write may still run).

        copy_later (asynchronous saves of CPU tensors): the snapshot copy is made by the writer
        thread, not here, and the caller must call settle() before it changes any of `tensors`
        (the trainer does, before its next optimizer step)."""
        t0 = time.perf_counter()
        self.wait()
        t1 = time.perf_counter()
        later = copy_later and self._pool is not None and not _on_cuda(tensors)
        if self._pool is None:
            snap = _to_cpu(tensors)
        else:
            snap = tensors if later else self._snapshot(tensors, self._copy_now)
        bodies = {n: json.dumps(d, sort_keys=True, indent=1).encode() + b"\n" for n, d in json_files.items()}
        t2 = time.perf_counter()
        uri = storage.join(self.train_uri, step_name(step))
        rec = {"step": step, "uri": uri, "async": self._pool is not None, "wait_s": t1 - t0, "snapshot_s": t2 - t1,
               "copy_later": later, "settle_s": 0.0,
               "bytes": sum(t.numel() * t.element_size() for sd in snap.values() for t in sd.values())}
        self.stats.append(rec)
        self.saved_steps.add(step)
        self._last_save = time.monotonic()
        if self._pool is not None:
            self._copied = threading.Event() if later else None
            self._hot.set()
            self._future = self._pool.submit(self._write, uri, step, snap, bodies, m, rec, self._copied)
        else:
            self._write(uri, step, snap, bodies, m, rec)
        rec["blocked_s"] = time.perf_counter() - t0
        return uri

    def settle(self) -> None:
        """Return once the save in flight holds its own copy of the tensors handed to save (at
        once unless that save had copy_later): from then on the caller may change them."""
        ev, self._copied = self._copied, None
        if ev is not None:
            t0 = time.perf_counter()
            ev.wait()
            rec = self.stats[-1]
            rec["settle_s"] = time.perf_counter() - t0
            rec["blocked_s"] = rec.get("blocked_s", 0.0) + rec["settle_s"]

    def wait(self) -> Manifest | None:
        """Block until the save in flight is committed; re-raises its error."""
        if self._future is not None:
            fut, self._future = self._future, None
            self._copied = None    # a finished write has its copy, whatever became of it
            self._waited_on.set()  # the writer may take the cores training leaves idle meanwhile
            try:
                fut.result()
            finally:
                self._waited_on.clear()
        return self.last

    def close(self) -> Manifest | None:
        try:
            return self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _snapshot(self, tensors: dict[str, dict], copy) -> dict[str, dict]:
        """Copies into reused CPU buffers (pinned for CUDA tensors), safe to write while training goes on."""
        import torch

        out, on_cuda = {}, False
        for fname, sd in tensors.items():
            o = {}
            for key, t in sd.items():
                t = t.detach()
                cuda = t.device.type == "cuda"
                buf = self._buffers.get((fname, key))
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda)
                    self._buffers[(fname, key)] = buf
                copy(buf, t)
                on_cuda |= cuda
                o[key] = buf
            out[fname] = o
        if on_cuda:
            torch.cuda.synchronize()  # the non-blocking copies must land before the writer reads them
        return out

    @staticmethod
    def _copy_now(buf, t) -> None:
        buf.copy_(t, non_blocking=t.device.type == "cuda")

    @staticmethod
    def _copy_in_writer(buf, t) -> None:
        """A plain memory copy (numpy, GIL released): a torch copy_ from this thread would start
        an OpenMP team of its own beside the training threads'."""
        import numpy as np
        import torch

        if t.is_contiguous() and t.numel():
            np.copyto(buf.reshape(-1).view(torch.uint8).numpy(), t.reshape(-1).view(torch.uint8).numpy())
        else:
            buf.copy_(t)

    def _write(self, uri: str, step: int, snap: dict, bodies: dict, m: Manifest, rec: dict,
               copied: threading.Event | None = None) -> Manifest:
        t0 = time.perf_counter()
        try:
            if copied is not None:      # save(copy_later=True): the snapshot is taken here, then training may go on
                try:
                    snap = self._snapshot(snap, self._copy_in_writer)
                finally:
                    copied.set()
                rec["copy_s"] = time.perf_counter() - t0
            clear_our_leftovers(uri, set(snap) | set(bodies))
            with Output(uri, overwrite=True) as out:   # a same-numbered step of an abandoned branch is replaced
                for name, sd in snap.items():
                    # In the background the hashing stays in this thread: one core, not two (a hasher
                    # thread beside the writer would take the core training keeps, see _pace_threads),
                    # unless training is already waiting for this save: then its files hash beside it.
                    write_tensors(out, name, sd, threaded=self._pool is None or self._waited_on.is_set())
                for name, body in bodies.items():
                    out.put(name, body)
                rec["data_s"] = time.perf_counter() - t0
                self._hot.clear()       # every byte handed to storage: what is left waits for the disk or network
                committed = out.commit(m)
        finally:
            self._hot.clear()
        self.last = committed
        rec["write_s"] = time.perf_counter() - t0
        log.info("%s: committed step %d in %.2fs", uri, step, rec["write_s"])
        retain(self.train_uri, self.cfg, step)
        if self.on_commit is not None:
            self.on_commit(committed)
        return committed

    def submit(self, step: int, finish, rec: dict) -> None:
        """A save made elsewhere (every rank writing DCP shards): `finish()` waits for its write
        and commits it (returning the manifest, or None on ranks that do not commit). It runs in
        the background thread when saves are asynchronous, else here; the caller has waited for
        the previous save (`wait`) before starting this one. It counts for cadence and `last`."""
        self.stats.append(rec)
        self.saved_steps.add(step)
        self._last_save = time.monotonic()
        if self._pool is not None:
            self._hot.set()     # DCP's writer thread takes a core until the commit
            self._future = self._pool.submit(self._finish, finish, rec)
        else:
            self._finish(finish, rec)

    def _finish(self, finish, rec: dict) -> Manifest | None:
        t0 = time.perf_counter()
        try:
            m = finish()
        finally:
            self._hot.clear()
        rec["write_s"] = time.perf_counter() - t0 + rec.get("write_s", 0.0)
        if m is not None:
            self.last = m
        return m


def clear_our_leftovers(uri: str, ours: set[str]) -> None:
    """An uncommitted step directory holding only names a save writes is ours, whatever killed it:
    a save killed while putting its `.ckptflow-writing` marker leaves only the marker's temp
    file, and a retention delete killed half way leaves some files and no marker. commit.Output
    would refuse both as a stranger's directory; a file with any other name still makes it refuse."""
    names = storage.listdir(uri)
    if not names or manifest.NAME in names:
        return
    if all(n in ours or n.startswith(MARKER) or ".tmp-" in n for n in names):
        storage.remove(uri)


def retain(train_uri: str, cfg, newest: int) -> None:
    """Apply cfg's retention once step `newest` is committed."""
    steps = dict(list_steps(train_uri))
    for s in plan_retention(list(steps), newest, keep_last=cfg.keep_last, keep_every=cfg.keep_every, pin=cfg.pin):
        log.info("%s: deleted by retention (keep_last=%s)", steps[s], cfg.keep_last)
        delete_step(steps[s])


def _on_cuda(tensors: dict[str, dict]) -> bool:
    return any(t.device.type == "cuda" for sd in tensors.values() for t in sd.values())


def _to_cpu(tensors: dict[str, dict]) -> dict[str, dict]:
    """Synchronous saves write the live tensors (training waits), copying only what is not on the CPU."""
    return {f: {k: t.detach().cpu() for k, t in sd.items()} for f, sd in tensors.items()}
