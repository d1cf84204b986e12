"""A Hugging Face Hub look-alike on loopback, for huggingface_hub's download functions.

It serves what huggingface_hub 2.4 was measured to need:
`/api/{models,datasets}/{repo}[/revision/{rev}]`, `/api/.../tree/{rev}[/{path}]` and
`HEAD`/`GET /[datasets/]{repo}/resolve/{rev}/{path}` (ETag, X-Repo-Commit, Range -> 206),
with the real Hub's X-Error-Code headers so the client raises its own exception types.
It never advertises Xet, so clients stay on plain HTTP.

    hub = HubServer().start()
    sha = hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": Path(...)})
    hub.fail("*model.safetensors", times=1, mode="truncate")
    snapshot_download("org/tiny", endpoint=hub.endpoint, cache_dir=tmp)
    hub.fetched()  # -> ["config.json", "model.safetensors"]; hub.requests also shows the cut GET
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

log = logging.getLogger(__name__)

# What the Hub's default .gitattributes sends to LFS, plus anything of 10 MiB or more.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf",
                ".npy", ".npz", ".parquet", ".arrow", ".zip", ".tar", ".gz", ".model")  # fmt: skip
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 1024 * 1024
REPO_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
FAULT_MODES = ("reset", "truncate", "truncate-reset")
TIMESTAMP = "2024-01-01T00:00:00.000Z"


@dataclass(frozen=True)
class Blob:
    size: int
    git_oid: str  # sha1 of the git object in the tree: the file itself, or its LFS pointer
    sha256: str | None  # set for LFS files
    data: bytes | None = None
    path: Path | None = None

    @property
    def etag(self) -> str:
        # The client names the cached blob after this, as the Hub does: sha256 for LFS, git sha1 otherwise.
        return self.sha256 or self.git_oid

    def chunks(self, start: int, end: int):
        if self.data is not None:
            for pos in range(start, end, CHUNK):
                yield self.data[pos : min(end, pos + CHUNK)]
            return
        with open(self.path, "rb") as f:
            f.seek(start)
            while start < end:
                piece = f.read(min(CHUNK, end - start))
                if not piece:
                    raise OSError(f"{self.path} shrank after it was added to the hub server")
                start += len(piece)
                yield piece


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gate_token: str | None = None


@dataclass
class Request:
    """One request as the server saw it; `status` is None when the connection was reset."""

    method: str
    path: str  # percent-decoded, without the query
    query: str
    headers: dict[str, str]  # lowercase names
    repo_id: str | None = None
    revision: str | None = None
    file: str | None = None  # the repo file path, for /resolve requests
    status: int | None = None
    fault: str | None = None


@dataclass
class _Fault:
    match: Callable[[Request], bool]
    mode: str
    remaining: int
    method: str | None


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    blob: Blob | None = None
    span: tuple[int, int] = (0, 0)

    @property
    def length(self) -> int:
        return self.span[1] - self.span[0] if self.blob else len(self.body)


class HubServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._httpd = _Server((host, port), _Handler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._faults: list[_Fault] = []
        self._required_token: str | None = None
        self._conns: set[socket.socket] = set()
        self.requests: list[Request] = []

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # idle keep-alive connections would otherwise pin their threads
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, hf_home: str | os.PathLike) -> dict[str, str]:
        """Variables for a subprocess that should download from this server into its own cache."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }

    # -- repositories -------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files, branch: str = "main", repo_type: str = "model") -> str:
        """Commit `files` (the whole tree: {path: bytes | Path}, or a directory) on `branch`; returns the sha."""
        if repo_type not in URL_PREFIXES:
            raise ValueError(f"repo_type must be one of {sorted(URL_PREFIXES)}, got {repo_type!r}")
        tree = {path: _make_blob(path, src) for path, src in _file_items(files)}
        sha = _commit_sha(repo_type, repo_id, tree)
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id))
            repo.commits[sha] = tree
            repo.refs[branch] = sha
        return sha

    def add_branch(self, repo_id: str, branch: str, sha: str, repo_type: str = "model") -> None:
        with self._lock:
            repo = self._existing(repo_type, repo_id)
            if sha not in repo.commits:
                raise ValueError(f"{repo_id} has no commit {sha}")
            repo.refs[branch] = sha

    def gate(self, repo_id: str, token: str, repo_type: str = "model") -> None:
        """Make the repo's files readable only with `token` (the info and tree stay public, as on the Hub)."""
        with self._lock:
            self._existing(repo_type, repo_id).gate_token = token

    def _existing(self, repo_type: str, repo_id: str) -> Repo:
        if (repo_type, repo_id) not in self._repos:
            raise ValueError(f"no {repo_type} repo {repo_id!r} on this hub server: add_repo it first")
        return self._repos[(repo_type, repo_id)]

    def require_token(self, token: str | None) -> None:
        """Answer 401 to every request that lacks `Authorization: Bearer <token>`; None turns it off."""
        self._required_token = token

    # -- faults and the request log -----------------------------------------------------------

    def fail(self, match: str | Callable[[Request], bool], times: int = 1, mode: str | int = "reset",
             method: str | None = "GET") -> None:  # fmt: skip
        """Make the next `times` matching requests fail.

        match: a glob on the decoded URL path or on the repo file path, or a predicate on Request.
        mode: "reset" (RST, no response), "truncate" (half the body, then a clean close),
        "truncate-reset" (half the body, then RST), or an HTTP status such as 500 or "503".
        method: only requests with this method count ("GET" by default, so the HEAD passes); None for any.
        """
        mode = str(mode)
        if mode not in FAULT_MODES and not re.fullmatch(r"[45]\d\d", mode):
            raise ValueError(f"fault mode must be one of {FAULT_MODES} or a 4xx/5xx status, got {mode!r}")
        if isinstance(match, str):
            pattern = match
            match = lambda r: fnmatch.fnmatch(r.path, pattern) or (  # noqa: E731
                r.file is not None and fnmatch.fnmatch(r.file, pattern)
            )
        with self._lock:
            self._faults.append(_Fault(match, mode, times, method.upper() if method else None))

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return sum(f.remaining for f in self._faults)

    def fetched(self, repo_id: str | None = None) -> list[str]:
        """Repo file paths of the GET /resolve requests answered 200/206 in full (no fault), in order."""
        return [
            r.file
            for r in list(self.requests)
            if r.method == "GET" and r.file is not None and r.status in (200, 206) and r.fault is None
            and (repo_id is None or r.repo_id == repo_id)
        ]  # fmt: skip

    def _take_fault(self, req: Request) -> str | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.method in (None, req.method) and fault.match(req):
                    fault.remaining -= 1
                    return fault.mode
        return None

    # -- routing --------------------------------------------------------------------------------

    def _route(self, req: Request, raw_path: str) -> _Response:
        parts = raw_path.strip("/").split("/")
        segs = [unquote(p) for p in parts]  # split first: a revision may hold an encoded "/"
        if len(segs) >= 3 and segs[0] == "api" and segs[1] in REPO_PREFIXES:
            return self._api(req, REPO_PREFIXES[segs[1]], segs[2:])
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = REPO_PREFIXES[segs[0]], segs[1:]
        repo_id, rest = self._split_repo(repo_type, segs)
        if len(rest) >= 3 and rest[0] == "resolve":
            req.repo_id, req.revision, req.file = repo_id, rest[1], "/".join(rest[2:])
            return self._resolve(req, repo_type, repo_id, rest[1], req.file)
        return _error(404, None, "Not Found")

    def _split_repo(self, repo_type: str, segs: list[str]) -> tuple[str, list[str]]:
        # Legacy ids have no namespace ("gpt2"); they are recognised only once added.
        with self._lock:
            single = (repo_type, segs[0]) in self._repos if segs else False
        if single and (len(segs) == 1 or segs[1] in ("revision", "tree", "resolve")):
            return segs[0], segs[1:]
        return "/".join(segs[:2]), segs[2:]

    def _api(self, req: Request, repo_type: str, segs: list[str]) -> _Response:
        repo_id, rest = self._split_repo(repo_type, segs)
        req.repo_id = repo_id
        if not rest:
            rest = ["revision", "main"]
        if len(rest) < 2 or rest[0] not in ("revision", "tree"):
            return _error(404, None, "Not Found")
        req.revision = rest[1]
        repo, sha, denied = self._lookup(req, repo_type, repo_id, rest[1])
        if denied:
            return denied
        query = {k: v[-1].lower() for k, v in parse_qs(req.query).items()}
        if rest[0] == "revision":
            return _json(_info(repo, sha, blobs=query.get("blobs") == "true"))
        entries = _tree(repo.commits[sha], "/".join(rest[2:]), query.get("recursive") == "true", sha)
        if entries is None:
            return _error(404, "EntryNotFound", f"{'/'.join(rest[2:])} does not exist on {rest[1]}", sha)
        return _json(entries)

    def _resolve(self, req: Request, repo_type: str, repo_id: str, rev: str, path: str) -> _Response:
        repo, sha, denied = self._lookup(req, repo_type, repo_id, rev)
        if denied:
            return denied
        if repo.gate_token is not None and _bearer(req) != repo.gate_token:
            status = 403 if _bearer(req) else 401
            return _error(status, "GatedRepo", f"Access to {repo_type} {repo_id} is restricted.")
        blob = repo.commits[sha].get(path)
        if blob is None:
            return _error(404, "EntryNotFound", "Entry not found", sha)
        headers = {"ETag": f'"{blob.etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        if blob.sha256:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        span = _parse_range(req.headers.get("range"), blob.size) if req.method == "GET" else None
        if span == "invalid":
            return _Response(416, {"Content-Range": f"bytes */{blob.size}"})
        if span is None:
            return _Response(200, headers, blob=blob, span=(0, blob.size))
        headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{blob.size}"
        return _Response(206, headers, blob=blob, span=span)

    def _lookup(self, req: Request, repo_type: str, repo_id: str, rev: str):
        """(repo, sha, None) or (None, None, the error the Hub would answer)."""
        token = _bearer(req)
        if self._required_token is not None and token != self._required_token:
            if token:  # the Hub's answer to a bad token, whatever the repo (plain HfHubHTTPError)
                return None, None, _error(401, None, "Invalid credentials in Authorization header")
            return None, None, _error(401, "RepoNotFound", "Repository not found")
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            return None, None, _error(401, "RepoNotFound", "Repository not found")
        sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            return None, None, _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, sha, None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens up to 8 connections at once

    def handle_error(self, request, client_address):
        # Clients drop connections mid-body on purpose in fault tests; anything else is a bug.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("hub connection from %s dropped: %r", client_address, exc)
        else:
            log.error("hub server error with %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every response carries Content-Length

    def setup(self):
        super().setup()
        with self.server.hub._lock:
            self.server.hub._conns.add(self.connection)

    def finish(self):
        with self.server.hub._lock:
            self.server.hub._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self):
        self._serve()

    def do_HEAD(self):
        self._serve()

    def log_message(self, fmt, *args):
        log.debug("hub %s " + fmt, self.client_address[1], *args)

    def _serve(self):
        hub = self.server.hub
        raw_path, _, query = self.path.partition("?")
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = Request(self.command, unquote(raw_path), query, headers)
        try:
            resp = hub._route(req, raw_path)
        except Exception as exc:  # a bug in this server: answer loudly instead of hanging the client
            log.exception("hub server failed on %s %s", self.command, self.path)
            resp = _error(500, None, f"hub test server bug: {exc!r}")
        req.fault = hub._take_fault(req)
        if req.fault and req.fault not in FAULT_MODES:
            resp = _error(int(req.fault), None, f"injected fault {req.fault}")
        req.status = None if req.fault == "reset" else resp.status
        with hub._lock:
            hub.requests.append(req)
        if req.fault == "reset":
            return self._reset()
        self._send(resp, req.fault)

    def _send(self, resp: _Response, fault: str | None):
        self.send_response(resp.status)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(resp.length))
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = fault in ("truncate", "truncate-reset")
        limit = resp.length // 2 if cut else resp.length
        sent = 0
        for piece in self._body(resp):
            piece = piece[: limit - sent]
            self.wfile.write(piece)
            sent += len(piece)
            if sent >= limit:
                break
        if fault == "truncate":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_WR)  # a clean FIN mid-body
        elif fault == "truncate-reset":
            self._reset()

    def _body(self, resp: _Response):
        if resp.blob is None:
            yield resp.body
        else:
            yield from resp.blob.chunks(*resp.span)

    def _reset(self):
        # SO_LINGER 0 turns close() into an RST; closing rfile too releases the last reference.
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.connection.close()


def _bearer(req: Request) -> str | None:
    value = req.headers.get("authorization", "")
    if not value.lower().startswith("bearer "):
        return None
    return value[len("bearer ") :].strip() or None


def _parse_range(header: str | None, size: int):
    """(start, end) with end exclusive; None to serve the whole file; "invalid" for a 416."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if m is None or m.groups() == ("", ""):
        return None  # no Range, or one this server does not do (several ranges): a 200 is allowed
    first, last = m.groups()
    if first == "":
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), min(size, int(last) + 1) if last else size
    return (start, end) if start < end else "invalid"


def _error(status: int, code: str | None, message: str, commit: str | None = None) -> _Response:
    headers = {"Content-Type": "application/json", "X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    if commit:
        headers["X-Repo-Commit"] = commit
    return _Response(status, headers, json.dumps({"error": message}).encode())


def _json(obj) -> _Response:
    return _Response(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())


def _info(repo: Repo, sha: str, blobs: bool) -> dict:
    siblings = []
    for path, blob in sorted(repo.commits[sha].items()):
        sib = {"rfilename": path}
        if blobs:
            sib.update(size=blob.size, blobId=blob.git_oid)
            if blob.sha256:
                sib["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": len(_pointer(blob))}
        siblings.append(sib)
    info = {"_id": sha[:24], "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": sha,
            "lastModified": TIMESTAMP, "createdAt": TIMESTAMP, "private": False,
            "gated": "manual" if repo.gate_token else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}  # fmt: skip
    if repo.repo_type == "model":
        info["modelId"] = repo.repo_id
    return info


def _tree(files: dict[str, Blob], base: str, recursive: bool, sha: str) -> list[dict] | None:
    base = base.strip("/")
    prefix = f"{base}/" if base else ""
    dirs: set[str] = set()
    entries = []
    for path, blob in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rel_parts = path[len(prefix) :].split("/")
        depth = len(rel_parts) if recursive else 1
        for i in range(1, min(depth, len(rel_parts) - 1) + 1):
            dirs.add(prefix + "/".join(rel_parts[:i]))
        if recursive or len(rel_parts) == 1:
            entry = {"type": "file", "path": path, "oid": blob.git_oid, "size": blob.size}
            if blob.sha256:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(_pointer(blob))}
            entries.append(entry)
    if base and not entries and not dirs:
        return None
    tree_oid = lambda d: hashlib.sha1(f"tree {sha} {d}".encode()).hexdigest()  # noqa: E731
    return [{"type": "directory", "path": d, "oid": tree_oid(d)} for d in sorted(dirs)] + entries


def _pointer(blob: Blob) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{blob.sha256}\nsize {blob.size}\n".encode()


def _file_items(files):
    if isinstance(files, (str, os.PathLike)):
        root = Path(files)
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory")
        return [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*")) if p.is_file()]
    if not isinstance(files, Mapping):
        raise TypeError(f"files must be a dict or a directory, got {type(files).__name__}")
    return list(files.items())


def _make_blob(path: str, src) -> Blob:
    if isinstance(src, (bytes, bytearray)):
        data, size, sha1, sha256 = bytes(src), len(src), _git_sha1_bytes(src), hashlib.sha256(src).hexdigest()
        local = None
    elif isinstance(src, os.PathLike):
        data, local = None, Path(src)
        size, sha1, sha256 = _hash_file(local)
    else:
        raise TypeError(f"{path}: pass bytes or a pathlib.Path, got {type(src).__name__}")
    if size >= LFS_MIN_SIZE or path.lower().endswith(LFS_SUFFIXES):
        blob = Blob(size, "", sha256, data, local)
        return Blob(size, _git_sha1_bytes(_pointer(blob)), sha256, data, local)
    return Blob(size, sha1, None, data, local)


def _git_sha1_bytes(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _hash_file(path: Path) -> tuple[int, str, str]:
    size = path.stat().st_size
    sha1, sha256 = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(CHUNK):
            sha1.update(piece)
            sha256.update(piece)
    return size, sha1.hexdigest(), sha256.hexdigest()


def _commit_sha(repo_type: str, repo_id: str, tree: dict[str, Blob]) -> str:
    h = hashlib.sha1(f"commit {repo_type} {repo_id}\n".encode())
    for path, blob in sorted(tree.items()):
        h.update(f"{path}\0{blob.etag}\n".encode())
    return h.hexdigest()
