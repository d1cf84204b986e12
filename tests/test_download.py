"""The download stage: hf:// from the loopback Hub through huggingface_hub, storage URIs, seed://."""
import json
import os

import pytest

from ckptflow import cli, manifest, retry, storage
from ckptflow.errors import CkptError, TransientError
from ckptflow.stages import convert, download

SEED = "seed://llama?dim=64&n_layers=2"


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(retry, "BASE_DELAY", 0.001)


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """{name: Path} of a tiny seed model in HF layout (one model.safetensors)."""
    d = tmp_path_factory.mktemp("seed") / "hf"
    download.run(SEED, str(d))
    return {p.name: p for p in sorted(d.iterdir()) if p.name != manifest.NAME}


@pytest.fixture(scope="module")
def sharded_files(seed_files, tmp_path_factory):
    """The same model as 4+ safetensors shards with model.safetensors.index.json."""
    from ckptflow.stages import convert

    d = tmp_path_factory.mktemp("sharded") / "hf"
    convert.run(str(seed_files["model.safetensors"].parent), str(d), to="hf", max_shard_size="120KB")
    files = {p.name: p for p in sorted(d.iterdir()) if p.name != manifest.NAME}
    assert sum(n.endswith(".safetensors") for n in files) >= 4
    return files


def get(hub_server, source, dst, **kw):
    kw.setdefault("cache_dir", str(dst) + "-cache")
    return download.run(source, str(dst), endpoint=hub_server.endpoint, **kw)


def same_bytes(dst, files):
    for name, path in files.items():
        assert (dst / name).read_bytes() == path.read_bytes(), name


def test_sharded_repo_pinned_to_its_commit(hub_server, sharded_files, tmp_path):
    sha = hub_server.add_repo("org/sharded", {**sharded_files, "README.md": b"# tiny\n"})
    dst = tmp_path / "source"
    m = get(hub_server, "hf://org/sharded", dst)
    assert (m.kind, m.format, m.family, m.dtype) == ("source", "hf", "llama", "float32")
    assert m.params == {"source": "hf://org/sharded", "revision": sha, "format": "hf"}
    assert (m.lineage["source"], m.lineage["revision"], m.lineage["requested_revision"]) == ("hf://org/sharded", sha, "main")
    assert sorted(m.files) == sorted(sharded_files)          # README.md is not a file the format needs
    assert m.extra["hub"]["skipped"] == ["README.md"]
    assert sorted(hub_server.fetched()) == sorted(sharded_files)
    same_bytes(dst, sharded_files)
    assert manifest.verify(str(dst)) == []
    assert sorted(os.listdir(dst)) == sorted([*sharded_files, manifest.NAME])   # no .cache, no marker left

    # Again, by branch: one request to resolve main, no file requests.
    n = len(hub_server.requests)
    again = get(hub_server, "hf://org/sharded", dst)
    assert again.created == m.created
    assert [(r.method, r.path) for r in hub_server.requests[n:]] == [("GET", "/api/models/org/sharded/revision/main")]


def test_pinned_sha_rerun_makes_no_request_at_all(hub_server, seed_files, tmp_path):
    sha = hub_server.add_repo("org/tiny", seed_files)
    dst = tmp_path / "source"
    m = get(hub_server, f"hf://org/tiny@{sha}", dst)
    n = len(hub_server.requests)
    assert get(hub_server, f"hf://org/tiny@{sha}", dst).created == m.created
    assert len(hub_server.requests) == n


def test_safetensors_preferred_over_bin(hub_server, seed_files, tmp_path):
    import torch
    from safetensors.torch import load_file

    bin_path = tmp_path / "pytorch_model.bin"
    torch.save(load_file(seed_files["model.safetensors"]), bin_path)
    hub_server.add_repo("org/both", {**seed_files, "pytorch_model.bin": bin_path})
    m = get(hub_server, "hf://org/both", tmp_path / "source")
    assert "pytorch_model.bin" not in hub_server.fetched()
    assert "model.safetensors" in hub_server.fetched()
    assert "pytorch_model.bin" not in m.files and m.extra["hub"]["skipped"] == ["pytorch_model.bin"]


def test_bin_only_repo_and_meta_original(hub_server, seed_files, tmp_path):
    import torch
    from safetensors.torch import load_file

    bin_path = tmp_path / "pytorch_model.bin"
    torch.save(load_file(seed_files["model.safetensors"]), bin_path)
    small = {k: v for k, v in seed_files.items() if k != "model.safetensors"}
    repo = {**small, "pytorch_model.bin": bin_path, "original/params.json": b'{"dim": 64}',
            "original/consolidated.00.pth": b"not fetched unless asked"}
    hub_server.add_repo("org/bin", repo)
    m = get(hub_server, "hf://org/bin", tmp_path / "hf")
    assert "pytorch_model.bin" in m.files and not any(n.startswith("original/") for n in m.files)
    hub_server.requests.clear()
    meta = get(hub_server, "hf://org/bin", tmp_path / "meta", format="meta")
    assert sorted(hub_server.fetched()) == sorted([*small, "original/params.json", "original/consolidated.00.pth"])
    assert meta.params["format"] == "meta" and "pytorch_model.bin" not in meta.files


def test_revision_as_branch_name_records_the_commit(hub_server, seed_files, tmp_path):
    old = hub_server.add_repo("org/tiny", seed_files)
    new_config = json.loads(seed_files["config.json"].read_text())
    new_config["rms_norm_eps"] = 1e-6
    new = hub_server.add_repo("org/tiny", {**seed_files, "config.json": json.dumps(new_config).encode()})
    hub_server.add_branch("org/tiny", "v1", old)
    m = get(hub_server, "hf://org/tiny@v1", tmp_path / "v1")
    assert m.params["revision"] == m.lineage["revision"] == old != new
    assert m.lineage["requested_revision"] == "v1"
    same_bytes(tmp_path / "v1", seed_files)
    on_disk = json.loads((tmp_path / "v1" / manifest.NAME).read_text())
    assert on_disk["lineage"]["revision"] == old
    hub_server.add_branch("org/tiny", "v1", new)       # the branch moved: the same request updates it
    assert get(hub_server, "hf://org/tiny@v1", tmp_path / "v1").params["revision"] == new
    with pytest.raises(CkptError, match="made with format='hf', not format='meta'; pass --overwrite"):
        get(hub_server, "hf://org/tiny@v1", tmp_path / "v1", format="meta")


def test_failure_mid_file_is_retried_and_checksums_match(hub_server, sharded_files, tmp_path):
    hub_server.add_repo("org/sharded", sharded_files)
    shard = sorted(n for n in sharded_files if n.endswith(".safetensors"))[1]
    hub_server.fail(shard, times=2, mode="truncate-reset")   # huggingface_hub itself gives up on these
    dst = tmp_path / "source"
    m = get(hub_server, "hf://org/sharded", dst)
    gets = [r.fault for r in hub_server.requests if r.method == "GET" and r.file == shard]
    assert gets == ["truncate-reset", "truncate-reset", None]
    assert sorted(hub_server.fetched()) == sorted(sharded_files)   # each file once in full
    assert hub_server.pending_faults == 0
    same_bytes(dst, sharded_files)
    assert manifest.verify(m.uri) == []


def test_interrupted_download_resumes_with_the_finished_files(hub_server, sharded_files, tmp_path, monkeypatch):
    hub_server.add_repo("org/sharded", sharded_files)
    shard = sorted(n for n in sharded_files if n.endswith(".safetensors"))[2]
    monkeypatch.setattr(retry, "ATTEMPTS", 2)
    hub_server.fail(shard, times=2, mode="truncate-reset")
    dst = tmp_path / "source"
    with pytest.raises(TransientError, match=f"download {shard} failed after 2 attempts"):
        get(hub_server, "hf://org/sharded", dst)
    assert manifest.read(str(dst)) is None and not (dst / shard).exists()
    finished = [n for n in sharded_files if (dst / n).exists()]
    assert len(finished) == len(sharded_files) - 1

    hub_server.requests.clear()
    m = get(hub_server, "hf://org/sharded", dst)
    assert hub_server.fetched() == [shard]                    # only what was missing
    same_bytes(dst, sharded_files)
    assert sorted(m.files) == sorted(sharded_files) and manifest.verify(m.uri) == []


def test_missing_repo_bad_token_and_gated_are_one_clear_error(hub_server, seed_files, tmp_path, caplog, monkeypatch):
    with pytest.raises(CkptError, match="hf://org/missing@main: repository not found"):
        get(hub_server, "hf://org/missing", tmp_path / "a")
    assert not (tmp_path / "a").exists()

    secret = "hf_SECRETtoken123"
    hub_server.add_repo("org/private", seed_files)
    hub_server.require_token("hf_good")
    monkeypatch.setenv("HF_TOKEN", secret)
    with pytest.raises(CkptError, match=r"refused the token \(401\)") as bad:
        get(hub_server, "hf://org/private", tmp_path / "b")
    hub_server.require_token(None)
    hub_server.add_repo("org/gated", seed_files)
    hub_server.gate("org/gated", "hf_granted")
    with pytest.raises(CkptError, match="gated repository") as gated:
        get(hub_server, "hf://org/gated", tmp_path / "c")
    assert secret not in str(bad.value) + str(gated.value) + caplog.text


def test_token_from_env_is_sent_and_never_recorded(hub_server, seed_files, tmp_path, monkeypatch, caplog, capsys):
    import logging

    caplog.set_level(logging.DEBUG)
    secret = "hf_SECRETtoken456"
    hub_server.add_repo("org/private", seed_files)
    hub_server.require_token(secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    dst = tmp_path / "source"
    rc = cli.main(["download", "hf://org/private", str(dst), "--endpoint", hub_server.endpoint, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["params"]["revision"]
    assert all(r.headers.get("authorization") == f"Bearer {secret}" for r in hub_server.requests)
    written = "".join(p.read_text(errors="replace") for p in dst.rglob("*.json"))
    assert secret not in written + out.out + out.err + caplog.text


def test_cli_missing_repo_exits_2_with_one_line(hub_server, tmp_path, capsys):
    rc = cli.main(["download", "hf://org/missing@v2", str(tmp_path / "x"), "--endpoint", hub_server.endpoint])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "hf://org/missing@v2: repository not found" in err


def test_hub_to_object_storage(hub_server, s3_server, s3_bucket, seed_files, tmp_path):
    storage.set_options("s3://", s3_server.storage_options)
    try:
        sha = hub_server.add_repo("org/tiny", seed_files)
        dst = f"{s3_bucket}/run/source"
        m = download.run("hf://org/tiny", dst, endpoint=hub_server.endpoint, cache_dir=str(tmp_path / "cache"))
        assert m.params["revision"] == sha and manifest.verify(dst) == []
        for name, path in seed_files.items():
            assert storage.read_bytes(f"{dst}/{name}") == path.read_bytes()
        assert not (tmp_path / "cache" / "ckptflow-staging").exists() or \
            not os.listdir(tmp_path / "cache" / "ckptflow-staging")
    finally:
        storage.set_options("s3://", None)


def test_from_s3_copied_with_checksums_or_in_place(s3_server, s3_bucket, seed_files, tmp_path):
    import hashlib

    storage.set_options("s3://", s3_server.storage_options)
    try:
        src = f"{s3_bucket}/models/tiny"
        for name, path in seed_files.items():
            storage.put_atomic(f"{src}/{name}", path.read_bytes())
        m = download.run(src, str(tmp_path / "copy"))
        assert (m.kind, m.format) == ("source", "hf")
        for name, path in seed_files.items():
            assert m.files[name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        same_bytes(tmp_path / "copy", seed_files)
        assert download.location(m) == m.uri == str(tmp_path / "copy")

        linked = download.run(src, str(tmp_path / "linked"), in_place=True)
        assert os.listdir(tmp_path / "linked") == [manifest.NAME] and linked.files == {}
        assert download.location(str(tmp_path / "linked")) == src
        assert linked.extra["source_files"]["model.safetensors"]["size"] == seed_files["model.safetensors"].stat().st_size
        assert download.run(src, str(tmp_path / "linked"), in_place=True).created == linked.created
    finally:
        storage.set_options("s3://", None)


def test_storage_and_seed_reruns_do_nothing(seed_files, tmp_path):
    src = seed_files["config.json"].parent
    m = download.run(str(src), str(tmp_path / "copy"))
    assert download.run(str(src), str(tmp_path / "copy")).created == m.created
    (tmp_path / "copy" / "config.json").write_text("{}")            # damaged: --overwrite copies again
    assert manifest.verify(str(tmp_path / "copy")) != []
    download.run(str(src), str(tmp_path / "copy"), overwrite=True)
    assert manifest.verify(str(tmp_path / "copy")) == []


def test_another_source_replaces_a_download_only_with_overwrite(seed_files, tmp_path):
    """commit.reusable's rule and message, as for convert, export and merge."""
    import re
    import shutil

    src, other, dst = str(seed_files["config.json"].parent), str(tmp_path / "other"), str(tmp_path / "copy")
    shutil.copytree(src, other)
    m = download.run(src, dst)
    with pytest.raises(CkptError, match=re.escape(f"{dst}: already holds a committed source (hf) made with "
                                                  f"source={src!r}, not source={other!r}; pass --overwrite")):
        download.run(other, dst)
    with pytest.raises(CkptError, match=re.escape("made with in_place=None, not in_place=True")):
        download.run(src, dst, in_place=True)
    assert manifest.require(dst) == m
    assert download.run(other, dst, overwrite=True).params == {"source": other}
    convert.run(dst, str(tmp_path / "tune"))
    with pytest.raises(CkptError, match=re.escape(f"{tmp_path / 'tune'}: already holds a committed model (tune) "
                                                  f"made from source {dst} (")):
        download.run(src, str(tmp_path / "tune"))
    with pytest.raises(CkptError, match="--in-place is for storage URIs"):
        download.run(SEED, str(tmp_path / "seed"), in_place=True)
    with pytest.raises(CkptError, match="--format 'gguf'"):
        download.run(SEED, str(tmp_path / "seed"), format="gguf")


def test_repo_without_weights_is_refused_before_dst_is_touched(hub_server, seed_files, tmp_path):
    hub_server.add_repo("org/noweights", {"config.json": seed_files["config.json"], "README.md": b"hi"})
    with pytest.raises(CkptError, match="no model.safetensors, pytorch_model.bin or their index"):
        get(hub_server, "hf://org/noweights", tmp_path / "x")
    with pytest.raises(CkptError, match="no Meta weights"):
        get(hub_server, "hf://org/noweights", tmp_path / "x", format="meta")
    assert not (tmp_path / "x").exists() and hub_server.fetched() == []
