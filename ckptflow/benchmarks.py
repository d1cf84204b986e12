"""Benchmark scores from lm-evaluation-harness (`lm-eval`), run in process on an HF directory.

    tasks = resolve_tasks(["deployments/tasks", "hellaswag"])   # reads and checks the local YAMLs
    harness = Harness(tasks, scratch)        # writes them resolved, checks every name
    results = harness.run(hf_dir, limit=20)  # as many models as needed
    scores(results)                          # {"ckptflow_demo_qa": {"acc": 0.9, ...}, ...}

A task is an lm-eval task name or a local task YAML file or folder. lm-eval reads a task's
`dataset_kwargs.data_files` as given, so a local YAML is copied into `scratch` with its relative
data paths made absolute (relative to the YAML), its datasets cache inside `scratch`, and that
copy's folder becomes the TaskManager's include_path. The model is loaded by lm-eval's HF backend
(`pretrained=DIR`, never trust_remote_code), offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are
set for the call (a variable already set in the environment is kept), and put back after it.

lm-eval is an optional dependency (the `eval` extra); without it `require()` raises one line
that says how to install it. Only the function bodies import lm_eval, datasets and
huggingface_hub: importing this module stays light.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import yaml

from ckptflow.errors import CkptError

log = logging.getLogger(__name__)

INSTALL = "lm-evaluation-harness is not installed; install it with: pip install 'ckptflow[eval]'"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
YAML_SUFFIX = ".yaml"     # what lm-eval's TaskManager indexes (not .yml)
DEFAULT_BATCH_SIZE = 16


@dataclass
class Tasks:
    names: list[str]                                     # what lm-eval is asked to run
    files: dict = field(default_factory=dict)            # "0/demo_qa.yaml" -> its YAML (data paths absolute)
    sources: dict = field(default_factory=dict)          # task name -> the YAML it came from
    data: list = field(default_factory=list)             # the local data files the YAMLs read
    builtin: bool = False                                # any name from lm-eval's own tasks

    def texts(self, cache: str | None = None) -> dict[str, str]:
        """{relative path: text} of the local task files; `cache`: their datasets cache_dir."""
        out = {}
        for rel, doc in self.files.items():
            if isinstance(doc, dict) and cache and isinstance(doc.get("dataset_kwargs"), dict):
                doc = {**doc, "dataset_kwargs": {**doc["dataset_kwargs"], "cache_dir": cache}}
            out[rel] = doc if rel.endswith(".py") else _dump_yaml(doc)
        return out

    def write(self, root: str, cache: str | None = None) -> str | None:
        """The local task files under root (lm-eval's include_path), or None when there are none."""
        if not self.files:
            return None
        for rel, text in self.texts(cache).items():
            os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
            with open(os.path.join(root, rel), "w") as f:
                f.write(text)
        return root


def require() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise CkptError(INSTALL) from None


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("lm_eval", "transformers", "torch")}


# --- tasks ----------------------------------------------------------------------------------

def is_path(spec: str) -> bool:
    return spec.endswith((YAML_SUFFIX, ".yml")) or os.sep in spec or os.path.exists(spec)


def resolve_tasks(specs: list[str]) -> Tasks:
    """Task names and local task paths -> what lm-eval runs, each local folder's YAMLs read with
    their data paths made absolute (nothing is written yet)."""
    if not specs:
        raise CkptError("--tasks: no task given")
    tasks = Tasks(names=[])
    for i, spec in enumerate(specs):
        if not is_path(spec):
            tasks.names.append(spec)
            tasks.builtin = True
            continue
        if not os.path.exists(spec):
            raise CkptError(f"{spec}: no such task file or folder")
        tasks.names += _task_names(spec)
        files, sources = _task_dir(spec)
        tasks.files.update({f"{i}/{rel}": doc for rel, doc in files.items()})
        tasks.data += sorted({p for doc in files.values() if isinstance(doc, dict) for p in _local_data(doc)})
        tasks.sources.update(sources)
    return tasks


def _task_dir(spec: str) -> tuple[dict, dict]:
    """({name: YAML doc or helper source}, {task: file}) of the folder that holds SPEC: the YAMLs
    with their data paths absolute (an `include:` of a sibling still resolves) and Python helpers
    (`!function utils.fn`)."""
    src_dir = spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))
    files, sources = {}, {}
    for entry in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, entry)
        if not os.path.isfile(path):
            continue
        if entry.endswith(YAML_SUFFIX):
            doc = _load_yaml(path)
            if isinstance(doc, dict):
                _absolute_data(doc, src_dir, path)
                if isinstance(doc.get("task"), str):
                    sources[doc["task"]] = os.path.abspath(path)
            files[entry] = doc
        elif entry.endswith(".py"):
            with open(path) as f:
                files[entry] = f.read()
    return files, sources


def _task_names(spec: str) -> list[str]:
    """The tasks (or groups) that SPEC names: a file's `task`/`group`, a folder's every task."""
    if os.path.isdir(spec):
        files = [os.path.join(spec, e) for e in sorted(os.listdir(spec)) if e.endswith(YAML_SUFFIX)]
    elif not spec.endswith(YAML_SUFFIX):
        raise CkptError(f"{spec}: lm-eval reads task files named *.yaml only")
    else:
        files = [spec]
    names = []
    for path in files:
        doc = _load_yaml(path)
        name = (doc.get("group") if "group" in doc else doc.get("task")) if isinstance(doc, dict) else None
        if isinstance(name, str):
            names.append(name)
        elif not os.path.isdir(spec):
            raise CkptError(f"{path}: not an lm-eval task YAML (no 'task' or 'group' key)")
    if not names:
        raise CkptError(f"{spec}: no lm-eval task YAML (a file with a 'task' key) in this folder")
    return names


def _absolute_data(doc: dict, base: str, path: str) -> None:
    kwargs = doc.get("dataset_kwargs")
    if not isinstance(kwargs, dict):
        return
    if "data_files" in kwargs:
        kwargs["data_files"] = _absolute(kwargs["data_files"], base, path)
    if kwargs.get("data_dir") and not os.path.isabs(kwargs["data_dir"]):
        kwargs["data_dir"] = os.path.normpath(os.path.join(base, kwargs["data_dir"]))


def _local_data(doc: dict) -> list[str]:
    files = (doc.get("dataset_kwargs") or {}).get("data_files") if isinstance(doc.get("dataset_kwargs"), dict) else None
    flat = list(files.values()) if isinstance(files, dict) else files if isinstance(files, list) else [files]
    out = []
    for f in flat:
        out += f if isinstance(f, list) else [f]
    return [f for f in out if isinstance(f, str) and os.path.isfile(f)]


def _absolute(files, base: str, path: str):
    if isinstance(files, dict):
        return {split: _absolute(f, base, path) for split, f in files.items()}
    if isinstance(files, list):
        return [_absolute(f, base, path) for f in files]
    if not isinstance(files, str):
        raise CkptError(f"{path}: dataset_kwargs.data_files must be a path, a list or a mapping of splits")
    if "://" in files or os.path.isabs(files):
        return files
    full = os.path.normpath(os.path.join(base, files))
    if not os.path.exists(full):
        raise CkptError(f"{path}: data file {files!r} not found (looked for {full})")
    return full


class _Function(str):
    """lm-eval's `!function module.name` tag, kept as written."""


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, v: dumper.represent_scalar("!function", str(v)))


def _load_yaml(path: str):
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_Loader)  # noqa: S506 - a SafeLoader that knows one more tag
    except yaml.YAMLError as e:
        raise CkptError(f"{path}: not valid YAML ({e})".splitlines()[0]) from None


def _dump_yaml(doc) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


# --- running --------------------------------------------------------------------------------

@contextlib.contextmanager
def offline():
    """No network for lm-eval unless the environment says otherwise (HF_HUB_OFFLINE=0 ...).
    huggingface_hub and datasets read these variables once, at import, so their module flags
    are set too, and both are put back afterwards: a download later in this process still works."""
    import datasets.config as dc
    import huggingface_hub.constants as hc

    saved_env = {k: os.environ.get(k) for k in (*OFFLINE_ENV, "DISABLE_MULTIPROC")}
    # lm-eval bootstraps stderrs in a forked multiprocessing pool: forking a threaded torch/Prefect
    # process is unsafe, and the pool's workers inherit Prefect's SIGTERM handler, so they print a
    # TerminationSignal traceback when the pool closes. Its single-process path draws the same
    # replicates (random.Random(i) per chunk, as the pool does).
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    flags = [(hc, "HF_HUB_OFFLINE"), (dc, "HF_HUB_OFFLINE"), (dc, "HF_DATASETS_OFFLINE")]
    saved_flags = [getattr(mod, name) for mod, name in flags]
    for k in OFFLINE_ENV:
        os.environ.setdefault(k, "1")
    hub, data = (os.environ[k].strip().upper() in ("1", "ON", "YES", "TRUE") for k in OFFLINE_ENV)
    for (mod, name), value in zip(flags, (hub, data, data)):
        setattr(mod, name, value)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
        for (mod, name), value in zip(flags, saved_flags):
            setattr(mod, name, value)


class Harness:
    """lm-eval set up once for a set of tasks: the local task files written under scratch (with
    their datasets cache), the TaskManager built (indexing lm-eval's own tasks takes a while, so
    once) and every name checked, before any model is loaded."""

    def __init__(self, tasks: Tasks, scratch: str):
        require()
        self.tasks = tasks
        self.include = tasks.write(os.path.join(scratch, "tasks"), cache=os.path.join(scratch, "datasets"))
        with offline():
            from lm_eval.tasks import TaskManager

            self.manager = TaskManager(include_path=self.include, include_defaults=tasks.builtin)
        known = set(self.manager.all_tasks)
        for name in tasks.names:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                raise CkptError(f"--tasks: unknown lm-eval task {name!r}"
                                + (f" (did you mean {close[0]!r}?)" if close else ""))

    def run(self, hf_dir: str, *, limit: int | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
            device: str = "cpu", dtype: str | None = None) -> dict:
        """lm_eval.simple_evaluate with the HF backend on hf_dir: lm-eval's results dict."""
        model_args = {"pretrained": hf_dir, "trust_remote_code": False, **({"dtype": dtype} if dtype else {})}
        log.info("lm-eval: %s on %s (limit %s)", ",".join(self.tasks.names), hf_dir, limit)
        # lm-eval prints progress ("bootstrapping for stddev") on stdout, where `--json` puts its one object.
        with offline(), contextlib.redirect_stdout(sys.stderr):
            import lm_eval

            try:
                return lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(self.tasks.names),
                                               limit=limit, batch_size=batch_size, device=device,
                                               task_manager=self.manager, log_samples=False)
            except ConnectionError as e:    # datasets in offline mode: a data set that is not cached
                raise CkptError(f"--tasks {','.join(self.tasks.names)}: {e}; lm-eval runs offline: use a task "
                                "with local data files, or allow downloads with HF_DATASETS_OFFLINE=0 "
                                "HF_HUB_OFFLINE=0") from None


def scores(results: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results: numbers only, the default filter's
    `,none` suffix dropped (other filters keep theirs: `exact_match,strict-match`)."""
    out = {}
    for task, row in (results.get("results") or {}).items():
        out[task] = {_metric(k): float(v) for k, v in row.items()
                     if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return out


def details(results: dict, tasks: Tasks, limit: int | None) -> dict:
    """What else a reader needs to trust the scores: versions, task versions, sample counts, shots."""
    return {"versions": versions(), "tasks": list(tasks.names), "limit": limit,
            "task_versions": results.get("versions") or {}, "n_shot": results.get("n-shot") or {},
            "n_samples": {t: (n or {}).get("effective") for t, n in (results.get("n-samples") or {}).items()},
            "higher_is_better": results.get("higher_is_better") or {},
            "task_files": tasks.sources}


def is_stderr(key: str) -> bool:
    """A score key that is a standard error (`acc_stderr`, `exact_match_stderr,strict-match`)."""
    return key.partition(",")[0].endswith("_stderr")


def _metric(key: str) -> str:
    name, _, filt = key.partition(",")
    return name if filt == "none" else key
