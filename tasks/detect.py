"""The detect task: format, family, dtype and size of a directory. Read-only and quick, so
not cached: a resumed run simply looks again."""
from prefect import task

from ckptflow.formats import detect as formats_detect
from tasks import common


@task(name="detect", **common.retry_options())
def detect(uri: str) -> dict:
    return formats_detect.detect(uri).to_dict()
