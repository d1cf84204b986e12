"""A committed directory is replaced only when asked (--overwrite), and what is committed is
durable: fsync errors surface, aborted writers stop their hasher, remote pickles are fetched once
and leave no temp copy behind."""
import errno
import glob
import os
import tempfile
import threading

import pytest

from ckptflow import cli, manifest, storage
from ckptflow.stages import convert, merge
from tests import hfmodels
from tests.test_peft import peft_adapter


def ckptflow(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return hfmodels.save("llama", str(tmp_path_factory.mktemp("replace") / "src"))


def test_convert_replaces_a_committed_directory_only_with_overwrite(tmp_path, src, capsys):
    dst = tmp_path / "dst"
    assert ckptflow(capsys, "convert", src, dst, "--dtype", "float16") == (0, "")
    before = manifest.require(str(dst))
    rc, err = ckptflow(capsys, "convert", src, dst)                      # a typo away from losing it
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{dst}: already holds a committed model (tune)" in err and "dtype='float16', not dtype=None" in err
    assert "--overwrite" in err
    assert manifest.require(str(dst)) == before and manifest.verify(str(dst)) == []
    assert ckptflow(capsys, "convert", src, dst, "--dtype", "float16") == (0, "")   # same: no work
    assert manifest.require(str(dst)).created == before.created
    assert ckptflow(capsys, "convert", src, dst, "--overwrite") == (0, "")
    assert manifest.require(str(dst)).dtype == "float32" and manifest.verify(str(dst)) == []


def test_a_different_input_is_named(tmp_path, src, capsys):
    other = hfmodels.save("llama", str(tmp_path / "other"), vocab_size=300)
    dst = tmp_path / "dst"
    convert.run(src, str(dst))
    rc, err = ckptflow(capsys, "convert", other, dst)
    assert rc == 2 and err.count("\n") == 1 and f"made from source {src} (" in err and f"not {other} (" in err, err


def test_a_model_of_the_same_shape_in_the_same_place_is_not_taken_for_the_first(tmp_path, capsys):
    """A foreign source is fingerprinted without reading its data: names, sizes and modification
    stamps. Another model of the same shape saved over the first must not be answered with the
    first one's conversion."""
    import time

    path = str(tmp_path / "src")
    hfmodels.save("llama", path, seed=1)
    dst = tmp_path / "dst"
    assert ckptflow(capsys, "convert", path, dst) == (0, "")
    time.sleep(0.01)
    hfmodels.save("llama", path, seed=2)                               # same names, same sizes
    rc, err = ckptflow(capsys, "convert", path, dst)
    assert rc == 2 and "--overwrite" in err, err
    assert ckptflow(capsys, "convert", path, dst, "--overwrite") == (0, "")
    assert manifest.verify(str(dst)) == []


@pytest.mark.parametrize("verb", ["export", "merge", "evaluate"])
def test_other_stages_refuse_to_replace_what_another_stage_committed(tmp_path, src, capsys, verb):
    tune = str(tmp_path / "tune")
    convert.run(src, tune)
    dst = str(tmp_path / "dst")
    convert.run(src, dst, to="hf")                                         # a committed HF model
    before = manifest.require(dst)
    if verb == "export":
        argv = ["export", tune, dst, "--format", "hf", "--dtype", "bfloat16"]
    elif verb == "merge":
        peft_adapter(src, str(tmp_path / "ad"))
        argv = ["merge", tmp_path / "ad", src, dst]
    else:
        data = tmp_path / "eval.jsonl"
        data.write_text('{"text": "hello world"}\n')
        argv = ["evaluate", tune, "--data", data, "--out", dst]
    rc, err = ckptflow(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{dst}: already holds a committed model (hf)" in err and "--overwrite" in err
    assert manifest.require(dst) == before and manifest.verify(dst) == []


def test_merging_another_adapter_into_a_merge_needs_overwrite(tmp_path, src, capsys):
    peft_adapter(src, str(tmp_path / "ad"), target_modules=["q_proj"])
    peft_adapter(src, str(tmp_path / "ad2"), seed=5, target_modules=["q_proj"])
    first = merge.run(str(tmp_path / "ad"), src, str(tmp_path / "m"))
    assert merge.run(str(tmp_path / "ad"), src, str(tmp_path / "m")).created == first.created   # same: no work
    rc, err = ckptflow(capsys, "merge", tmp_path / "ad2", src, tmp_path / "m")
    assert rc == 2 and err.count("\n") == 1 and f"from adapter {tmp_path / 'ad'} (" in err, err
    assert ckptflow(capsys, "merge", tmp_path / "ad2", src, tmp_path / "m", "--overwrite") == (0, "")
    assert manifest.require(str(tmp_path / "m")).extra["merged"]["adapter"] == str(tmp_path / "ad2")


def test_fsync_dir_raises_real_errors_and_ignores_unsupported(tmp_path, monkeypatch):
    calls = []

    def failing(code):
        def fsync(fd):
            calls.append(fd)
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", failing(errno.EINVAL))
    storage._fsync_dir(str(tmp_path))                       # "not supported here": nothing to do
    monkeypatch.setattr(os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError) as e:
        storage._fsync_dir(str(tmp_path))
    assert e.value.errno == errno.EIO and len(calls) == 2


def test_a_commit_fsyncs_every_directory_it_wrote_into(tmp_path, monkeypatch):
    from ckptflow.commit import Output
    from ckptflow.manifest import Manifest

    synced = []
    real = storage._fsync_dir
    monkeypatch.setattr(storage, "_fsync_dir", lambda p: (synced.append(p), real(p)))
    uri = str(tmp_path / "out")
    out = Output(uri)
    out.put("a.bin", b"a")
    out.put("assets/deep/b.txt", b"b")
    out.commit(Manifest(kind="model", format="tune"))
    for d in (uri, f"{uri}/assets", f"{uri}/assets/deep", str(tmp_path)):
        assert d in synced, (d, synced)


def test_an_aborted_writer_stops_its_hasher(tmp_path):
    before = threading.active_count()
    writers = [storage.HashingWriter(str(tmp_path / f"f{i}")) for i in range(5)]
    for w in writers:
        w.write(b"x" * 1000)
        w.abort()
    assert threading.active_count() == before


def test_a_remote_bin_is_fetched_once_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import torch

    from ckptflow.formats import hf

    src = hfmodels.model("llama")
    local = tmp_path / "bin"
    src.save_pretrained(str(local))
    os.remove(local / "model.safetensors")
    torch.save({k: v.contiguous() for k, v in src.state_dict().items()}, local / "pytorch_model.bin")
    for name in os.listdir(local):
        storage.put_atomic(f"memory://bin-src/{name}", (local / name).read_bytes())
    reads = []
    real = storage.open_read
    monkeypatch.setattr(storage, "open_read", lambda uri: (reads.append(uri), real(uri))[1])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    convert.run("memory://bin-src", str(tmp_path / "tune"))
    assert [u for u in reads if u.endswith(".bin")] == ["memory://bin-src/pytorch_model.bin"], (reads, os.listdir(local))
    assert os.listdir(tmp_path / "tmp") == [] and not hf._COPIES
    assert manifest.verify(str(tmp_path / "tune")) == []
    got = hf.load_pickle_weights(str(local / "pytorch_model.bin"))
    assert torch.equal(got["model.embed_tokens.weight"], src.state_dict()["model.embed_tokens.weight"])
    assert not glob.glob(str(tmp_path / "tmp" / "*"))
