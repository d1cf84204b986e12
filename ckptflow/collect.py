"""Delete what interrupted writes left under a run, and nothing else.

    ckptflow gc URI [--dry-run] [--json]

URI is a run, a storage root holding runs (dirs with run.json), or any directory. Deleted:
  - a directory holding `.ckptflow-writing` and no ckptflow.json (an interrupted write);
  - a stage directory of a run without ckptflow.json (see STAGE_DIRS; the run is URI itself and
    every directory holding run.json);
  - inside a committed directory: a stale `.ckptflow-writing` (a crash between the commit and
    its removal) and put_atomic temp files (`NAME.tmp-XXXXXXXX`) that the manifest does not list.
Never deleted: committed directories and their files, run.json, the lease, any other file or
directory, a directory that holds a committed one, and a live write: a directory whose
`.ckptflow-writing` names a writer that is not provably gone (it is listed under "live"; gc
claims each directory before deleting it, so a writer starting meanwhile is never deleted from
under). A run whose writer lease is held by a live process is
refused, naming the holder (gc would delete the directory being written); so is a deletion
under a directory that another lease covers (flows lease {run}/exports and the shared base).
"""
from __future__ import annotations

import logging
import re

from ckptflow import commit, lease, manifest, storage
from ckptflow.errors import CkptError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# A run's stage directories (docs/design.md "Run layout"); "*" = every child of that directory.
STAGE_DIRS = ("source", "base", "merged", "export", "eval", "train/step-*", "exports/*")
STEP_RE = re.compile(r"step-\d+$")
TMP_RE = re.compile(re.escape(storage.TMP_INFIX) + r"[0-9a-f]{8}$")


def run(uri: str, *, dry_run: bool = False) -> dict:
    """{"uri", "dry_run", "deleted": [URIs], "committed": [URIs], "live": [URIs being written]}."""
    root = storage.normalize(uri)
    if not storage.isdir(root):
        raise CkptError(f"{root}: no such directory")
    tree = _tree(root)
    runs = [""] + sorted(d for d, files in tree.items() if RUN_FILE in files and d)
    victims = _victims(root, tree, runs)
    live = [v for v in victims if _live(root, v, tree)]
    victims = [v for v in victims if v not in live]
    committed = sorted(_abs(root, d) for d, f in tree.items() if manifest.NAME in f)
    if not dry_run and victims:
        live += _delete(root, runs, victims, tree)
        victims = [v for v in victims if v not in live]
    deleted = [_abs(root, rel) for rel in victims]
    for rel in live:
        log.warning("gc: %s is being written (%s); left alone", _abs(root, rel), _writer_of(root, rel, tree))
    return {"uri": root, "dry_run": dry_run, "deleted": deleted, "committed": committed,
            "live": [_abs(root, rel) for rel in live]}


def _abs(root: str, rel: str) -> str:
    return storage.join(root, rel) if rel else root


def _writer_of(root: str, rel: str, tree: dict[str, set[str]]) -> str:
    """A description of the live writer of victim `rel` (a directory, or a file in one), or ''."""
    d = rel if rel in tree else rel.rsplit("/", 1)[0] if "/" in rel else ""
    for sub in sorted((x for x in tree if _inside(x, d)), key=len):
        if commit.MARKER in tree[sub]:
            rec = commit.writer(_abs(root, sub))
            if rec is not None:
                return lease.describe(rec)
    return ""


def _live(root: str, rel: str, tree: dict[str, set[str]]) -> bool:
    return _writer_of(root, rel, tree) != ""


def _tree(root: str) -> dict[str, set[str]]:
    """Directory (relative, "" = root) -> names of the files directly in it; every ancestor of a
    file is present, so are the empty stage directories of the root run."""
    tree: dict[str, set[str]] = {"": set()}
    for rel in storage.list_files(root):
        parts = rel.split("/")
        for i in range(1, len(parts)):
            tree.setdefault("/".join(parts[:i]), set())
        tree["/".join(parts[:-1])].add(parts[-1])
    for name in storage.listdir(root):   # empty directories do not show in a recursive file listing
        if name in STAGE_DIRS and name not in tree and storage.isdir(storage.join(root, name)):
            tree[name] = set()
    return tree


def _victims(root: str, tree: dict[str, set[str]], runs: list[str]) -> list[str]:
    """Relative paths to delete, shallowest first, none inside another."""
    out: list[str] = []
    for d in sorted(tree, key=lambda p: (p.count("/") if p else -1, p)):
        if any(_inside(d, v) for v in out) or _in_committed(d, tree):
            continue
        files = tree[d]
        if manifest.NAME in files:
            out.extend(_join(d, f) for f in sorted(files) if f == commit.MARKER or _stray_tmp(root, d, f))
            continue
        if (commit.MARKER in files or _is_stage(d, runs)) and not _holds_committed(d, tree):
            out.append(d)
    return out


def _stray_tmp(root: str, d: str, name: str) -> bool:
    if not TMP_RE.search(name):
        return False
    m = manifest.read(_abs(root, d))
    return m is not None and _join(d, name) not in m.files and name not in m.files


def _is_stage(d: str, runs: list[str]) -> bool:
    for r in runs:
        if r and not d.startswith(r + "/"):
            continue
        rel = d[len(r) + 1:] if r else d
        for pattern in STAGE_DIRS:
            head, _, tail = pattern.partition("/")
            if rel == head and not tail:
                return True
            if tail and rel.startswith(head + "/") and rel.count("/") == 1:
                child = rel.split("/", 1)[1]
                if tail == "*" or (tail == "step-*" and STEP_RE.match(child)):
                    return True
    return False


def _in_committed(d: str, tree: dict[str, set[str]]) -> bool:
    parts = d.split("/") if d else []
    return any(manifest.NAME in tree.get("/".join(parts[:i]), ()) for i in range(len(parts)))


def _holds_committed(d: str, tree: dict[str, set[str]]) -> bool:
    return any(manifest.NAME in files and _inside(other, d) for other, files in tree.items())


def _inside(path: str, parent: str) -> bool:
    return parent == "" or path == parent or path.startswith(parent + "/")


def _join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


def _delete(root: str, runs: list[str], victims: list[str], tree: dict[str, set[str]]) -> list[str]:
    """Delete the victims, each directory claimed first; those a writer claimed meanwhile are
    returned (left alone)."""
    _check_ancestors(root)
    skipped: list[str] = []
    for r in sorted(runs, key=len, reverse=True):
        mine = [v for v in victims if _inside(v, r) and not any(_inside(v, o) for o in runs if len(o) > len(r))]
        if not mine:
            continue
        run_uri = _abs(root, r)
        with lease.hold(run_uri, owner="ckptflow gc"):
            _check_inner_leases(root, r, mine, tree)
            for rel in mine:
                target = _abs(root, rel)
                log.info("gc: deleting %s", target)
                try:
                    if rel in tree:
                        commit.discard(target, owner="ckptflow gc")   # claimed, then deleted, marker last
                    else:
                        storage.remove(target)
                except CkptError as e:
                    log.info("gc: %s", e)
                    skipped.append(rel)
    return skipped


def _check_inner_leases(root: str, run: str, victims: list[str], tree: dict[str, set[str]]) -> None:
    """Leases held below the run (an export flow leases {run}/exports, the shared base its cache
    directory) protect what is under them."""
    for d, files in tree.items():
        if d == run or lease.NAME not in files or not any(_inside(v, d) or _inside(d, v) for v in victims):
            continue
        where = _abs(root, d)
        rec = lease.read(where)
        if rec is not None and lease.is_live(rec):
            raise CkptError(f"{where}: another process is writing here: {lease.describe(rec)}; gc refused")


def _check_ancestors(root: str) -> None:
    """A run being written above URI (gc of one of its directories) is refused, by lease.guard's rule."""
    blocker = lease.blocking_ancestor(root)
    if blocker is not None:
        up, rec = blocker
        raise CkptError(f"{up}: another process is writing this run: {lease.describe(rec)}; gc refused")
