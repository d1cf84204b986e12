import os
import threading
import time

import pytest
import torch

from ckptflow import checkpointer, manifest
from ckptflow.checkpointer import Checkpointer, plan_retention, read_tensors
from ckptflow.commit import MARKER
from ckptflow.config import CheckpointConfig
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest


def cfg(**kw):
    kw.setdefault("every_steps", 1)
    return CheckpointConfig(**kw)


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model.safetensors": {"w": torch.randn(64, 32, generator=g), "b": torch.zeros(3, dtype=torch.bfloat16)},
            "optimizer.safetensors": {"w.step": torch.tensor(float(step)), "w.exp_avg": torch.randn(64, 32, generator=g)}}


def save(ck, step, tensors=None):
    return ck.save(step, tensors or state(step), {"trainer_state.json": {"step": step}},
                   Manifest(kind="train_state", format="tune", step=step))


@pytest.mark.parametrize("steps,newest,kw,doomed", [
    ([10, 20, 30, 40], 40, dict(keep_last=2, keep_every=None, pin=[]), [10, 20]),
    ([10, 20, 30, 40], 40, dict(keep_last=None, keep_every=None, pin=[]), []),
    ([10, 20, 30, 40, 50], 50, dict(keep_last=1, keep_every=20, pin=[]), [10, 30]),
    ([10, 20, 30, 40], 40, dict(keep_last=1, keep_every=None, pin=[10]), [20, 30]),
    ([10, 20, 30, 40], 20, dict(keep_last=1, keep_every=None, pin=[]), [10]),   # never past the newest
])
def test_plan_retention(steps, newest, kw, doomed):
    assert plan_retention(steps, newest, **kw) == doomed


@pytest.mark.parametrize("use_async", [True, False])
def test_saves_commit_verify_and_round_trip_bit_exact(tmp_path, use_async):
    ck = Checkpointer(str(tmp_path), cfg(async_=use_async, keep_last=None))
    uri = save(ck, 5)
    m = ck.close()
    assert m.uri == uri and uri.endswith("step-000005") and m.step == 5
    assert manifest.verify(uri) == []
    assert set(m.files) == {"model.safetensors", "optimizer.safetensors", "trainer_state.json"}
    for name, want in state(5).items():
        got = read_tensors(uri, name)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    assert ck.stats[0]["blocked_s"] >= 0 and ck.stats[0]["write_s"] >= 0 and ck.stats[0]["async"] is use_async


def test_async_save_writes_the_snapshot_not_later_updates(tmp_path):
    ck = Checkpointer(str(tmp_path), cfg(keep_last=None))
    live = state(1)
    save(ck, 1, live)
    live["model.safetensors"]["w"].add_(1.0)       # training goes on while the write runs
    ck.close()
    assert torch.equal(read_tensors(str(tmp_path / "step-000001"), "model.safetensors")["w"], state(1)["model.safetensors"]["w"])


def test_at_most_one_save_in_flight(tmp_path, monkeypatch):
    release, writing = threading.Event(), threading.Event()
    real = checkpointer.write_tensors

    def slow(out, name, tensors, **kw):
        if out.uri.endswith("step-000001"):
            writing.set()
            release.wait(5)
        return real(out, name, tensors, **kw)

    monkeypatch.setattr(checkpointer, "write_tensors", slow)
    ck = Checkpointer(str(tmp_path), cfg(keep_last=None))
    t0 = time.perf_counter()
    save(ck, 1)
    assert time.perf_counter() - t0 < 2 and writing.wait(5)       # the first save returned while writing
    threading.Timer(0.3, release.set).start()
    save(ck, 2)                                                  # waits for step 1 to commit first
    assert manifest.is_committed(str(tmp_path / "step-000001"))
    assert ck.stats[1]["wait_s"] >= 0.2
    ck.close()
    assert manifest.is_committed(str(tmp_path / "step-000002"))


def test_retention_deletes_only_after_a_newer_commit(tmp_path):
    ck = Checkpointer(str(tmp_path), cfg(keep_last=2, pin=["step-000001"]))
    for s in range(1, 6):
        save(ck, s)
        ck.wait()
        assert manifest.is_committed(str(tmp_path / f"step-{s:06d}"))   # the newest is never the victim
    ck.close()
    assert [s for s, _ in checkpointer.list_steps(str(tmp_path))] == [1, 4, 5]


def test_errors_in_the_writer_surface_at_the_next_call(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ck = Checkpointer(str(blocker), cfg())
    save(ck, 1)                                  # returns: the failure happens in the thread
    with pytest.raises(OSError):
        ck.close()


def test_due_by_steps_and_by_wall_time(tmp_path):
    ck = Checkpointer(str(tmp_path), cfg(every_steps=10, every_seconds=0.05))
    assert ck.due(20) and not ck.due(21)
    time.sleep(0.06)
    assert ck.due(21)
    assert not Checkpointer(str(tmp_path), cfg(every_steps=None, every_seconds=None)).due(7)


def test_latest_skips_interrupted_and_damaged_steps(tmp_path):
    ck = Checkpointer(str(tmp_path), cfg(keep_last=None, async_=False))
    for s in (1, 2, 3):
        save(ck, s)
    ck.close()
    (tmp_path / "step-000004").mkdir()
    (tmp_path / "step-000004" / MARKER).write_text("{}")         # a save killed half way
    (tmp_path / "step-000004" / "model.safetensors").write_bytes(b"partial")
    with open(tmp_path / "step-000003" / "model.safetensors", "r+b") as f:   # a flipped byte
        f.seek(100)
        f.write(b"\xff")
    assert checkpointer.latest(str(tmp_path)).step == 2
    assert checkpointer.find(str(tmp_path), 1).step == 1
    with pytest.raises(CkptError, match=r"no committed checkpoint for step 4 \(committed steps: \[1, 2, 3\]\)"):
        checkpointer.find(str(tmp_path), 4)
    with pytest.raises(CkptError, match="does not verify"):
        checkpointer.find(str(tmp_path), 3)
    assert checkpointer.latest(str(tmp_path / "nothing")) is None


def test_a_rewrite_of_an_interrupted_step_replaces_it(tmp_path):
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "step-000002" / MARKER).write_text("{}")
    (tmp_path / "step-000002" / "junk").write_text("x")
    ck = Checkpointer(str(tmp_path), cfg(async_=False))
    save(ck, 2)
    ck.close()
    assert manifest.verify(str(tmp_path / "step-000002")) == []
    assert not (tmp_path / "step-000002" / "junk").exists()


@pytest.mark.parametrize("leftovers", [[MARKER + ".tmp-1a2b3c4d"],                 # killed putting the marker
                                       ["optimizer.safetensors", "trainer_state.json"]])  # killed deleting
def test_our_own_leftovers_without_a_marker_are_cleared(tmp_path, leftovers):
    (tmp_path / "step-000003").mkdir()
    for name in leftovers:
        (tmp_path / "step-000003" / name).write_text("")
    ck = Checkpointer(str(tmp_path), cfg(async_=False))
    save(ck, 3)
    ck.close()
    assert sorted(os.listdir(tmp_path / "step-000003")) == ["ckptflow.json", "model.safetensors",
                                                          "optimizer.safetensors", "trainer_state.json"]


def test_a_strangers_file_is_never_deleted(tmp_path):
    (tmp_path / "step-000003").mkdir()
    (tmp_path / "step-000003" / "notes.txt").write_text("mine")
    ck = Checkpointer(str(tmp_path), cfg(async_=False))
    with pytest.raises(CkptError, match="not written by ckptflow"):
        save(ck, 3)
    assert (tmp_path / "step-000003" / "notes.txt").read_text() == "mine"


def test_copy_later_snapshots_in_the_writer_and_settle_waits_for_it(tmp_path, monkeypatch):
    """save(copy_later=True) returns before any copy; the writer thread copies (numpy for contiguous
    tensors, bf16 and 0-d ones included; torch for a strided one), and once settle() returns the
    caller may change its tensors: the checkpoint holds them as they were at save()."""
    copied_in, gate = [], threading.Event()
    real = Checkpointer._copy_in_writer

    def copy(buf, t):
        gate.wait(5)
        copied_in.append(threading.current_thread().name)
        real(buf, t)

    monkeypatch.setattr(Checkpointer, "_copy_in_writer", staticmethod(copy))
    ck = Checkpointer(str(tmp_path), cfg(keep_last=None))
    live = state(1)
    live["model.safetensors"]["strided"] = torch.arange(12.0).reshape(3, 4).t()
    want = {f: {k: t.clone() for k, t in sd.items()} for f, sd in live.items()}
    ck.save(1, live, {"trainer_state.json": {"step": 1}}, Manifest(kind="train_state", format="tune", step=1),
            copy_later=True)
    assert copied_in == [] and ck.busy() and ck.stats[0]["copy_later"]    # training went on before the copy
    gate.set()
    ck.settle()
    assert len(copied_in) == sum(map(len, live.values())) and all(n.startswith("ckptflow-save") for n in copied_in)
    for sd in live.values():
        for t in sd.values():
            t.add_(1)                                                       # the optimizer step
    ck.close()
    assert not ck.busy()
    for name, sd in want.items():
        got = read_tensors(str(tmp_path / "step-000001"), name)
        assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in sd.items())


def test_copy_later_is_ignored_by_synchronous_saves(tmp_path):
    ck = Checkpointer(str(tmp_path), cfg(async_=False, keep_last=None))
    ck.save(1, state(1), {}, Manifest(kind="train_state", format="tune", step=1), copy_later=True)
    ck.settle()
    assert not ck.stats[0]["copy_later"] and not ck.busy()
    assert torch.equal(read_tensors(str(tmp_path / "step-000001"), "model.safetensors")["w"], state(1)["model.safetensors"]["w"])


@pytest.mark.parametrize("mode", ["async", "async, waited on", "sync"])
def test_a_background_save_hashes_in_its_writer_thread(tmp_path, monkeypatch, mode):
    """An asynchronous save keeps to one thread (no hasher thread beside the writer, which would
    take a second core from training); a synchronous one hashes beside the writing thread, and so
    does a background one once training is blocked waiting for it (both cores are free then)."""
    from ckptflow import storage

    seen = {}
    real_init, real_write = storage.HashingWriter.__init__, checkpointer.write_tensors

    def spy(self, uri, *, threaded=True):
        seen[uri.rsplit("/", 1)[-1]] = threaded
        real_init(self, uri, threaded=threaded)

    def after_wait(out, name, tensors, **kw):
        deadline = time.monotonic() + 10
        while not ck._waited_on.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        return real_write(out, name, tensors, **kw)

    monkeypatch.setattr(storage.HashingWriter, "__init__", spy)
    if mode == "async, waited on":
        monkeypatch.setattr(checkpointer, "write_tensors", after_wait)
    ck = Checkpointer(str(tmp_path), cfg(async_=mode != "sync", keep_last=None))
    save(ck, 1)
    if mode == "async":
        while ck.busy():
            time.sleep(0.005)
    ck.close()
    assert {seen["model.safetensors"], seen["optimizer.safetensors"]} == {mode != "async"}
    assert manifest.verify(str(tmp_path / "step-000001")) == []


@pytest.mark.parametrize("threaded", [True, False])
def test_hashing_writer_digest_is_the_same_hashed_inline(tmp_path, threaded):
    """storage.HashingWriter(threaded=False), which background saves use: same size and sha256 as
    the hasher thread gives, for written chunks and for ranges copied from another file."""
    import hashlib

    from ckptflow import storage

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    body = os.urandom(1024 * 1024 + 5)
    w = storage.HashingWriter(str(tmp_path / "out.bin"), threaded=threaded)
    w.write(body)
    w.copy_range(str(src), 5, 3 * 1024 * 1024)
    w.write(memoryview(body)[:100])
    got = w.close()
    data = (tmp_path / "out.bin").read_bytes()
    assert data == body + src.read_bytes()[5:3 * 1024 * 1024] + body[:100]
    assert got == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_busy_while_bytes_are_written_not_while_the_commit_waits(tmp_path, monkeypatch):
    """busy() (training yields a thread while it holds) covers the copy, hashing and writing, not
    the wait for fsyncs, uploads and the commit, which take no core (an upload may take long)."""
    from ckptflow import commit

    writing, committing, release = threading.Event(), threading.Event(), threading.Event()
    real_write, real_commit = checkpointer.write_tensors, commit.Output.commit

    def held_write(out, name, tensors, **kw):
        writing.wait(5)
        return real_write(out, name, tensors, **kw)

    def held_commit(self, m):
        committing.set()
        release.wait(5)
        return real_commit(self, m)

    monkeypatch.setattr(checkpointer, "write_tensors", held_write)
    monkeypatch.setattr(commit.Output, "commit", held_commit)
    ck = Checkpointer(str(tmp_path), cfg(keep_last=None))
    save(ck, 1)
    assert ck.busy()
    writing.set()
    assert committing.wait(5)
    assert not ck.busy() and not ck._future.done()      # still in flight, but only waiting
    release.set()
    assert ck.close().step == 1
