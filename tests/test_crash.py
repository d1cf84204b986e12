"""SIGKILL at random points while a sharded checkpoint is being committed, on local disk and
on the loopback S3 server. After every kill a reader sees the previous committed state or the
new one (never a half checkpoint that looks committed), whatever is committed verifies, and a
re-run over the half-written directory completes. At the end gc removes exactly the leftovers."""
import os
import random
import signal
import time

import pytest

from ckptflow import collect, manifest, storage
from ckptflow.formats.registry import open_view
from tests import procs, seeded

KILLS = 30


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A foreign sharded HF checkpoint: 4 shards, index, config (no tokenizer: fewer requests)."""
    from ckptflow.stages import convert

    root = tmp_path_factory.mktemp("crash-src")
    single = seeded.hf_dirs(str(root))["single"]
    out = str(root / "sharded4")
    convert.run(single, out, to="hf", max_shard_size="170KB")
    for name in os.listdir(out):
        if not name.startswith("model") and name != "config.json":
            os.remove(os.path.join(out, name))
    return out


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def where(request, tmp_path):
    """(run URI, storage options for the writer processes)."""
    if request.param == "local":
        yield str(tmp_path / "run"), {}
        return
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    storage.set_options(bucket, server.storage_options)
    yield f"{bucket}/run", {bucket: server.storage_options}
    storage.set_options(bucket, None)


def write(src, dst, options, dtype=None, overwrite=False, kill_after=None) -> bool:
    """Run one conversion in a writer process; SIGKILL it after `kill_after` seconds.
    True when the writer finished on its own."""
    p = procs.start(procs.convert_into, src, dst, options, dtype, overwrite)
    if kill_after is not None:
        p.join(kill_after)
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)
    p.join(60)
    assert p.exitcode in (0, -signal.SIGKILL), f"writer failed on its own (exit {p.exitcode})"
    return p.exitcode == 0


def state(run: str) -> dict[str, str]:
    """What a reader sees: committed directory -> manifest fingerprint."""
    out = {}
    for name in committed_names(run):
        out[name] = manifest.fingerprint(manifest.require(storage.join(run, name)))
    return out


def committed_names(run: str) -> set[str]:
    """One recursive listing: the directories holding ckptflow.json."""
    return {f.split("/")[0] for f in storage.list_files(run) if f.endswith("/" + manifest.NAME)}


def test_sigkill_while_committing_never_shows_a_half_checkpoint(src, where):
    run, options = where
    assert write(src, f"{run}/ckpt-000", options)       # also starts the forkserver
    t0 = time.monotonic()
    assert write(src, f"{run}/ckpt-000", options)       # a re-run that finds it done: the fixed costs
    start = time.monotonic() - t0
    t0 = time.monotonic()
    assert write(src, f"{run}/ckpt-001", options)
    duration = time.monotonic() - t0                    # one whole commit, writer start included
    clean = manifest.require(f"{run}/ckpt-000")
    assert len([f for f in clean.files if f.endswith(".safetensors")]) >= 4     # a sharded checkpoint
    rng = random.Random(20261123)
    seen, kills, target = state(run), 0, 2
    outcomes = {"before the commit": 0, "after the commit": 0}
    while kills < KILLS:
        # Every fourth writer replaces a committed checkpoint (bf16 this time) instead of adding one.
        replace = kills % 4 == 3 and len(seen) > 1
        name = rng.choice(sorted(seen)) if replace else f"ckpt-{target:03d}"
        dst = f"{run}/{name}"
        finished = write(src, dst, options, dtype="bfloat16" if replace else None, overwrite=replace,
                         kill_after=rng.uniform(start / 2, duration * 1.1))
        kills += not finished
        assert committed_names(run) - {name} == set(seen) - {name}   # nothing else changed
        m = manifest.read(dst)
        now = {k: v for k, v in seen.items() if k != name}
        if m is not None:                                # committed: complete and true
            assert manifest.verify(dst) == [], dst
            now[name] = manifest.fingerprint(m)
            assert now[name] == seen.get(name) or m.dtype == ("bfloat16" if replace else clean.dtype)
            if not replace:
                assert m.files == clean.files
            open_view(dst)                               # and readable
            target += not replace
        outcomes["after the commit" if now.get(name) != seen.get(name) else "before the commit"] += 1
        seen = now
    assert outcomes["before the commit"] >= KILLS // 2, outcomes    # most kills left a half-written directory

    # Leftovers: uncommitted directories, and inside committed ones what a writer killed while it
    # started to replace them left (the marker, or put_atomic's temp file of the marker).
    leftovers = [storage.join(run, n) for n in storage.listdir(run) if n not in seen]
    for name in seen:
        listed = set(manifest.require(storage.join(run, name)).files) | {manifest.NAME}
        leftovers += [storage.join(run, name, f) for f in storage.list_files(storage.join(run, name)) if f not in listed]
    assert sorted(collect.run(run)["deleted"]) == sorted(leftovers)
    assert state(run) == seen                            # every committed manifest as last seen
    for name in seen:
        assert manifest.verify(storage.join(run, name)) == []
        assert storage.list_files(storage.join(run, name)) == sorted(manifest.require(storage.join(run, name)).files | {manifest.NAME: 0}.keys())
