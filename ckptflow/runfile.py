"""`{run}/run.json`: the run record the finetune flow updates after every stage.

Its shape is what `report.summary_markdown` reads (see ckptflow/report.py), plus the config
and where the base model lives:

    {"run_id": "demo", "config": {...}, "source": {"uri": ..., "revision": ...},
     "base": {"source": URI, "tune": URI, "shared": true},
     "stages": [{"name": "download", "state": "Completed", "started": ISO, "finished": ISO,
                 "seconds": 1.2, "output": URI}],
     "checkpoints": [...], "eval": {"before": {...}, "after": {...}},
     "export_command": "...", "export_deployment": "export/export", "loss_curve": URI,
     "flow_runs": ["<id>", ...]}

Written whole with one atomic put each time (storage.put_atomic), so a reader never sees half
a record. Plain dicts and storage calls: no Prefect here, `ckptflow inspect` reads it too.
"""
from __future__ import annotations

import datetime as _dt
import json

from ckptflow import storage

NAME = "run.json"
STAGES = ("download", "detect", "convert", "train", "merge", "export", "evaluate")


def uri_of(run_uri: str) -> str:
    return storage.join(run_uri, NAME)


def load(run_uri: str, run_id: str) -> dict:
    """The record of the run at `run_uri`, or a fresh one when it has none yet."""
    path = uri_of(run_uri)
    if storage.isfile(path):
        return storage.read_json(path)
    return {"run_id": run_id, "stages": []}


def save(run_uri: str, record: dict) -> None:
    body = json.dumps(record, indent=1, sort_keys=True, default=str).encode() + b"\n"
    storage.put_atomic(uri_of(run_uri), body)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def stage(record: dict, name: str) -> dict:
    """The entry for stage `name`, created in pipeline order if the record lacks it."""
    for s in record["stages"]:
        if s["name"] == name:
            return s
    entry = {"name": name, "state": "Pending", "started": None, "finished": None, "seconds": None, "output": None}
    record["stages"].append(entry)
    order = {n: i for i, n in enumerate(STAGES)}
    record["stages"].sort(key=lambda s: order.get(s["name"], len(order)))
    return entry


def started(record: dict, name: str) -> dict:
    entry = stage(record, name)
    entry.update(state="Running", started=now(), finished=None, seconds=None)
    return entry


def finished(record: dict, name: str, state: str, output: str | None = None) -> dict:
    entry = stage(record, name)
    end = now()
    entry.update(state=state, finished=end, seconds=_seconds(entry.get("started"), end))
    if output is not None:
        entry["output"] = output
    return entry


def _seconds(start: str | None, end: str) -> float | None:
    if not start:
        return None
    delta = _dt.datetime.fromisoformat(end) - _dt.datetime.fromisoformat(start)
    return round(delta.total_seconds(), 3)
