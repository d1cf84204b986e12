"""`ckptflow inspect`: a manifest, a run, or the step checkpoints of a run, as a dict or text."""
from __future__ import annotations

from ckptflow import manifest, storage
from ckptflow.errors import CkptError

RUN_DIRS = ("source", "base", "train", "merged", "export", "eval")


def describe(uri: str) -> dict:
    uri = storage.normalize(uri)
    m = manifest.read(uri)
    if m is not None:
        return {"type": "manifest", "uri": uri, "manifest": m.to_dict(),
                "size_bytes": sum(f.get("size", 0) for f in m.files.values())}
    names = storage.listdir(uri)
    if "run.json" in names or any(n in names for n in RUN_DIRS):
        return describe_run(uri, names)
    if any(n.startswith("step-") for n in names):
        return {"type": "steps", "uri": uri, "steps": steps(uri)}
    raise CkptError(f"{uri}: neither a committed ckptflow directory nor a run (found: {', '.join(names[:10]) or 'nothing'})")


def steps(train_uri: str) -> list[dict]:
    out = []
    for name in storage.listdir(train_uri):
        if not name.startswith("step-"):
            continue
        m = manifest.read(storage.join(train_uri, name))
        out.append({"name": name, "uri": storage.join(train_uri, name), "committed": m is not None,
                    "step": m.step if m else None,
                    "size_bytes": sum(f.get("size", 0) for f in m.files.values()) if m else None})
    return out


def describe_run(uri: str, names: list[str]) -> dict:
    run = storage.read_json(storage.join(uri, "run.json")) if "run.json" in names else {}
    stages = {}
    for d in RUN_DIRS:
        if d in names and d != "train":
            m = manifest.read(storage.join(uri, d))
            stages[d] = {"committed": m is not None, "format": m.format if m else None,
                         "lineage": m.lineage if m else None}
    return {"type": "run", "uri": uri, "run": run, "stages": stages,
            "steps": steps(storage.join(uri, "train")) if "train" in names else []}


def as_text(info: dict) -> str:
    if info["type"] == "manifest":
        m = info["manifest"]
        lines = [f"{info['uri']}: {m['kind']} {m['format']} family={m['family']} dtype={m['dtype']} step={m['step']}",
                 f"files: {len(m['files'])}, {_size(info['size_bytes'])}"]
        lin = m.get("lineage") or {}
        if lin:
            lines.append(f"source: {lin.get('source')} @ {lin.get('revision')}")
            if any(k in lin for k in ("run", "step", "dtype")):
                lines.append(f"run: {lin.get('run')} step: {lin.get('step')} dtype: {lin.get('dtype')}")
            for s in lin.get("stages", []):
                lines.append("  <- " + " ".join(f"{k}={v}" for k, v in s.items()))
        return "\n".join(lines)
    lines = [f"{info['uri']}:"]
    for name, s in info.get("stages", {}).items():
        lines.append(f"  {name}: {'committed' if s['committed'] else 'uncommitted'} {s['format'] or ''}")
    for s in info.get("steps", []):
        lines.append(f"  {s['name']}: {'committed' if s['committed'] else 'uncommitted'} {_size(s['size_bytes'])}")
    return "\n".join(lines)


def _size(n: int | None) -> str:
    from ckptflow.report import format_bytes

    return "" if n is None else f"{format_bytes(n)} ({n} bytes)"
