"""Prefect environment defaults for ckptflow, applied before prefect is first imported.

Prefect reads its settings from the environment once, at import. The `run` and `serve`
commands and the `tasks`/`flows` packages call `apply_prefect_defaults()` first, so that:

- nothing phones home (telemetry is off; offline it only logs errors),
- the embedded (ephemeral) API server gets 120 s to start instead of Prefect's 20 s: on a 2-core
  machine at load ~4 it answered /health after 10.6-15.5 s on a fresh SQLite database (Prefect's
  migrations run) and 5.2-7.9 s on a migrated one (`python bench/prefect_startup.py`, 4 runs,
  Prefect 3.9.1), too close to 20 s for a busier machine,
- Prefect's database, profiles and default result storage live under ~/.ckptflow/prefect,
  apart from any other Prefect project on the machine,
- the library's INFO lines reach the flow run's logs.

Only defaults: a variable already set in the environment always wins. No prefect import here.
The embedded server itself is ckptflow/api_server.py.
"""
from __future__ import annotations

import os

PREFECT_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # ckptflow's own loggers (stage progress, skips, retries) go to the flow run's logs ...
    "PREFECT_LOGGING_EXTRA_LOGGERS": "ckptflow",
    # ... except from threads outside the run (the background checkpoint writer): console only,
    # instead of a warning per line.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}
DEFAULT_HOME = "~/.ckptflow/prefect"


def apply_prefect_defaults(environ: dict | None = None) -> dict:
    """Set every default that is not set yet; returns the ones it set."""
    env = os.environ if environ is None else environ
    wanted = dict(PREFECT_DEFAULTS, PREFECT_HOME=os.path.expanduser(DEFAULT_HOME))
    applied = {k: v for k, v in wanted.items() if k not in env}
    env.update(applied)
    if "PREFECT_HOME" in applied:
        # Prefect creates its home without parents: ~/.ckptflow may not exist yet.
        os.makedirs(applied["PREFECT_HOME"], exist_ok=True)
    return applied
