"""The download task: `ckptflow.stages.download.run` with retries (it talks to the network)."""
from prefect import task

from ckptflow.stages import download as stage
from tasks import common


@task(name="download", cache_key_fn=common.stage_key(), result_serializer="json", **common.retry_options())
def download(source: str, dst: str) -> dict:
    return common.record(stage.run(source, dst))
