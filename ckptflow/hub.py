"""The Hugging Face Hub, through huggingface_hub's own client.

    client = Client(endpoint=None, token=None)          # HF_ENDPOINT / HF_TOKEN when not given
    snap = client.resolve("org/name", "main")           # the commit sha and every file's size and hash
    path = client.fetch(snap, "config.json", local_dir) # one file, written into local_dir

huggingface_hub retries neither connection resets nor 5xx on file downloads, and deletes a
partial file when a call fails (measured with huggingface_hub 2.4; tests/servers/hub.py serves the same). So every call here turns the
client's exceptions into ckptflow's: CkptError for what retrying cannot fix (missing or gated
repo, bad token, missing revision), TransientError for the rest, which retry.call retries.
The token is passed to the client and never put into a message, a log line or a manifest.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field

from ckptflow.errors import CkptError, TransientError, first_line

log = logging.getLogger(__name__)

SCHEME = "hf://"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int | None
    sha256: str | None = None     # LFS files: the content hash the Hub publishes
    git_oid: str | None = None    # other files: the git blob sha1

    def to_dict(self) -> dict:
        return {k: v for k, v in (("size", self.size), ("sha256", self.sha256), ("git_oid", self.git_oid)) if v}


@dataclass
class Snapshot:
    repo_id: str
    revision: str                 # as asked for: a branch, tag or sha
    sha: str                      # the commit it resolved to
    files: dict[str, RepoFile] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.repo_id}@{self.sha}"


def parse(uri: str) -> tuple[str, str]:
    """("ORG/NAME", revision) of hf://ORG/NAME[@REVISION]; the revision defaults to main."""
    body = uri[len(SCHEME):] if uri.startswith(SCHEME) else ""
    repo_id, at, revision = body.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or (at and not revision):
        raise CkptError(f"{uri}: expected hf://ORG/NAME[@REVISION]")
    return repo_id, revision or "main"


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.fullmatch(revision))


class Client:
    def __init__(self, endpoint: str | None = None, token: str | None = None, cache_dir: str | None = None):
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        # None lets huggingface_hub fall back to the token saved by `hf auth login`.
        self._token = token or os.environ.get("HF_TOKEN") or None
        self.cache_dir = cache_dir

    def __repr__(self) -> str:  # never the token
        return f"hub.Client({self.endpoint!r})"

    def resolve(self, repo_id: str, revision: str) -> Snapshot:
        """The commit `revision` points at, with the size and hash of every file in it."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self._token)
        what = f"{SCHEME}{repo_id}@{revision}"
        try:
            info = api.model_info(repo_id, revision=revision, files_metadata=True)
        except Exception as exc:  # noqa: BLE001 - translated below
            raise self.translate(exc, what) from None
        files = {}
        for s in info.siblings or []:
            lfs = getattr(s, "lfs", None)
            files[s.rfilename] = RepoFile(s.rfilename, s.size, getattr(lfs, "sha256", None) if lfs else None,
                                          None if lfs else s.blob_id)
        if not info.sha:
            raise TransientError(f"{what}: the Hub answered without a commit sha")
        return Snapshot(repo_id, revision, info.sha, files)

    def fetch(self, snap: Snapshot, path: str, local_dir: str) -> str:
        """Download one file of the pinned commit into local_dir/path; returns the local path.

        A file already there from an earlier call for the same commit is not fetched again
        (huggingface_hub keeps its metadata under local_dir/.cache/huggingface)."""
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(snap.repo_id, path, revision=snap.sha, local_dir=local_dir,
                                   endpoint=self.endpoint, token=self._token, cache_dir=self.cache_dir,
                                   tqdm_class=_quiet_tqdm())
        except Exception as exc:  # noqa: BLE001 - translated below
            raise self.translate(exc, f"{snap.uri}: {path}") from None

    def translate(self, exc: BaseException, what: str) -> BaseException:
        """CkptError (retrying cannot help), TransientError (retry), or `exc` itself (a bug)."""
        from huggingface_hub import errors as e

        if isinstance(exc, e.GatedRepoError):
            return CkptError(f"{what}: gated repository; request access on the Hub, then set HF_TOKEN "
                             "to a token that has it")
        if isinstance(exc, e.RepositoryNotFoundError):
            hint = "check the name and HF_TOKEN" if self._token else "or private: set HF_TOKEN"
            return CkptError(f"{what}: repository not found ({hint})")
        if isinstance(exc, e.RevisionNotFoundError):
            return CkptError(f"{what}: no such revision (branch, tag or commit)")
        if isinstance(exc, e.DisabledRepoError):
            return CkptError(f"{what}: the repository is disabled on the Hub")
        if isinstance(exc, e.EntryNotFoundError):
            return CkptError(f"{what}: file not found in the repository")
        if isinstance(exc, e.LocalEntryNotFoundError):
            if exc.__cause__ is not None:  # the client's "not in the cache" hides the real fault
                return self.translate(exc.__cause__, what)
            return CkptError(f"{what}: not in the local cache and the Hub was not asked (HF_HUB_OFFLINE?)")
        status = _status(exc)
        if status in (401, 403):
            return CkptError(f"{what}: the Hub refused the token ({status}); check HF_TOKEN")
        if status is not None and status not in RETRY_STATUS:
            return CkptError(f"{what}: the Hub answered {status}: {self.redact(first_line(exc))}")
        if status is not None or _is_network(exc):
            return TransientError(f"{what}: {type(exc).__name__}: {self.redact(first_line(exc))}")
        from ckptflow import retry

        if retry.is_transient(exc):
            return TransientError(f"{what}: {type(exc).__name__}: {self.redact(first_line(exc))}")
        return exc

    def redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _is_network(exc: BaseException) -> bool:
    """Connection resets, timeouts and cut bodies, from whichever HTTP library the client uses."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__.split(".")[0]
    if module in ("httpx", "httpx2", "httpcore", "requests", "urllib3", "h11"):
        return True
    # The client's own check that the body matched the announced size.
    return isinstance(exc, OSError) and "consistency check failed" in str(exc).lower()


@functools.cache
def _quiet_tqdm():
    """A tqdm that never draws: the download stage shows one bar of its own for all files."""
    from tqdm.auto import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def digest(path: str) -> dict:
    """{size, sha256, git_oid} of a local file in one read (git_oid as the Hub computes it)."""
    size = os.path.getsize(path)
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            sha256.update(chunk)
            sha1.update(chunk)
    return {"size": size, "sha256": sha256.hexdigest(), "git_oid": sha1.hexdigest()}


def check(expected: RepoFile, got: dict, what: str) -> None:
    """TransientError when a downloaded file differs from what the Hub published for it."""
    if expected.size is not None and got["size"] != expected.size:
        raise TransientError(f"{what}: {got['size']} bytes, the Hub lists {expected.size}")
    if expected.sha256 and got["sha256"] != expected.sha256:
        raise TransientError(f"{what}: sha256 {got['sha256']} does not match the Hub's {expected.sha256}")
    if expected.git_oid and got["git_oid"] != expected.git_oid:
        raise TransientError(f"{what}: git blob id {got['git_oid']} does not match the Hub's {expected.git_oid}")
