"""The fsspec seam: fresh listings on object stores, whole-file remote writes, atomic puts,
faults never read as "missing", names that escape their directory."""
import errno
import hashlib
import os
import signal

import pytest

from ckptflow import retry, storage
from ckptflow.errors import CkptError, TransientError
from tests.flakyfs import FlakyFileSystem


@pytest.fixture
def cached_listings(s3_server, s3_bucket):
    """The bucket configured with s3fs's listings cache explicitly on (its default)."""
    opts = {**s3_server.storage_options, "use_listings_cache": True}
    storage.set_options(s3_bucket, opts)
    yield s3_bucket
    storage.set_options(s3_bucket, None)


@pytest.mark.s3
def test_listings_see_what_another_writer_did_a_moment_ago(s3_server, cached_listings):
    import s3fs

    run = f"{cached_listings}/run"
    other = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)   # "another process"
    storage.put_atomic(f"{run}/a", b"a")
    assert storage.listdir(run) == ["a"]
    ours, path = storage.fs_and_path(run)
    ours.ls(path)                                        # prime s3fs's cache for the run
    other.pipe(f"{run[5:]}/b/ckptflow.json", b"{}")
    assert [e.rsplit("/", 1)[-1] for e in ours.ls(path, detail=False)] == ["a"]   # s3fs alone is stale
    assert storage.listdir(run) == ["a", "b"]
    assert storage.isfile(f"{run}/b/ckptflow.json") and storage.isdir(f"{run}/b")
    assert storage.list_files(run) == ["a", "b/ckptflow.json"]
    other.rm(f"{run[5:]}/b/ckptflow.json")
    assert not storage.exists(f"{run}/b/ckptflow.json")


@pytest.mark.s3
def test_remote_files_appear_whole_on_close_and_hash_what_was_written(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "SPOOL_MEMORY", 1 << 20)
    storage.set_options(s3_bucket, s3_server.storage_options)
    try:
        for n in (100, 3 * (1 << 20) + 17):            # in-memory spool (one PUT), temp-file spool (put_file)
            uri = f"{s3_bucket}/w/{n}.bin"
            data = os.urandom(n)
            w = storage.HashingWriter(uri)
            for i in range(0, n, 65536):
                w.write(memoryview(data)[i:i + 65536])
            assert not storage.exists(uri)              # nothing under the name before close
            got = w.close()
            assert got == {"size": n, "sha256": hashlib.sha256(data).hexdigest()}
            assert storage.read_bytes(uri) == data
        with pytest.raises(RuntimeError):
            with storage.HashingWriter(f"{s3_bucket}/w/aborted.bin") as w:
                w.write(b"x" * 1000)
                raise RuntimeError("the producer failed")
        assert not storage.exists(f"{s3_bucket}/w/aborted.bin")
    finally:
        storage.set_options(s3_bucket, None)


def test_faults_are_raised_never_read_as_missing(monkeypatch):
    monkeypatch.setattr(retry, "BASE_DELAY", 0.0005)
    monkeypatch.setattr(retry, "ATTEMPTS", 2)
    FlakyFileSystem.configure(rate=0.0)
    storage.put_atomic("flaky://faults/run/ckptflow.json", b"{}")
    FlakyFileSystem.configure(rate=1.0)
    try:
        # fsspec's own exists/isfile return False on any exception: a timeout would read as "not committed"
        assert FlakyFileSystem().isfile("flaky://faults/run/ckptflow.json") is False
        for query in (storage.isfile, storage.exists, storage.isdir, storage.listdir):
            with pytest.raises(TransientError, match="flaky://faults/run"):
                query("flaky://faults/run/ckptflow.json")
    finally:
        FlakyFileSystem.configure(rate=0.0)
    assert storage.isfile("flaky://faults/run/ckptflow.json")
    assert storage.info("flaky://faults/nothing") is None


def test_put_atomic_replaces_whole_and_leaves_no_temp_file(tmp_path):
    uri = str(tmp_path / "d" / "ckptflow.json")
    storage.put_atomic(uri, b"one")
    storage.put_atomic(uri, b"two")
    assert open(uri, "rb").read() == b"two"
    assert os.listdir(tmp_path / "d") == ["ckptflow.json"]


def test_memory_store_round_trip():
    root = "memory://storage-test/run"
    storage.put_atomic(f"{root}/a/x.json", b'{"k": 1}')
    with storage.HashingWriter(f"{root}/a/y.bin") as w:
        w.write(b"y" * 10)
        assert w.close()["size"] == 10
    assert storage.listdir(root) == ["a"] and storage.listdir(f"{root}/a") == ["x.json", "y.bin"]
    assert storage.read_json(f"{root}/a/x.json") == {"k": 1}
    assert storage.read_bytes(f"{root}/a/y.bin", 2, 5) == b"yyy"
    storage.remove(root)
    assert not storage.exists(root) and storage.listdir(root) == []


def test_missing_files_are_one_clear_error():
    with pytest.raises(CkptError, match=r"^memory://storage-test/nope: no such file"):
        storage.read_bytes("memory://storage-test/nope")
    with pytest.raises(CkptError, match=r"^memory://storage-test/nope: no such file"):
        storage.open_read("memory://storage-test/nope")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "s3://b/k", "", "."])
def test_names_that_escape_their_directory_are_refused(name):
    with pytest.raises(CkptError, match="escapes its directory"):
        storage.safe_relpath(name, "index.json")


def test_options_go_to_the_longest_matching_prefix():
    storage.set_options("s3://", {"anon": True})
    storage.set_options("s3://bucket/run", {"key": "k"})
    try:
        assert storage.options_for("s3://bucket/run/base") == {"key": "k"}
        assert storage.options_for("s3://other/x") == {"anon": True}
    finally:
        storage.set_options("s3://", None)
        storage.set_options("s3://bucket/run", None)
    assert storage.options_for("s3://bucket/run/base") == {}


@pytest.mark.parametrize("kernel", [True, False])
def test_copied_ranges_land_in_order_and_are_hashed_with_the_written_bytes(tmp_path, monkeypatch, kernel):
    if not kernel:      # a kernel or file system without copy_file_range: the same bytes through memory
        def refuse(*a, **k):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    src = tmp_path / "src.bin"
    data = os.urandom(3 * storage.CHUNK // 2 + 13)
    src.write_bytes(data)
    w = storage.HashingWriter(str(tmp_path / "out.bin"))
    w.write(b"head")
    w.copy_range(str(src), 5, len(data) - 7)
    w.write(memoryview(b"--middle--"))
    w.copy_range(str(src), 0, 5)
    want = b"head" + data[5:-7] + b"--middle--" + data[:5]
    got = w.close_later().result()
    assert (tmp_path / "out.bin").read_bytes() == want
    assert got == {"size": len(want), "sha256": hashlib.sha256(want).hexdigest()}
    assert storage._AHEAD._value == storage.HASH_AHEAD


def test_a_copy_past_the_end_of_its_source_names_the_file(tmp_path):
    src = tmp_path / "short.bin"
    src.write_bytes(b"x" * 100)
    with pytest.raises(CkptError, match="short.bin: truncated"):
        with storage.HashingWriter(str(tmp_path / "out.bin")) as w:
            w.copy_range(str(src), 50, 200)


def test_files_finish_in_the_background_a_bounded_number_at_a_time(tmp_path):
    futures = []
    for i in range(2 * storage.HASH_AHEAD + 1):
        w = storage.HashingWriter(str(tmp_path / f"f{i}"))
        w.write(bytes([i]) * (1 << 20))
        futures.append(w.close_later())
        assert sum(not f.done() for f in futures) <= storage.HASH_AHEAD    # the next close_later waited for a slot
    for i, fut in enumerate(futures):
        assert fut.result()["sha256"] == hashlib.sha256(bytes([i]) * (1 << 20)).hexdigest()
    assert storage._AHEAD._value == storage.HASH_AHEAD


def test_file_digest_reads_local_and_names_a_missing_file(tmp_path):
    p = tmp_path / "f.bin"
    data = os.urandom(storage.CHUNK + 5)
    p.write_bytes(data)
    assert storage.file_digest(str(p)) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(CkptError, match="nope.bin: no such file"):
        storage.file_digest(str(tmp_path / "nope.bin"))


def test_a_forked_child_gets_its_own_slots_for_background_files(tmp_path):
    w = storage.HashingWriter(str(tmp_path / "held"))
    w.write(b"x")
    w.close_later().result()            # the parent's pool exists, with its threads
    storage._AHEAD.acquire()            # as if a parent's file were still finishing when it forked
    try:
        pid = os.fork()
        if pid == 0:                    # the child writes HASH_AHEAD + 1 files without waiting forever
            signal.alarm(30)            # (on the old code it hung: a stale pool with no threads)
            ok = False
            try:
                futs = []
                for i in range(storage.HASH_AHEAD + 1):
                    c = storage.HashingWriter(str(tmp_path / f"child{i}"))
                    c.write(b"y")
                    futs.append(c.close_later())
                ok = all(f.result(timeout=30)["size"] == 1 for f in futs)
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        storage._AHEAD.release()


def test_two_readers_of_a_memory_file_each_keep_their_own_place():
    uri = "memory://storage-test/two-readers.bin"
    storage.put_atomic(uri, bytes(range(200)))
    try:
        with storage.open_read(uri) as a, storage.open_read(uri) as b:
            assert a.read(10) == bytes(range(10))
            b.seek(100)
            assert a.read(5) == bytes(range(10, 15))      # fsspec alone gives 105..109 here
            assert b.read(3) == bytes(range(100, 103))
    finally:
        storage.remove(uri)
