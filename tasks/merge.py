"""The merge task: a LoRA adapter folded into its base, keyed on both manifests."""
from prefect import task

from tasks import common


@task(name="merge", cache_key_fn=common.stage_key("adapter_uri", "base_uri"), result_serializer="json",
      **common.retry_options())
def merge(adapter_uri: str, base_uri: str, dst: str, overwrite: bool = False) -> dict:
    from ckptflow.stages import merge as stage

    return common.record(stage.run(adapter_uri, base_uri, dst, overwrite=overwrite))
