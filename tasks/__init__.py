"""Prefect tasks: one module per stage verb, each a few lines over `ckptflow.stages.<verb>.run`.

Tasks pass URIs and small manifest records (tasks.common.record), never tensors. Importing this
package applies ckptflow's Prefect defaults first (telemetry off, a longer ephemeral startup).
"""
import logging
import os

from ckptflow import credentials
from ckptflow.settings import apply_prefect_defaults

apply_prefect_defaults()
# What the stages say (a skip, a resume, a retry) belongs in the flow run's logs, which
# PREFECT_LOGGING_EXTRA_LOGGERS=ckptflow forwards: INFO unless CKPTFLOW_LOG says otherwise.
logging.getLogger("ckptflow").setLevel(os.environ.get("CKPTFLOW_LOG", "INFO").upper())


def _load_secret(name: str):
    from tasks.common import load_secret

    return load_secret(name)


# {"secret": NAME} credential references in storage_options resolve inside this process.
credentials.set_secret_loader(_load_secret)
