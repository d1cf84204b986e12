"""Prefect flows over the stage tasks: finetune, export, evaluate, convert.

Importing this package applies ckptflow's Prefect defaults first (see ckptflow/settings.py).
"""
from ckptflow.settings import apply_prefect_defaults

apply_prefect_defaults()
