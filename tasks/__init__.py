"""Prefect tasks: one module per stage verb, each a few lines over `ckptflow.stages.<verb>.run`.

Tasks pass URIs and small manifest records (tasks.common.record), never tensors. Importing this
package applies ckptflow's Prefect defaults first (telemetry off, a longer ephemeral startup).
"""
from ckptflow.settings import apply_prefect_defaults

apply_prefect_defaults()
