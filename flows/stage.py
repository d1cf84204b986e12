"""Running one stage task inside a flow and recording it in run.json.

    rec = Recorder(run_uri, run_id)
    src = rec.stage("download", download, source, dst)     # the task's return value

Before the task: the stage is "Running" in run.json. After: its Prefect state name
("Completed", or "Cached" when a finished stage was skipped), its output URI and its timing,
then the summary artifact is published again. On failure: "Failed" (on Ctrl-C or another
signal: "Cancelled") with its finish time, then the error propagates and fails the flow run.
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

    def stage(self, name: str, task, *args, on_stop=None, **kwargs):
        """`on_stop(record)`: what to record when the stage fails or is interrupted (Ctrl-C),
        before the summary is published again (training: the steps it committed, the loss curve)."""
        runfile.started(self.record, name)
        self.save()
        try:   # the task call itself: a KeyboardInterrupt arrives there, not in .result()
            state = task(*args, return_state=True, **kwargs)
            result = state.result()
        except BaseException as e:
            self.stopped(name, "Failed" if isinstance(e, Exception) else "Cancelled", on_stop)
            raise
        output = result.get("uri") if isinstance(result, dict) else None
        runfile.finished(self.record, name, state.name, output)
        self.save(summary=True)
        return result

    def stopped(self, name: str, state: str, on_stop=None) -> None:
        """Record a stage that did not finish ("Failed", or "Cancelled" for Ctrl-C and other
        signals), with its finish time, and publish the summary; never masks the error in flight."""
        runfile.finished(self.record, name, state)
        try:
            if on_stop is not None:
                on_stop(self.record)
            self.save(summary=True)
        except Exception as e:  # noqa: BLE001 - the stage's own error is the one to report
            log.warning("could not record the stopped %s stage: %s", name, e)

    def skipped(self, name: str, why: str) -> None:
        entry = runfile.stage(self.record, name)
        entry.update(state=f"Skipped: {why}", started=None, finished=None, seconds=None)
        self.save()
