"""Shared pytest setup: loopback servers live in tests/servers and are loaded as a plugin."""
import os
import tempfile

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect's database, profiles and default result storage: never the developer's ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="ckptflow-test-prefect-")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

pytest_plugins = ["tests.servers.fixtures", "tests.tinyrun"]


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server (temp SQLite) for the whole session: it costs ~20 s to start on
    2 cores, so every flow test shares it. Yields the API URL (for subprocesses)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
