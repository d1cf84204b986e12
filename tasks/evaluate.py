"""The evaluate task: held-out loss, perplexity, lm-eval scores (settings["tasks"]) and greedy
samples of a model, and of its base for before/after; writes eval/results.json and the hand-off
eval/request.json."""
from prefect import task

from tasks import common


@task(name="evaluate", cache_key_fn=common.stage_key("src", "base"), result_serializer="json",
      **common.retry_options())
def evaluate(src: str, data: str | None, base: str | None, out: str, settings: dict | None = None,
             overwrite: bool = False) -> dict:
    from ckptflow.stages import evaluate as stage

    return common.record(stage.run(src, data=data, base=base, out=out, overwrite=overwrite, **(settings or {})))
