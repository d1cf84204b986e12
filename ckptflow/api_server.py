"""The Prefect API that `ckptflow run` talks to: the configured one, else an embedded server.

    with api_server.prefect_api():     # PREFECT_API_URL (or the profile's), else EmbeddedServer()
        finetune(cfg)

The embedded server is what Prefect's own ephemeral server runs (uvicorn on
prefect.server.api.server:create_app, SQLite under PREFECT_HOME, UI off), started by ckptflow
under ckptflow.guard so that it dies with the run, however the run dies. It is a process started
by command line: nothing here imports prefect (tests/test_layering.py). Its startup timeout is
PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, which ckptflow/settings.py defaults to 120 s.
"""
from __future__ import annotations

import os


def configured_api_url(environ: dict | None = None) -> str | None:
    """PREFECT_API_URL from the environment, else from the active profile of PREFECT_HOME."""
    import tomllib

    env = os.environ if environ is None else environ
    if env.get("PREFECT_API_URL"):
        return env["PREFECT_API_URL"]
    path = env.get("PREFECT_PROFILES_PATH") or os.path.join(env.get("PREFECT_HOME") or "", "profiles.toml")
    try:
        with open(os.path.expanduser(path), "rb") as f:
            doc = tomllib.load(f)
    except (OSError, ValueError):
        return None
    active = env.get("PREFECT_PROFILE") or doc.get("active")
    return ((doc.get("profiles") or {}).get(active) or {}).get("PREFECT_API_URL") or None


def embedded_server_command(port: int) -> list[str]:
    """What Prefect's own ephemeral server runs (prefect.server.api.server.SubprocessASGIServer)."""
    import sys

    return [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]


def embedded_server_env(environ: dict | None = None) -> dict:
    """The server's environment: ours without credentials (it never needs them), UI off."""
    from ckptflow.credentials import ENV_PREFIX

    env = {k: v for k, v in (os.environ if environ is None else environ).items() if not k.startswith(ENV_PREFIX)}
    env.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})
    return env


class EmbeddedServer:
    """Prefect's embedded API for one `ckptflow run`, started by us rather than by Prefect so that
    it runs under ckptflow.guard: a SIGKILL of the run cannot leave it behind (Prefect's own
    ephemeral server is a plain child that outlives a killed parent). Sets PREFECT_API_URL for
    this process and its children; call before prefect is imported."""

    def __init__(self, timeout: float | None = None):
        self.timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        self.proc = None
        self.url = None

    def __enter__(self) -> "EmbeddedServer":
        import subprocess

        from ckptflow import guard

        for _ in range(3):   # a port taken between our probe and uvicorn's bind: another one
            port = _free_port()
            self.proc = guard.popen(embedded_server_command(port), env=embedded_server_env(),
                                    stdin=subprocess.DEVNULL)
            self.url = f"http://127.0.0.1:{port}/api"
            if self._wait_healthy():
                os.environ["PREFECT_API_URL"] = self.url
                return self
            guard.stop(self.proc)
        raise RuntimeError(f"the embedded Prefect API did not start within {self.timeout:.0f} s "
                           "(set PREFECT_API_URL to use a running server)")

    def __exit__(self, *exc) -> None:
        from ckptflow import guard

        if self.proc is not None:
            guard.stop(self.proc)
            self.proc = None

    def _wait_healthy(self) -> bool:
        import time
        import urllib.request

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.2)
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_api():
    """The configured Prefect API (nothing to do), else an EmbeddedServer for this process."""
    import contextlib

    return contextlib.nullcontext() if configured_api_url() else EmbeddedServer()
