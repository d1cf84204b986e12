"""Every read and write of ckptflow on s3:// against the loopback S3 server (SeaweedFS, or moto):
the foundation's conversion and verify round trips, in-process (run-config storage_options)
and through the CLI configured by the environment alone."""
import json
import os
import subprocess
import sys

import pytest

from ckptflow import commit, manifest, storage
from ckptflow.formats import registry
from ckptflow.stages import convert
from tests import seeded

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return seeded.hf_dirs(str(tmp_path_factory.mktemp("s3-src")))


@pytest.fixture
def s3(s3_server, s3_bucket):
    """The bucket, configured the way a run config's storage_options would configure it."""
    opts = {"endpoint_url": s3_server.endpoint_url, "key": s3_server.key, "secret": s3_server.secret,
            "client_kwargs": {"region_name": s3_server.region}}
    storage.set_options(s3_bucket, opts)
    yield s3_bucket
    storage.set_options(s3_bucket, None)


def upload(local_dir: str, uri: str) -> None:
    for name, data in seeded.data_files(local_dir).items():
        storage.put_atomic(storage.join(uri, name), data)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_tune_hf_round_trip_is_byte_identical_on_s3(hf, s3, layout):
    src = f"{s3}/run/source"
    upload(hf[layout], src)
    assert registry.detect(src).format == "hf"
    tune = convert.run(src, f"{s3}/run/base")
    assert tune.uri == f"{s3}/run/base" and manifest.verify(tune.uri) == []
    back = convert.run(tune.uri, f"{s3}/run/export", to="hf")
    assert manifest.verify(back.uri) == []
    assert seeded.data_files(back.uri) == seeded.data_files(hf[layout])
    assert convert.run(tune.uri, f"{s3}/run/export", to="hf").created == back.created   # idempotent


def test_local_to_s3_and_back_equals_local_conversion(hf, s3, tmp_path):
    on_s3 = convert.run(hf["sharded"], f"{s3}/base")
    local = convert.run(hf["sharded"], str(tmp_path / "base"))
    assert on_s3.files == local.files
    convert.run(on_s3.uri, str(tmp_path / "back"), to="hf")
    assert seeded.data_files(str(tmp_path / "back")) == seeded.data_files(hf["sharded"])


def test_rerun_over_a_half_written_directory_on_s3(hf, s3):
    dst = f"{s3}/run/base"
    out = commit.Output(dst)
    out.put("model-00001-of-00009.safetensors", b"half a shard")
    del out                                          # the writer died here: marker, no manifest
    assert manifest.read(dst) is None and commit.is_interrupted(dst)
    m = convert.run(hf["single"], dst)
    assert manifest.verify(dst) == []
    assert sorted(storage.list_files(dst)) == sorted(["ckptflow.json", *m.files])


def test_cli_on_s3_configured_by_the_environment_alone(hf, s3_server, s3_bucket):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env)
    r = subprocess.run([sys.executable, "-m", "ckptflow.cli", "convert", hf["sharded"], f"{s3_bucket}/run/base", "--json"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["format"] == "tune" and out["uri"] == f"{s3_bucket}/run/base"
    storage.set_options(s3_bucket, s3_server.storage_options)
    try:
        assert manifest.verify(out["uri"]) == []
        convert.run(out["uri"], f"{s3_bucket}/run/export", to="hf")
        assert seeded.data_files(f"{s3_bucket}/run/export") == seeded.data_files(hf["sharded"])
    finally:
        storage.set_options(s3_bucket, None)
