"""The loopback servers behave like the real ones for the real clients (s3fs, huggingface_hub)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MiB = 1024 * 1024


# -- S3 --------------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_roundtrip_multipart_range_ls_rm(s3_server, s3_bucket, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    assert fs.ls(s3_bucket) == []
    data = os.urandom(6 * MiB + 123)
    with fs.open(f"{s3_bucket}/ckpt/big.bin", "wb", block_size=5 * MiB) as f:
        f.write(data[: 3 * MiB])
        f.write(data[3 * MiB :])
    info = fs.info(f"{s3_bucket}/ckpt/big.bin")
    assert info["size"] == len(data)
    assert "-" in info["ETag"], "open('wb') of > 5 MiB should have gone through a multipart upload"
    assert fs.cat_file(f"{s3_bucket}/ckpt/big.bin", start=5 * MiB - 10, end=5 * MiB + 10) == data[5 * MiB - 10 : 5 * MiB + 10]
    with fs.open(f"{s3_bucket}/ckpt/big.bin", "rb") as f:
        f.seek(len(data) - 100)
        assert f.read() == data[-100:]

    fs.pipe(f"{s3_bucket}/ckpt/meta.json", b'{"step": 1}')
    (tmp_path / "local.txt").write_bytes(b"local")
    fs.put(str(tmp_path / "local.txt"), f"{s3_bucket}/ckpt/local.txt")
    fs.get(f"{s3_bucket}/ckpt/big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    assert sorted(fs.ls(f"{s3_bucket}/ckpt")) == [f"{s3_bucket[5:]}/ckpt/{n}" for n in ("big.bin", "local.txt", "meta.json")]
    assert fs.cat(f"{s3_bucket}/ckpt/meta.json") == b'{"step": 1}'

    fs.rm(f"{s3_bucket}/ckpt/big.bin")
    assert not fs.exists(f"{s3_bucket}/ckpt/big.bin")
    fs.rm(f"{s3_bucket}/ckpt", recursive=True)
    # find, not ls: SeaweedFS keeps the emptied "ckpt/" prefix in delimiter listings (real S3 does not).
    assert fs.find(s3_bucket) == []


@pytest.mark.s3
def test_s3_env_reaches_a_subprocess(s3_server, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    fs.pipe(f"{s3_bucket}/from-parent", b"parent")
    # Only the env: no endpoint or keys in code, as a CLI run under the test would see it.
    code = (
        "import fsspec, sys; fs = fsspec.filesystem('s3'); b = sys.argv[1];"
        "fs.pipe(b + '/from-child', fs.cat(b + '/from-parent') + b'+child')"
    )
    env = {**os.environ, **s3_server.env}
    subprocess.run([sys.executable, "-c", code, s3_bucket], env=env, check=True, timeout=60)
    # The parent's filesystem instance must see the child's object (no stale listing cache).
    assert fs.ls(s3_bucket) == [f"{s3_bucket[5:]}/from-child", f"{s3_bucket[5:]}/from-parent"]
    assert fs.cat(f"{s3_bucket}/from-child") == b"parent+child"


# -- Hub -------------------------------------------------------------------------------------

FILES = {
    "config.json": json.dumps({"hidden_size": 64}).encode(),
    "model.safetensors": os.urandom(200_000),  # LFS by suffix: ETag is its sha256
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
}


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_snapshot_download_main(hub_server, tmp_path):
    from huggingface_hub import snapshot_download

    sha = hub_server.add_repo("org/tiny", FILES)
    out = snapshot_download("org/tiny", revision="main", endpoint=hub_server.endpoint, cache_dir=tmp_path, token=False)

    assert Path(out).name == sha
    assert _read_tree(Path(out)) == FILES
    repo_cache = tmp_path / "models--org--tiny"
    assert (repo_cache / "refs" / "main").read_text() == sha
    assert (repo_cache / "blobs" / hashlib.sha256(FILES["model.safetensors"]).hexdigest()).is_file()
    assert sorted(hub_server.fetched("org/tiny")) == sorted(FILES)
    assert not [r.path for r in hub_server.requests if "xet" in r.path]


def test_hf_hub_download_one_file_and_range_read(hub_server, tmp_path):
    from huggingface_hub import HfFileSystem, HfApi, hf_hub_download

    sha = hub_server.add_repo("org/tiny", FILES)
    path = hf_hub_download("org/tiny", "tokenizer/tokenizer.json", endpoint=hub_server.endpoint,
                           cache_dir=tmp_path, token=False)  # fmt: skip
    assert Path(path).read_bytes() == FILES["tokenizer/tokenizer.json"]
    assert hub_server.fetched() == ["tokenizer/tokenizer.json"]
    assert [(r.method, r.revision) for r in hub_server.requests] == [("HEAD", "main"), ("GET", "main")]

    info = HfApi(endpoint=hub_server.endpoint, token=False).model_info("org/tiny", files_metadata=True)
    assert info.sha == sha
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {k: len(v) for k, v in FILES.items()}
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}
    assert lfs == {"model.safetensors": hashlib.sha256(FILES["model.safetensors"]).hexdigest()}

    hffs = HfFileSystem(endpoint=hub_server.endpoint, token=False, skip_instance_cache=True)
    with hffs.open("org/tiny/model.safetensors", "rb") as f:
        f.seek(100_000)
        assert f.read(1000) == FILES["model.safetensors"][100_000:101_000]
    assert 206 in [r.status for r in hub_server.requests if r.headers.get("range")]


def test_pinned_revision_and_branch(hub_server, tmp_path):
    from huggingface_hub import snapshot_download

    old = hub_server.add_repo("org/tiny", FILES)
    new = hub_server.add_repo("org/tiny", {**FILES, "config.json": b'{"hidden_size": 128}'})
    hub_server.add_branch("org/tiny", "v1", old)
    assert old != new

    def get(rev):
        out = snapshot_download("org/tiny", revision=rev, endpoint=hub_server.endpoint, cache_dir=tmp_path, token=False)
        return Path(out).name, (Path(out) / "config.json").read_bytes()

    assert get(old) == (old, FILES["config.json"])
    assert get("main") == (new, b'{"hidden_size": 128}')
    assert get("v1") == (old, FILES["config.json"])


def test_allow_patterns(hub_server, tmp_path):
    from huggingface_hub import snapshot_download

    hub_server.add_repo("org/tiny", FILES)
    out = snapshot_download("org/tiny", allow_patterns=["*.json"], endpoint=hub_server.endpoint,
                            cache_dir=tmp_path, token=False)  # fmt: skip
    assert sorted(_read_tree(Path(out))) == ["config.json", "tokenizer/tokenizer.json"]
    assert "model.safetensors" not in hub_server.fetched()


def test_missing_repo_revision_and_file_raise_hub_errors(hub_server, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    hub_server.add_repo("org/tiny", FILES)
    kw = {"endpoint": hub_server.endpoint, "cache_dir": tmp_path, "token": False}
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing", **kw)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", **kw)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/tiny", "config.json", revision="nope", **kw)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/tiny", "missing.json", **kw)


def test_token_and_gated_repo(hub_server, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    hub_server.add_repo("org/private", FILES)
    hub_server.require_token("hf_good")
    kw = {"endpoint": hub_server.endpoint, "cache_dir": tmp_path}
    with pytest.raises(HfHubHTTPError) as bad:
        hf_hub_download("org/private", "config.json", token="hf_bad", **kw)
    assert bad.value.response.status_code == 401 and not isinstance(bad.value, RepositoryNotFoundError)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/private", "config.json", token=False, **kw)
    assert Path(hf_hub_download("org/private", "config.json", token="hf_good", **kw)).read_bytes() == FILES["config.json"]
    assert hub_server.requests[-1].headers["authorization"] == "Bearer hf_good"

    hub_server.require_token(None)
    hub_server.add_repo("org/gated", FILES)
    hub_server.gate("org/gated", "hf_granted")
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "config.json", token=False, **kw)
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "config.json", token="hf_other", **kw)
    assert [r.status for r in hub_server.requests[-2:]] == [401, 403]
    assert Path(hf_hub_download("org/gated", "config.json", token="hf_granted", **kw)).is_file()


def test_fault_injection(hub_server, tmp_path):
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    hub_server.add_repo("org/tiny", FILES)

    def get(cache):
        return hf_hub_download("org/tiny", "model.safetensors", endpoint=hub_server.endpoint,
                               cache_dir=tmp_path / cache, token=False)  # fmt: skip

    hub_server.fail("model.safetensors", mode="reset")
    with pytest.raises(httpx2.ReadError):
        get("a")
    hub_server.fail("*/resolve/*/model.safetensors", mode="truncate-reset")
    with pytest.raises(httpx2.ReadError):
        get("b")
    hub_server.fail("model.safetensors", mode=500)
    with pytest.raises(HfHubHTTPError) as err:
        get("c")
    assert err.value.response.status_code == 500
    assert hub_server.pending_faults == 0
    faults = [(r.method, r.fault, r.status) for r in hub_server.requests if r.fault]
    assert faults == [("GET", "reset", None), ("GET", "truncate-reset", 200), ("GET", "500", 500)]

    # A clean close mid-body is retried by huggingface_hub itself (a second GET in the same call).
    hub_server.requests.clear()
    hub_server.fail("model.safetensors", mode="truncate")
    assert Path(get("d")).read_bytes() == FILES["model.safetensors"]
    assert [(r.method, r.fault) for r in hub_server.requests] == [("HEAD", None), ("GET", "truncate"), ("GET", None)]
