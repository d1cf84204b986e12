"""One writer per directory: real processes race `ckptflow convert SRC DST` into the same DST
with different --dtype, on local disk and on the loopback S3 server. Whatever the timing, exactly
one wins, DST ends committed and verifies with the winner's dtype, and the loser exits 2 with one
line naming the holder (or the committed directory it would have replaced).

The racers are forkserver children (tests/procs.py) that run `cli.main`, so a trial costs the
conversion, not a Python start-up; the slow sweep also races pairs of `python -m ckptflow.cli`.
The default run keeps the trials few (5 local, 2 on S3: each S3 claim settles 1 s); `-m slow` runs the sweep."""
import contextlib
import io
import os
import random
import subprocess
import sys
import time

import pytest

from ckptflow import identity, lease, manifest, storage
from tests import hfmodels, procs

DTYPES = (None, "float16")
LOSER = ("another process is writing here", "already holds a committed model")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A ~6 MB sharded HF model: converting it takes long enough for the writers to overlap."""
    return hfmodels.save("llama", str(tmp_path_factory.mktemp("race") / "src"), shard="1MB",
                         hidden_size=192, intermediate_size=512, num_hidden_layers=2, vocab_size=2048)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def where(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "dst"), {}, {}
        return
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    storage.set_options(bucket, server.storage_options)
    yield f"{bucket}/dst", {bucket: server.storage_options}, server.env
    storage.set_options(bucket, None)


def cli_writer(argv, options, go, results) -> None:
    """A forkserver child: wait for `go`, run the CLI in-process, report (argv, rc, stderr)."""
    procs._configure(options)
    from ckptflow import cli

    go.wait()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    results.put((argv, rc, err.getvalue()))


def convert_argv(src, dst, dtype):
    return ["convert", src, dst] + (["--dtype", dtype] if dtype else [])


def race_forked(src, dst, options, delay):
    ctx = procs.context()
    results = ctx.Queue()
    gos = [ctx.Event(), ctx.Event()]
    ps = [procs.start(cli_writer, convert_argv(src, dst, d), options, g, results) for d, g in zip(DTYPES, gos)]
    gos[0].set()
    time.sleep(delay)
    gos[1].set()
    out = [results.get(timeout=120) for _ in ps]
    for p in ps:
        p.join(30)
    return [(a[-1] if a[-2] == "--dtype" else None, rc, err) for a, rc, err in out]


def race_subprocess(src, dst, env, delay):
    cmd = [sys.executable, "-m", "ckptflow.cli"]
    ps = []
    for i, d in enumerate(DTYPES):
        if i:
            time.sleep(delay)
        ps.append((d, subprocess.Popen(cmd + convert_argv(src, dst, d), env={**os.environ, **env},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    return [(d, p.wait(120), p.stderr.read()) for d, p in ps]


def check(dst, outcomes) -> str:
    """Exactly one winner, DST verifies with its dtype, the loser's error is one line. Returns
    the loser's message."""
    winners = [o for o in outcomes if o[1] == 0]
    losers = [o for o in outcomes if o[1] != 0]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    _, rc, err = losers[0]
    assert rc == 2 and err.count("\n") == 1 and err.startswith("ckptflow: error: "), outcomes
    assert any(w in err for w in LOSER), err
    m = manifest.require(dst)
    assert manifest.verify(dst) == [], (outcomes, manifest.verify(dst))
    assert m.params["dtype"] == winners[0][0], (m.params, outcomes)
    assert storage.listdir(dst).count(".ckptflow-writing") == 0
    return err


def trials(src, where, n, subprocess_trials, seed):
    dst, options, env = where
    rng = random.Random(seed)
    seen = []
    for i in range(n + subprocess_trials):
        storage.remove(dst)
        if i < n:
            outcomes = race_forked(src, dst, options, rng.uniform(0.0, 0.4))
        else:
            outcomes = race_subprocess(src, dst, env, rng.uniform(0.3, 1.5))
        seen.append(check(dst, outcomes))
    return seen


def test_racing_converts_leave_one_verified_winner(src, where):
    seen = trials(src, where, 5 if where[0].startswith("/") else 2, subprocess_trials=0, seed=13)
    print("\n".join(seen))


@pytest.mark.slow
def test_racing_converts_sweep(src, where):
    local = where[0].startswith("/")
    seen = trials(src, where, 40 if local else 15, subprocess_trials=6 if local else 3, seed=7)
    busy = sum("another process is writing here" in s for s in seen)
    print(f"{len(seen)} races: {busy} refused as busy, {len(seen) - busy} as already committed")


def test_a_waiting_writer_goes_after_the_holder(src, tmp_path):
    """--wait: the second writer waits for the first, then finds the same thing committed (no work)
    or replaces nothing it was not asked to."""
    dst = str(tmp_path / "dst")
    ctx = procs.context()
    results, gos = ctx.Queue(), [ctx.Event(), ctx.Event()]
    ps = [procs.start(cli_writer, ["convert", src, dst, "--dtype", "float16"] + extra, {}, go, results)
          for extra, go in zip(([], ["--wait"]), gos)]
    gos[0].set()
    deadline = time.monotonic() + 60
    while not os.path.exists(f"{dst}/.ckptflow-writing") and time.monotonic() < deadline:
        time.sleep(0.01)                                 # the first writer holds DST now
    gos[1].set()
    out = sorted((rc, err) for _, rc, err in (results.get(timeout=120) for _ in ps))
    for p in ps:
        p.join(30)
    assert out == [(0, ""), (0, "")], out
    assert manifest.verify(dst) == [] and manifest.require(dst).params["dtype"] == "float16"


def test_a_dead_writers_marker_is_cleared_a_live_ones_never(src, tmp_path):
    """pid reuse: a marker naming a live pid with another start time is a dead writer's."""
    from ckptflow import commit

    dst = str(tmp_path / "dst")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ident = {**identity.current(), "pid": sleeper.pid}
        st = identity.stat(sleeper.pid)
        for start, live in ((int(st[19]), True), (int(st[19]) - 1, False)):
            rec = {"holder": {"id": "x", "owner": "ckptflow convert", **ident, "pid_start": start},
                   "acquired_at": time.time(), "heartbeat_at": time.time(), "expires_at": time.time() + 60}
            storage.put_atomic(f"{dst}/{commit.MARKER}", __import__("json").dumps(rec).encode())
            storage.put_atomic(f"{dst}/partial.bin", b"x")
            assert lease.is_live(rec) is live
            if live:
                with pytest.raises(Exception, match=f"another process is writing here: ckptflow convert "
                                                    f"\\(pid {sleeper.pid} on "):
                    commit.Output(dst)
                assert os.path.exists(f"{dst}/partial.bin")     # a live write is never touched
            else:
                with commit.Output(dst) as out:
                    assert sorted(os.listdir(dst)) == [commit.MARKER]   # the dead one's files cleared
                    out.abort()
    finally:
        sleeper.kill()
        sleeper.wait()


def hold_open(uri, ready, release) -> None:
    """A forkserver child in the middle of a write, until told to go on."""
    from ckptflow import commit

    out = commit.Output(uri)
    out.put("half.bin", b"x" * 100)
    ready.set()
    release.wait()


def test_gc_leaves_a_live_write_alone_and_clears_it_once_its_writer_is_gone(tmp_path):
    import signal

    from ckptflow import collect

    run = str(tmp_path / "run")
    storage.put_atomic(f"{run}/run.json", b"{}")
    step = f"{run}/train/step-000010"
    ctx = procs.context()
    ready, release = ctx.Event(), ctx.Event()
    child = procs.start(hold_open, step, ready, release)
    try:
        assert ready.wait(60)
        r = collect.run(run)
        assert (r["deleted"], r["live"]) == ([], [step])
        assert os.path.exists(f"{step}/half.bin")          # a live write is never deleted
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    r = collect.run(run)
    assert (r["deleted"], r["live"]) == ([step], []) and not os.path.exists(step)
