"""The convert task: `ckptflow.stages.convert.run`, keyed on the source manifest's fingerprint."""
from prefect import task

from ckptflow.stages import convert as stage
from tasks import common


@task(name="convert", cache_key_fn=common.stage_key("src"), result_serializer="json", **common.retry_options())
def convert(src: str, dst: str, to: str = "tune", dtype: str | None = None, overwrite: bool = False) -> dict:
    return common.record(stage.run(src, dst, to=to, dtype=dtype, overwrite=overwrite))
