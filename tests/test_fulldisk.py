"""Environment failures are one clear line, exit 2, and leave nothing of the write behind: a real
full disk (a 300 KB tmpfs), a read-only file system, and permission denied (a writer process that
dropped root). Mounting needs root (CAP_SYS_ADMIN); the tests say so and skip where it is refused."""
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from ckptflow import cli, commit, storage
from tests import hfmodels, procs


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A 430 KB model, world-readable (the permission test reads it as nobody)."""
    root = tempfile.mkdtemp(prefix="ckptflow-fulldisk-")
    os.chmod(root, 0o755)
    path = hfmodels.save("llama", os.path.join(root, "src"), shard="200KB")
    for d, _, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    yield path
    shutil.rmtree(root, ignore_errors=True)


def mount_tmpfs(where, options: str):
    os.makedirs(where, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root with CAP_SYS_ADMIN")


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / "small"
    mount_tmpfs(where, "size=300k")
    yield str(where)
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def readonly_disk(tmp_path):
    where = tmp_path / "ro"
    mount_tmpfs(where, "ro,size=300k")
    yield str(where)
    subprocess.run(["umount", "-l", str(where)], check=False)


def ckptflow(capsys, *argv):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_a_destination_without_room_is_refused_before_the_first_byte(src, small_disk, capsys):
    dst = f"{small_disk}/dst"
    rc, err = ckptflow(capsys, "convert", src, dst)
    assert rc == 2 and err.count("\n") == 1, err
    assert re.search(f"{dst}: not enough space: this write needs 4[0-9]{{5}} bytes, [0-9]+ are free on its file system",
                     err), err
    assert os.listdir(small_disk) == []                    # not even the marker or the directory


def test_a_disk_that_fills_up_while_writing(src, small_disk, capsys, monkeypatch):
    """The free-space check passed (another process filled the disk meanwhile, or the estimate was
    off): ENOSPC half way is one line with the bytes needed and free, and the partial shards and
    the marker are removed."""
    monkeypatch.setattr(commit, "SPACE_MARGIN", -10**9)  # let the write start
    dst = f"{small_disk}/dst"
    rc, err = ckptflow(capsys, "convert", src, dst)
    assert rc == 2 and err.count("\n") == 1, err
    assert re.search(r": no space left on device \(this write needs 4[0-9]{5} bytes; [0-9]+ bytes free\)", err), err
    assert err.startswith(f"ckptflow: error: {dst}")
    assert "nothing of this write was kept" in err
    assert os.listdir(small_disk) == []
    assert shutil.disk_usage(small_disk).used < 64 * 1024  # the partial shards are gone


def test_a_full_disk_keeps_an_existing_empty_destination(src, small_disk, capsys, monkeypatch):
    monkeypatch.setattr(commit, "SPACE_MARGIN", -10**9)
    dst = f"{small_disk}/dst"
    os.mkdir(dst)                                          # the user's own (empty) directory stays
    rc, err = ckptflow(capsys, "convert", src, dst)
    assert rc == 2 and "no space left on device" in err
    assert os.listdir(dst) == []


def test_a_read_only_destination_is_one_line(src, readonly_disk, capsys):
    rc, err = ckptflow(capsys, "convert", src, f"{readonly_disk}/dst")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"ckptflow: error: {readonly_disk}/dst" in err and "read-only file system" in err, err


def as_nobody(argv, warm_dst, results) -> None:
    """A forkserver child that runs the command once as root (so every lazy import is done: the
    interpreter's own files may not be readable by nobody), gives up root, then runs it again."""
    import contextlib
    import io

    from ckptflow import cli as cli_mod

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        cli_mod.main([*argv[:-1], warm_dst])
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_mod.main(argv)
    results.put((rc, err.getvalue()))


def test_permission_denied_is_one_line(src, tmp_path):
    parent = tempfile.mkdtemp(prefix="ckptflow-ro-")
    try:
        os.chmod(parent, 0o555)                            # nobody may read it, not write it
        ctx = procs.context()
        results = ctx.Queue()
        p = procs.start(as_nobody, ["convert", src, f"{parent}/dst"], str(tmp_path / "warm"), results)
        rc, err = results.get(timeout=120)
        p.join(30)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"ckptflow: error: {parent}/dst" in err and "permission denied" in err, err
        assert os.listdir(parent) == []
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_environment_errors_on_the_marker_leave_nothing(tmp_path):
    """The classification itself: each errno becomes its phrase and names the path."""
    import errno

    out = commit.Output.__new__(commit.Output)
    out.uri, out.files, out.need = str(tmp_path), {}, 1000
    for code, phrase in commit.ENVIRONMENT.items():
        e = commit.environment_error(OSError(code, os.strerror(code), str(tmp_path / "x")), out)
        assert str(e).startswith(f"{tmp_path / 'x'}: {phrase}"), e
    assert commit.environment_error(OSError(errno.EIO, "io"), out) is None
    assert json.dumps(str(commit.environment_error(OSError(errno.ENOSPC, "full"), out))).count("\\n") == 0
    assert storage.is_local(out.uri)
