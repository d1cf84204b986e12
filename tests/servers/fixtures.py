"""pytest fixtures that start real servers on loopback.

- `s3_server` (session): S3Server with .endpoint_url, .storage_options (for fsspec/s3fs),
  .env (AWS_* for subprocesses), .kind ("seaweedfs" or "moto").
- `s3_bucket` (function): "s3://<fresh bucket>" on that server.
- `hub_server` (function): HubServer with .endpoint, add_repo/add_branch/gate/require_token/fail,
  .requests and .fetched(). It sets nothing global: pass endpoint= and cache_dir= (or client_env()).
"""
from __future__ import annotations

import pytest

from tests.servers.hub import HubServer
from tests.servers.s3 import S3Server, start_s3_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    server = start_s3_server(tmp_path_factory.mktemp("s3-server"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    return s3_server.make_bucket()


@pytest.fixture
def hub_server() -> HubServer:
    with HubServer() as server:
        yield server
