"""Format detection: sniff marker files of a directory over fsspec.

Each format contributes one predicate over the directory listing. No match is an error that
lists what was found; two matches is an error that names both (never a guess).
A committed ckptflow directory is identified by its manifest alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ckptflow import manifest, storage
from ckptflow.commit import MARKER
from ckptflow.errors import CkptError

log = logging.getLogger(__name__)


def _hf(names: list[str]) -> bool:
    from ckptflow.formats import hf

    return hf.is_hf(names)


def _peft(names: list[str]) -> bool:
    from ckptflow.formats import peft

    return peft.is_peft(names)


def _meta(names: list[str]) -> bool:
    from ckptflow.formats import meta

    return meta.is_meta(names)


def _dcp(names: list[str]) -> bool:
    from ckptflow.formats import dcp

    return dcp.is_dcp(names)


# format name -> predicate over the names in the directory. Other format modules add theirs.
def _torchtune(names: list[str]) -> bool:
    from ckptflow.formats import torchtune

    return torchtune.is_torchtune(names)


def _litgpt(names: list[str]) -> bool:
    from ckptflow.formats import litgpt

    return litgpt.is_litgpt(names)


MARKERS: dict[str, callable] = {"hf": _hf, "peft": _peft, "meta": _meta, "dcp": _dcp, "torchtune": _torchtune,
                                "litgpt": _litgpt}

# A format whose directories also hold another format's files by design: torchtune's output
# dirs carry an HF checkpoint and a PEFT adapter beside its own files. Its match wins over those;
# any other double match is an error.
CLAIMS: dict[str, tuple[str, ...]] = {"torchtune": ("hf", "peft")}


@dataclass
class Detection:
    format: str
    uri: str
    family: str | None = None
    dtype: str | None = None
    num_params: int | None = None
    files: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": self.format, "uri": self.uri, "family": self.family, "dtype": self.dtype,
                "num_params": self.num_params, "files": self.files, **({"details": self.details} if self.details else {})}


def sniff(uri: str, *, interrupted_ok: bool = True) -> str:
    """The format name of directory `uri`. With interrupted_ok=False (readers that are about to
    use the checkpoint) a directory that ckptflow began writing and never committed is refused."""
    uri = storage.normalize(uri)
    m = manifest.read(uri)
    if m is not None:
        return m.format
    names = storage.listdir(uri)
    if not names:
        if storage.isfile(uri):
            raise CkptError(f"{uri}: is a file; give the directory that holds the checkpoint")
        raise CkptError(f"{uri}: empty or missing directory")
    if MARKER in names and not interrupted_ok:   # ckptflow began writing here and never committed
        raise CkptError(f"{uri}: an interrupted ckptflow write ({MARKER}, no {manifest.NAME}); "
                        "re-run the stage that writes it, or delete it with `ckptflow gc`")
    hits = [fmt for fmt, pred in MARKERS.items() if pred(names)]
    hits = [h for h in hits if not any(h in CLAIMS.get(other, ()) for other in hits)]
    if not hits:
        raise CkptError(f"{uri}: no known checkpoint format (found: {', '.join(names[:12])}"
                        + (", ..." if len(names) > 12 else "") + ")")
    if len(hits) > 1:
        raise CkptError(f"{uri}: ambiguous, matches formats {' and '.join(hits)} (found: {', '.join(names[:12])})")
    return hits[0]


def detect(uri: str) -> Detection:
    """Format, family, dtype, parameter count and files of a checkpoint directory (or of the
    model a seed:// URI generates)."""
    if uri.startswith("seed://"):
        from ckptflow import seed

        return seed.describe(uri)
    uri = storage.normalize(uri)
    m = manifest.read(uri)
    if m is None and _is_run(uri):
        return _describe_run(uri)
    fmt = sniff(uri)
    if m is not None:
        args = m.model_args or {}
        from ckptflow.model_args import ModelArgs

        n = ModelArgs.from_dict(args).num_params() if args else None
        return Detection(m.format, uri, m.family, m.dtype, n, sorted(m.files), {"kind": m.kind, "step": m.step})
    describe = DESCRIBERS.get(fmt)
    if describe is None:
        return Detection(fmt, uri, files=storage.list_files(uri))
    return describe(uri)


def _is_run(uri: str) -> bool:
    from ckptflow import checkpointer

    return checkpointer.is_run(uri)


def _describe_run(uri: str) -> Detection:
    """A run directory: its newest committed step, as export and generate would take it."""
    from ckptflow import checkpointer

    step = checkpointer.newest_of_run(uri)
    d = detect(step.uri)
    d.details["checkpoint"] = f"{step.uri} (step {step.step}, the newest committed step of run {uri})"
    d.details["run"] = uri
    return d


def _describe_hf(uri: str) -> Detection:
    from ckptflow.formats import hf

    src = hf.open_source(uri)
    counts: dict[str, int] = {}
    n = 0
    for items in src.tensors.values():
        for it in items:
            numel = 1
            for s in it.shape:
                numel *= s
            n += numel
            counts[it.dtype] = counts.get(it.dtype, 0) + numel
    from ckptflow.formats import st

    dtype = st.TORCH_NAME[max(counts, key=counts.get)] if counts else None
    return Detection("hf", uri, src.family.NAME, dtype, n, storage.list_files(uri),
                     {"weights": src.weights, "shards": len(src.files), "model_type": src.config.get("model_type")})


def _describe_peft(uri: str) -> Detection:
    from ckptflow.formats import peft

    return peft.describe(uri)


def summarize(shapes_and_dtypes) -> tuple[str | None, int]:
    """(dominant dtype name, parameter count) of (shape, safetensors dtype code) pairs."""
    from ckptflow.formats import st

    counts: dict[str, int] = {}
    for shape, code in shapes_and_dtypes:
        numel = 1
        for s in shape:
            numel *= s
        counts[code] = counts.get(code, 0) + numel
    dtype = st.TORCH_NAME.get(max(counts, key=counts.get)) if counts else None
    return dtype, sum(counts.values())


def _describe_meta(uri: str) -> Detection:
    from ckptflow.formats import meta

    return meta.describe(uri)


def _describe_dcp(uri: str) -> Detection:
    from ckptflow.formats import dcp

    return dcp.describe(uri)


def _describe_torchtune(uri: str) -> Detection:
    from ckptflow.formats import torchtune

    return torchtune.describe(uri)


def _describe_litgpt(uri: str) -> Detection:
    from ckptflow.formats import litgpt

    return litgpt.describe(uri)


DESCRIBERS: dict[str, callable] = {"hf": _describe_hf, "peft": _describe_peft, "meta": _describe_meta,
                                   "dcp": _describe_dcp, "torchtune": _describe_torchtune,
                                   "litgpt": _describe_litgpt}
