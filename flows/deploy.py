"""`ckptflow serve`: the deployments of deployments/prefect.yaml, served from one process.

prefect.yaml stays the one description of the deployments (`prefect deploy` reads it for work
pools); this module turns each entry into `flow.to_deployment(...)` with the same name,
schedules, parameters, triggers and concurrency limit, and serves them all. Serving needs a
Prefect server (the embedded one runs no scheduler): set PREFECT_API_URL.
"""
from __future__ import annotations

import importlib

from ckptflow import storage
from ckptflow.errors import CkptError

KEYS = {"name", "entrypoint", "description", "tags", "schedules", "concurrency_limit", "parameters",
        "triggers", "work_pool", "version", "enforce_parameter_schema"}


def load(prefect_file: str) -> list[dict]:
    import yaml

    doc = yaml.safe_load(storage.read_text(prefect_file)) or {}
    deployments = doc.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise CkptError(f"{prefect_file}: no 'deployments' list")
    for d in deployments:
        unknown = set(d) - KEYS
        if unknown:
            raise CkptError(f"{prefect_file}: deployment {d.get('name')!r}: unknown key {sorted(unknown)[0]!r}")
        literal = literal_credentials(d.get("parameters") or {})
        if literal:
            raise CkptError(f"{prefect_file}: deployment {d.get('name')!r}: parameters.{literal[0]} is a literal "
                            'credential, which Prefect would store and show; use {env: VARIABLE} or {secret: BLOCK}')
    return deployments


def literal_credentials(params: dict, path: str = "") -> list[str]:
    """Dotted paths of literal credentials in any `storage_options` of deployment parameters."""
    from ckptflow import credentials

    found = []
    for k, v in params.items() if isinstance(params, dict) else ():
        here = f"{path}.{k}" if path else str(k)
        if k == "storage_options" and isinstance(v, dict):
            found += [f"{here}.{p}" for p in credentials.literals(v)]
        elif isinstance(v, dict):
            found += literal_credentials(v, here)
    return found


def flow_of(entrypoint: str, where: str):
    """`flows/finetune.py:finetune` -> the flow object of module flows.finetune."""
    path, _, name = entrypoint.partition(":")
    module = path.removesuffix(".py").replace("/", ".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CkptError(f"{where}: entrypoint {entrypoint!r} not found ({e})") from None


def runner_deployment(spec: dict, where: str):
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from prefect.schedules import Cron
    from pydantic import TypeAdapter

    triggers = [TypeAdapter(DeploymentTriggerTypes).validate_python({"name": f"{spec['name']}__automation_{i}", **t})
                for i, t in enumerate(spec.get("triggers") or [], start=1)]
    limit = spec.get("concurrency_limit")
    return flow_of(spec["entrypoint"], where).to_deployment(
        name=spec["name"], description=spec.get("description"), tags=spec.get("tags"),
        parameters=spec.get("parameters") or {}, triggers=triggers or None,
        schedules=[Cron(s["cron"], timezone=s.get("timezone")) for s in spec.get("schedules") or []] or None,
        concurrency_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit)


def serve(prefect_file: str, limit: int | None = None) -> None:
    from prefect import serve as prefect_serve

    deployments = [runner_deployment(spec, prefect_file) for spec in load(prefect_file)]
    take_over(deployments)
    # Keep the schedules on when this process stops: a restart must not silently pause nightly runs.
    prefect_serve(*deployments, limit=limit, pause_on_shutdown=False)


def take_over(deployments: list) -> None:
    """Make deployments that `prefect deploy` registered first run here. Serving updates only
    the fields it sets: the work pool stayed, the pull step went and the code path stayed empty,
    so every run crashed ("Downloading flow code from storage at None"). So: no work pool (this
    process runs them, as Prefect's own flow.serve does), and the code where this process runs."""
    import os

    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for d in deployments:
            d.work_pool_name = None     # assigned, so the update sends them
            d.work_queue_name = None
            try:
                existing = client.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            except ObjectNotFound:
                continue                # serving creates it with the right path
            if existing.path != os.getcwd():
                client.update_deployment(existing.id, DeploymentUpdate(path=os.getcwd()))
