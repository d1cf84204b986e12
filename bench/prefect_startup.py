"""How long the embedded Prefect API of `ckptflow run` takes to start (ckptflow/settings.py
gives it 120 s, Prefect's own default is 20 s).

    .venv/bin/python bench/prefect_startup.py

Seconds from starting ckptflow.api_server.EmbeddedServer to its first healthy /health, with a
fresh PREFECT_HOME (an empty SQLite database: Prefect's migrations run) and then again on the
same, migrated database. Run it on a machine as busy as the one you care about: the figure moves
with the load.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    home = tempfile.mkdtemp(prefix="ckptflow-prefect-home-")
    os.environ["PREFECT_HOME"] = home
    os.environ.pop("PREFECT_API_URL", None)
    from ckptflow.api_server import EmbeddedServer
    from ckptflow.settings import apply_prefect_defaults

    apply_prefect_defaults()
    try:
        for label in ("fresh database", "migrated database"):
            t0 = time.perf_counter()
            with EmbeddedServer(timeout=300):
                print(f"{label}: healthy after {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
