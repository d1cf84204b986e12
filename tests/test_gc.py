"""`ckptflow gc` deletes what interrupted writes left under a run, and nothing else."""
import json
import os
import subprocess
import sys

import pytest

from ckptflow import collect, commit, manifest, storage
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest
from tests import procs

KEPT_FILES = [
    "run.json", "notes.txt", "train/metrics.jsonl",                       # not ours to judge
    "source/ckptflow.json", "source/config.json",                         # committed
    "base/ckptflow.json", "base/model.safetensors",
    "train/step-000010/ckptflow.json", "train/step-000010/model.safetensors",
    "export/hf/ckptflow.json", "export/hf/model.safetensors",             # committed inside an uncommitted stage dir
    "mine/data.txt",                                                      # a user's directory
]
GARBAGE = [
    "train/step-000010/.ckptflow-writing",                 # crash between the commit and the marker's removal
    "train/step-000010/ckptflow.json.tmp-0badc0de",        # crash inside put_atomic
    "train/step-000020",                                   # interrupted step
    "merged",                                              # stage dir without a manifest
    "exports/old",                                         # export-only stage dir without a manifest
    "mine/cache",                                          # interrupted write anywhere
]


def committed(uri, files):
    out = commit.Output(uri)
    for name in files:
        out.put(name, name.encode() * 50)
    out.commit(Manifest(kind="model", format="tune"))


def interrupted(uri, files):
    """A write whose process died: its marker names a pid that is gone."""
    out = commit.Output(uri)
    for name in files:
        out.put(name, b"half")
    out._claim.stop()
    dead = subprocess.Popen(["true"])
    dead.wait()
    marker = storage.join(uri, commit.MARKER)
    rec = json.loads(storage.read_bytes(marker))
    rec["holder"]["pid"] = dead.pid
    storage.put_atomic(marker, json.dumps(rec).encode())


def make_run(run: str) -> None:
    put = lambda rel, data=b"x": storage.put_atomic(storage.join(run, rel), data)  # noqa: E731
    put("run.json", b'{"run_id": "demo"}')
    put("notes.txt", b"mine")
    put("train/metrics.jsonl", b"{}\n")
    put("mine/data.txt")
    committed(f"{run}/source", ["config.json"])
    committed(f"{run}/base", ["model.safetensors"])
    committed(f"{run}/train/step-000010", ["model.safetensors"])
    put("train/step-000010/.ckptflow-writing", b"{}")
    put("train/step-000010/ckptflow.json.tmp-0badc0de", b"{")
    interrupted(f"{run}/train/step-000020", ["model.safetensors", "optimizer.safetensors"])
    put("merged/model-00001-of-00002.safetensors")          # a writer from before the marker existed
    committed(f"{run}/export/hf", ["model.safetensors"])
    interrupted(f"{run}/exports/old", ["model.safetensors"])
    interrupted(f"{run}/mine/cache", ["blob"])


def files_under(run):
    return sorted(f for f in storage.list_files(run) if f != ".ckptflow-lease")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ckptflow.cli", *args], capture_output=True, text=True)


def test_gc_cli_deletes_exactly_the_leftovers(tmp_path):
    run = str(tmp_path / "demo")
    make_run(run)
    before = files_under(run)
    r = cli("gc", run, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] and sorted(plan["deleted"]) == sorted(f"{run}/{g}" for g in GARBAGE)
    assert files_under(run) == before                       # a dry run touches nothing

    r = cli("gc", run)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(f"deleted {run}/{g}" for g in GARBAGE)
    assert files_under(run) == sorted(KEPT_FILES)
    for d in ("source", "base", "train/step-000010", "export/hf"):
        assert manifest.verify(f"{run}/{d}") == []
    assert cli("gc", run).stdout.strip() == f"{run}: nothing to delete"


@pytest.mark.s3
def test_gc_on_s3(s3_server, s3_bucket):
    storage.set_options(s3_bucket, s3_server.storage_options)
    try:
        run = f"{s3_bucket}/runs/demo"
        make_run(run)
        got = collect.run(f"{s3_bucket}/runs")                     # a storage root: runs are found by run.json
        assert sorted(got["deleted"]) == sorted(f"{run}/{g}" for g in GARBAGE)
        assert files_under(run) == sorted(KEPT_FILES)
        assert collect.run(f"{s3_bucket}/runs")["deleted"] == []
    finally:
        storage.set_options(s3_bucket, None)


def test_gc_refuses_a_run_that_a_live_process_is_writing(tmp_path):
    run = str(tmp_path / "demo")
    make_run(run)
    ctx = procs.context()
    go, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
    writer = procs.start(procs.lease_writer, run, "trainer", {}, go, release, results)
    try:
        assert results.get(timeout=60)[0] == "ready"
        go.set()
        assert results.get(timeout=60)[0] == "won"
        r = cli("gc", run)
        assert r.returncode == 2
        line, = r.stderr.strip().splitlines()
        assert "another process is writing this run: trainer" in line and f"pid {writer.pid}" in line
        below = cli("gc", f"{run}/train")            # a directory of the run: the lease above it counts
        assert below.returncode == 2
        line, = below.stderr.strip().splitlines()
        assert f"{run}: another process is writing this run: trainer" in line and f"pid {writer.pid}" in line
        assert storage.isdir(f"{run}/train/step-000020")
    finally:
        release.set()
        writer.join(30)
    assert len(cli("gc", run).stdout.splitlines()) == len(GARBAGE)


def test_gc_respects_a_lease_held_below_the_run(tmp_path):
    run = str(tmp_path / "demo")
    make_run(run)
    exports = f"{run}/exports"                 # where the export flow takes its lease
    ctx = procs.context()
    go, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
    writer = procs.start(procs.lease_writer, exports, "export flow", {}, go, release, results)
    try:
        assert results.get(timeout=60)[0] == "ready"
        go.set()
        assert results.get(timeout=60)[0] == "won"
        with pytest.raises(CkptError, match=rf"^{exports}: another process is writing here: export flow"):
            collect.run(run)
        assert storage.isdir(f"{run}/exports/old")
    finally:
        release.set()
        writer.join(30)
    assert f"{run}/exports/old" in collect.run(run)["deleted"]


def test_gc_of_a_missing_directory_is_one_clear_error(tmp_path):
    r = cli("gc", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip() == f"ckptflow: error: {tmp_path / 'nope'}: no such directory"
