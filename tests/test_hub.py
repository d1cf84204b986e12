"""ckptflow.hub against the loopback Hub server, through huggingface_hub's real client."""
import json
import os

import pytest

from ckptflow import hub
from ckptflow.errors import CkptError, TransientError

FILES = {
    "config.json": json.dumps({"model_type": "llama"}).encode(),
    "model.safetensors": os.urandom(100_000),   # LFS by suffix: the Hub publishes its sha256
    "original/params.json": b'{"dim": 64}',
}


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch, tmp_path):
    """No developer token or Xet may leak into a test; each test says which token it uses."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def client(server, tmp_path, token=None):
    return hub.Client(server.endpoint, token, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("uri, want", [
    ("hf://org/name", ("org/name", "main")),
    ("hf://org/name@v1.0", ("org/name", "v1.0")),
    ("hf://org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("hf://gpt2", ("gpt2", "main")),
])
def test_parse(uri, want):
    assert hub.parse(uri) == want


@pytest.mark.parametrize("uri", ["hf://", "hf://org/name@", "hf://a/b/c", "s3://org/name", "hf://org/../x"])
def test_parse_rejects(uri):
    with pytest.raises(CkptError, match="expected hf://ORG/NAME"):
        hub.parse(uri)


def test_resolve_a_branch_to_its_commit_with_every_file_hash(hub_server, tmp_path):
    old = hub_server.add_repo("org/tiny", FILES)
    new = hub_server.add_repo("org/tiny", {**FILES, "config.json": b"{}"})
    hub_server.add_branch("org/tiny", "v1", old)
    c = client(hub_server, tmp_path)
    assert c.resolve("org/tiny", "main").sha == new
    snap = c.resolve("org/tiny", "v1")
    assert (snap.sha, snap.revision, snap.uri) == (old, "v1", f"hf://org/tiny@{old}")
    assert sorted(snap.files) == sorted(FILES)
    import hashlib

    st = snap.files["model.safetensors"]
    assert (st.size, st.sha256, st.git_oid) == (100_000, hashlib.sha256(FILES["model.safetensors"]).hexdigest(), None)
    cfg = snap.files["config.json"]
    assert cfg.sha256 is None and cfg.git_oid is not None


def test_fetch_checks_out_and_is_not_repeated(hub_server, tmp_path):
    hub_server.add_repo("org/tiny", FILES)
    c = client(hub_server, tmp_path)
    snap = c.resolve("org/tiny", "main")
    dst = tmp_path / "dst"
    for name in FILES:
        path = c.fetch(snap, name, str(dst))
        with open(path, "rb") as f:
            assert f.read() == FILES[name]
        got = hub.digest(path)
        hub.check(snap.files[name], got, name)   # git blob id and sha256 computed as the Hub does
    before = len(hub_server.requests)
    c.fetch(snap, "model.safetensors", str(dst))
    assert len(hub_server.requests) == before, "a finished file of a pinned commit must not be asked for again"


def test_check_catches_a_changed_file(hub_server, tmp_path):
    hub_server.add_repo("org/tiny", FILES)
    c = client(hub_server, tmp_path)
    snap = c.resolve("org/tiny", "main")
    path = c.fetch(snap, "config.json", str(tmp_path / "dst"))
    with open(path, "ab") as f:
        f.write(b" ")
    with pytest.raises(TransientError, match="bytes, the Hub lists"):
        hub.check(snap.files["config.json"], hub.digest(path), "config.json")


def test_missing_repo_revision_and_file(hub_server, tmp_path):
    hub_server.add_repo("org/tiny", FILES)
    c = client(hub_server, tmp_path)
    with pytest.raises(CkptError, match=r"hf://org/missing@main: repository not found \(or private: set HF_TOKEN\)"):
        c.resolve("org/missing", "main")
    with pytest.raises(CkptError, match="no such revision"):
        c.resolve("org/tiny", "nope")
    snap = c.resolve("org/tiny", "main")
    with pytest.raises(CkptError, match="tokenizer.json: file not found"):
        c.fetch(snap, "tokenizer.json", str(tmp_path / "dst"))


def test_bad_token_and_gated_repo_are_clear_and_never_show_the_token(hub_server, tmp_path, caplog):
    secret = "hf_SECRETtoken123"
    hub_server.add_repo("org/private", FILES)
    hub_server.require_token("hf_good")
    with pytest.raises(CkptError, match=r"refused the token \(401\); check HF_TOKEN") as bad:
        client(hub_server, tmp_path, secret).resolve("org/private", "main")
    assert hub_server.requests[-1].headers["authorization"] == f"Bearer {secret}"
    assert client(hub_server, tmp_path, "hf_good").resolve("org/private", "main").sha

    hub_server.require_token(None)
    hub_server.add_repo("org/gated", FILES)
    hub_server.gate("org/gated", "hf_granted")
    snap = client(hub_server, tmp_path, secret).resolve("org/gated", "main")   # info stays public, as on the Hub
    with pytest.raises(CkptError, match="gated repository") as gated:
        client(hub_server, tmp_path, secret).fetch(snap, "config.json", str(tmp_path / "dst"))
    for text in (str(bad.value), str(gated.value), caplog.text, repr(client(hub_server, tmp_path, secret))):
        assert secret not in text


def test_server_faults_are_transient(hub_server, tmp_path):
    hub_server.add_repo("org/tiny", FILES)
    c = client(hub_server, tmp_path)
    hub_server.fail("/api/models/org/tiny/revision/main", mode=503)
    with pytest.raises(TransientError, match="hf://org/tiny@main"):
        c.resolve("org/tiny", "main")
    snap = c.resolve("org/tiny", "main")
    hub_server.fail("model.safetensors", mode="truncate-reset")   # half the body, then RST: the client gives up
    with pytest.raises(TransientError, match="model.safetensors"):
        c.fetch(snap, "model.safetensors", str(tmp_path / "dst"))
    hub_server.fail("model.safetensors", mode=500)
    with pytest.raises(TransientError, match="model.safetensors"):
        c.fetch(snap, "model.safetensors", str(tmp_path / "dst"))
    c.fetch(snap, "model.safetensors", str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "model.safetensors").read_bytes() == FILES["model.safetensors"]


def test_endpoint_from_the_environment(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080/")
    assert hub.Client().endpoint == "http://mirror.example:8080"
    assert hub.Client("http://other").endpoint == "http://other"
