"""The export task: any checkpoint to original / hf / meta / peft. Keyed on the source manifest;
a run directory as source is not cached (its newest step may change), the library skips it."""
from prefect import task

from tasks import common


@task(name="export", cache_key_fn=common.stage_key("src"), result_serializer="json", **common.retry_options())
def export(src: str, dst: str, format: str = "original", step: int | None = None, dtype: str | None = None,
           overwrite: bool = False) -> dict:
    from ckptflow.stages import export as stage

    return common.record(stage.run(src, dst, format=format, step=step, dtype=dtype, overwrite=overwrite))
