"""The commit protocol: ckptflow.json written last in one put, readers ignore what has none,
a re-run clears its own interrupted write, a foreign directory is never touched."""
import json
import os

import pytest

from ckptflow import checkpointer, commit, lease, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest
from tests.flakyfs import FlakyFileSystem

WRITES = ("pipe_file", "put_file", "rm")


def small_output(uri: str, files=("a.bin", "b/c.bin"), overwrite=False) -> commit.Output:
    out = commit.Output(uri, overwrite=overwrite)
    for i, name in enumerate(files):
        out.put(name, bytes([i]) * 100)
    return out


def test_manifest_is_one_put_after_every_file():
    FlakyFileSystem.configure(rate=0.0)      # a recorder
    uri = "flaky://commit-order/step-000010"
    out = small_output(uri)
    m = out.commit(Manifest(kind="model", format="tune"))
    writes = [(op, path.rsplit("/", 1)[-1]) for op, path in FlakyFileSystem.log if op in WRITES]
    assert writes[0] == ("pipe_file", commit.MARKER)
    assert writes[-2:] == [("pipe_file", manifest.NAME), ("rm", commit.MARKER)]
    assert [w for w in writes if w[1] == manifest.NAME] == [("pipe_file", manifest.NAME)]
    assert set(m.files) == {"a.bin", "b/c.bin"} and manifest.verify(uri) == []


def test_readers_ignore_a_directory_without_a_manifest(tmp_path):
    train = str(tmp_path / "train")
    small_output(f"{train}/step-000010").commit(Manifest(kind="train_state", format="tune", step=10))
    small_output(f"{train}/step-000020")       # killed before its commit
    assert manifest.read(f"{train}/step-000020") is None
    assert commit.is_interrupted(f"{train}/step-000020")
    assert [s for s, _ in checkpointer.list_steps(train)] == [10]
    with pytest.raises(CkptError, match="not a committed ckptflow directory"):
        manifest.require(f"{train}/step-000020")


def test_a_rerun_clears_its_own_interrupted_write(tmp_path):
    uri = str(tmp_path / "base")
    small_output(uri, files=("old-1.bin", "old-2.bin"))          # interrupted
    out = small_output(uri, files=("new.bin",))
    out.commit(Manifest(kind="model", format="tune"))
    assert sorted(os.listdir(uri)) == ["ckptflow.json", "new.bin"]
    assert manifest.verify(uri) == []


def test_a_foreign_directory_is_refused_and_left_alone(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    with pytest.raises(CkptError, match="not empty and was not written by ckptflow"):
        commit.Output(str(d))
    assert os.listdir(d) == ["notes.txt"]


def test_a_committed_output_needs_overwrite_which_uncommits_first():
    FlakyFileSystem.configure(rate=0.0)
    uri = "flaky://commit-overwrite/base"
    small_output(uri).commit(Manifest(kind="model", format="tune"))
    with pytest.raises(CkptError, match="already holds a committed model"):
        commit.Output(uri)
    FlakyFileSystem.configure(rate=0.0)
    small_output(uri, files=("x.bin",), overwrite=True).commit(Manifest(kind="model", format="tune"))
    removals = [path.rsplit("/", 1)[-1] for op, path in FlakyFileSystem.log if op == "rm"]
    assert removals[0] == manifest.NAME      # a crash after this leaves it uncommitted, never stale
    assert set(manifest.require(uri).files) == {"x.bin"}


def test_a_writer_that_lost_its_lease_cannot_commit(tmp_path):
    run = str(tmp_path / "run")
    with lease.hold(run, owner="test") as held:
        out = small_output(f"{run}/base")
        record = json.loads(open(f"{run}/{lease.NAME}").read())
        record["holder"] = {"id": "someone-else", "owner": "another host", "host": "elsewhere", "pid": 1}
        storage.put_atomic(f"{run}/{lease.NAME}", json.dumps(record).encode())
        with pytest.raises(CkptError, match="lost the writer lease .*another host"):
            out.commit(Manifest(kind="model", format="tune"))
        assert held.lost
    assert manifest.read(f"{run}/base") is None
