"""Transient faults: a conversion over storage that fails 20% of its calls (flaky://, see
tests/flakyfs.py) completes, and its output is byte-identical to the clean run's."""
import pytest

from ckptflow import manifest, retry, storage
from ckptflow.errors import TransientError
from ckptflow.stages import convert
from tests import seeded
from tests.flakyfs import FlakyFileSystem


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return seeded.hf_dirs(str(tmp_path_factory.mktemp("flaky-src")))


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(storage, "SPOOL_MEMORY", 32 * 1024)   # bigger files take the put_file path
    monkeypatch.setattr(retry, "BASE_DELAY", 0.0005)
    monkeypatch.setattr(retry, "ATTEMPTS", 12)   # 0.2**12: a call that never gets through is ~4e-9
    yield
    FlakyFileSystem.configure(rate=0.0)


def chain(src: str, root: str) -> dict:
    """HF -> tune -> HF, as a stage would run it; returns the manifests."""
    tune = convert.run(src, f"{root}/tune")
    back = convert.run(f"{root}/tune", f"{root}/back", to="hf")
    return {"tune": tune, "back": back}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_conversion_over_flaky_storage_equals_the_clean_run(hf, layout, quick_retries, caplog):
    clean = chain(hf[layout], f"memory://clean-{layout}")
    FlakyFileSystem.configure(rate=0.0)
    storage_src = f"flaky://flaky-{layout}/src"
    for name, data in seeded.data_files(hf[layout]).items():
        storage.put_atomic(storage.join(storage_src, name), data)

    FlakyFileSystem.configure(rate=0.2, seed=7)
    flaky = chain(storage_src, f"flaky://flaky-{layout}")
    stats = dict(FlakyFileSystem.stats)
    FlakyFileSystem.configure(rate=0.0)

    assert stats["failures"] >= 10, stats          # the faults really happened ...
    assert stats["put_file"] and stats["pipe_file"] and stats["read"], stats
    assert any("retry" in r.message for r in caplog.records)
    for stage in ("tune", "back"):                   # ... and changed nothing
        assert flaky[stage].files == clean[stage].files
        clean_uri, flaky_uri = f"memory://clean-{layout}/{stage}", f"flaky://flaky-{layout}/{stage}"
        assert seeded.data_files(flaky_uri) == seeded.data_files(clean_uri)
        assert manifest.verify(flaky_uri) == []
    assert seeded.data_files(f"flaky://flaky-{layout}/back") == seeded.data_files(hf[layout])


def test_reads_resume_at_their_offset_after_a_fault(quick_retries):
    data = bytes(range(256)) * 4096
    FlakyFileSystem.configure(rate=0.0)
    storage.put_atomic("flaky://reads/blob", data)
    FlakyFileSystem.configure(rate=0.3, seed=3)
    got = bytearray()
    with storage.open_read("flaky://reads/blob") as f:
        f.seek(1000)
        while chunk := f.read(4096):
            got += chunk
    assert FlakyFileSystem.stats["failures"] > 0
    assert bytes(got) == data[1000:]


def test_a_store_that_never_answers_gives_up_naming_the_uri(monkeypatch):
    monkeypatch.setattr(retry, "BASE_DELAY", 0.0005)
    monkeypatch.setattr(retry, "ATTEMPTS", 3)
    FlakyFileSystem.configure(rate=1.0)
    try:
        with pytest.raises(TransientError, match=r"flaky://down/ckptflow.json: .*3 attempts"):
            storage.put_atomic("flaky://down/ckptflow.json", b"{}")
        assert FlakyFileSystem.stats["pipe_file"] == 3
    finally:
        FlakyFileSystem.configure(rate=0.0)
