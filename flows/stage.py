"""Running one stage task inside a flow and recording it in run.json.

    rec = Recorder(run_uri, run_id)
    src = rec.stage("download", download, source, dst)     # the task's return value

Before the task: the stage is "Running" in run.json. After: its Prefect state name
("Completed", or "Cached" when a finished stage was skipped), its output URI and its timing,
then the summary artifact is published again. On failure: "Failed", then the error propagates
and fails the flow run.
"""
from __future__ import annotations

import logging

from ckptflow import runfile
from flows import publish

log = logging.getLogger(__name__)


class Recorder:
    def __init__(self, run_uri: str, run_id: str):
        self.run_uri, self.run_id = run_uri, run_id
        self.record = runfile.load(run_uri, run_id)
        self.record.setdefault("run_id", run_id)

    def save(self, summary: bool = False) -> None:
        runfile.save(self.run_uri, self.record)
        if summary:
            try:
                publish.publish_summary(self.run_uri, self.record)
            except Exception as e:  # noqa: BLE001 - the dashboard must never fail a run
                log.warning("could not publish the run summary: %s", e)

    def stage(self, name: str, task, *args, **kwargs):
        runfile.started(self.record, name)
        self.save()
        state = task(*args, return_state=True, **kwargs)
        try:
            result = state.result()
        except BaseException:
            runfile.finished(self.record, name, "Failed")
            self.save(summary=True)
            raise
        output = result.get("uri") if isinstance(result, dict) else None
        runfile.finished(self.record, name, state.name, output)
        self.save(summary=True)
        return result

    def skipped(self, name: str, why: str) -> None:
        entry = runfile.stage(self.record, name)
        entry.update(state=f"Skipped: {why}", started=None, finished=None, seconds=None)
        self.save()
