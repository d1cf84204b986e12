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

# The Python test dependencies (pyproject's [test] extra, and what the parity and report tests use
# from its dependencies). A missing one fails the run before any test: a broken install must never
# turn the parity suites into skips. Only Chromium (a system package) may be missing: the tests
# marked `browser` then skip and say why.
TEST_DEPS = {"transformers": "transformers", "peft": "peft", "s3fs": "s3fs", "moto": "moto[server]",
             "psutil": "psutil", "selenium": "selenium", "pytest_timeout": "pytest-timeout",
             "PIL": "pillow", "markdown_it": "markdown-it-py"}


def pytest_configure(config):
    import importlib.util

    missing = [dist for mod, dist in TEST_DEPS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise pytest.UsageError(f"test dependencies not installed: {', '.join(missing)} "
                                "(bash scripts/setup.sh --test, or pip install -e '.[test]')")


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server (temp SQLite) for the whole session: it costs ~20 s to start on
    2 cores, so every flow test shares it. Yields the API URL (for subprocesses)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
