"""The Prefect task helpers without a Prefect server: cache keys, forgetting stale cache records,
the retry condition, result storage, and killing a launched process group."""
import os
import pathlib
import signal
import time
from types import SimpleNamespace

import pytest

from ckptflow import manifest, storage
from ckptflow.commit import Output
from ckptflow.errors import CkptError
from ckptflow.manifest import Manifest
from ckptflow import launch
from tasks import common
from tasks.launch import kill_hook


def committed(uri: str, payload: bytes = b"weights", fmt: str = "tune") -> Manifest:
    out = Output(uri, overwrite=manifest.read(uri) is not None)
    out.put("model.bin", payload)
    return out.commit(Manifest(kind="model", format=fmt))


@pytest.fixture
def store(tmp_path):
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    return ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "results")), serializer=JSONSerializer())


def ctx(store, name="convert"):
    # The two attributes of prefect's TaskRunContext that a cache_key_fn reads.
    return SimpleNamespace(task=SimpleNamespace(name=name), result_store=store)


def test_key_follows_input_fingerprints_and_params_not_the_flow_run(tmp_path, store):
    src = str(tmp_path / "src")
    committed(src)
    key_fn = common.stage_key("src")
    params = {"src": src, "dst": str(tmp_path / "dst"), "to": "tune"}
    first = key_fn(ctx(store), params)
    assert first == key_fn(ctx(store), dict(params)) and first.startswith("convert-")
    assert key_fn(ctx(store), {**params, "to": "hf"}) != first
    assert key_fn(ctx(store, "export"), params) != first
    committed(src, b"other weights")            # same place, new content: a new fingerprint
    assert key_fn(ctx(store), params) != first


def test_no_key_when_an_input_is_not_committed(tmp_path, store):
    (tmp_path / "run").mkdir()
    assert common.stage_key("src")(ctx(store), {"src": str(tmp_path / "run")}) is None


def _cached(store, key_fn, params, out_uri):
    key = key_fn(ctx(store), params)
    store.write(obj=common.record(manifest.require(out_uri)), key=key)
    return key


@pytest.mark.parametrize("damage", ["delete_manifest", "delete_dir", "resize_file", "rewrite"])
def test_record_forgotten_when_its_output_is_gone_or_changed(tmp_path, store, damage):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    committed(src)
    committed(dst)
    key_fn, params = common.stage_key("src"), {"src": src, "dst": dst}
    key = _cached(store, key_fn, params, dst)
    assert key_fn(ctx(store), params) == key and store.exists(key)     # intact: honoured
    if damage == "delete_manifest":
        manifest.uncommit(dst)
    elif damage == "delete_dir":
        storage.remove(dst)
    elif damage == "resize_file":
        (pathlib.Path(dst) / "model.bin").write_bytes(b"short")
    else:
        committed(dst, b"a different model")
    assert key_fn(ctx(store), params) == key      # the key itself is stable ...
    assert not store.exists(key)                  # ... but the record is gone: the stage runs again


def test_retry_condition_retries_faults_but_not_bad_input():
    from prefect.states import Completed, Failed

    def failed(exc):
        return Failed(data=exc)

    assert common.retry_unless_bad_input(None, None, failed(ConnectionResetError("reset by peer")))
    assert common.retry_unless_bad_input(None, None, failed(RuntimeError("torchrun exited with 1")))
    assert not common.retry_unless_bad_input(None, None, failed(CkptError("config.yaml: unknown key 'trian'")))
    assert common.retry_unless_bad_input(None, None, Completed(data=1))


@pytest.mark.parametrize("verb", ["download", "convert", "train", "merge", "export", "evaluate"])
def test_stage_tasks_retry_with_exponential_backoff_and_jitter(verb):
    import importlib

    t = getattr(importlib.import_module(f"tasks.{verb}"), verb)
    assert t.retries == 3 and t.retry_delay_seconds == [10.0, 20.0, 40.0] and t.retry_jitter_factor == 0.5
    assert t.retry_condition_fn is common.retry_unless_bad_input
    assert t.cache_key_fn is not None and t.result_serializer == "json"


def test_local_result_storage_is_a_path_beside_the_runs(tmp_path):
    where = common.result_storage(str(tmp_path / "runs"))
    assert isinstance(where, pathlib.Path)    # a str would be looked up as a block slug
    assert where == tmp_path / "runs" / ".cache" / "prefect-results"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie has exited; only its parent (init here) has not reaped it yet.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1].startswith("Z")


def _grandchild(tmp_path):
    """A shell that starts a background sleep (a stand-in for torchrun's workers) and waits."""
    pidfile = tmp_path / "child.pid"
    return ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], pidfile


def _wait_for(pidfile):
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return int(pidfile.read_text())


def test_launch_kills_the_whole_group_when_the_wait_is_interrupted(tmp_path):
    cmd, pidfile = _grandchild(tmp_path)

    def poll():   # a timeout or a cancellation raising inside the wait
        _wait_for(pidfile)
        raise TimeoutError("task timed out")

    with pytest.raises(TimeoutError):
        launch.run(cmd, poll=poll, poll_seconds=0.05)
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not _gone(child):
        assert time.monotonic() < deadline, "the background child outlived its launcher"
        time.sleep(0.05)
    assert launch._PROCS == {}


def test_flow_hook_kills_launches_in_flight(tmp_path):
    cmd, pidfile = _grandchild(tmp_path)
    calls = []

    def poll():   # the flow's on_cancellation hook firing while training runs
        _wait_for(pidfile)
        calls.append(1)
        kill_hook(None, None, None)

    code = launch.run(cmd, poll=poll, poll_seconds=0.05)
    assert code == -signal.SIGTERM and calls
    deadline = time.monotonic() + 5
    while not _gone(int(pidfile.read_text())):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_the_library_never_imports_prefect():
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, ckptflow\n"
            "for m in pkgutil.walk_packages(ckptflow.__path__, 'ckptflow.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(n for n in sys.modules if n == 'prefect' or n.startswith('prefect.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
