"""Prefect's side of ckptflow.launch: nobody kills what a task started when its flow run is
cancelled or crashes, so the finetune flow's on_cancellation / on_crashed hooks kill every
process group ckptflow.launch still holds in this process."""
from __future__ import annotations

from ckptflow import launch


def kill_hook(flow, flow_run, state) -> None:
    """A flow on_cancellation / on_crashed hook."""
    launch.kill_all()
