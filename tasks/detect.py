"""The detect task: format, family, dtype and size of a directory. Read-only and quick, so
not cached: a resumed run simply looks again."""
from prefect import task
from prefect.cache_policies import NO_CACHE

from ckptflow.formats import registry as formats_detect
from tasks import common


@task(name="detect", cache_policy=NO_CACHE, **common.retry_options())
def detect(uri: str) -> dict:
    return formats_detect.detect(uri).to_dict()
