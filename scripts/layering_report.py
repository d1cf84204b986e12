"""Measure ckptflow's layering from the code: import cycles, forbidden imports, registries,
duplicated helpers, module and function sizes.

    python scripts/layering_report.py [ROOT]      # ROOT: a checkout (default: this repository)

Every `import` counts, also those inside functions (a lazy import is still a dependency).
tests/test_layering.py asserts on the same analysis.
"""
from __future__ import annotations

import ast
import functools
import statistics
import sys
from pathlib import Path

PACKAGES = ("ckptflow", "tasks", "flows")

# (rule, importer prefixes, imported prefixes): a module under an importer prefix must not import
# a module under an imported prefix. A prefix matches the module itself and everything below it.
# The command line (ckptflow.cli) is the entry point above every layer: `ckptflow run` and
# `ckptflow serve` start the Prefect flows, so it is not "library" for the prefect/tasks/flows rule.
FORBIDDEN = [
    ("formats -> stages", ("ckptflow.formats",), ("ckptflow.stages",)),
    ("model/lora -> formats", ("ckptflow.model", "ckptflow.model_args", "ckptflow.lora"), ("ckptflow.formats",)),
    ("families -> formats/storage", ("ckptflow.families",), ("ckptflow.formats", "ckptflow.storage")),
    ("storage/manifest/commit -> formats", ("ckptflow.storage", "ckptflow.manifest", "ckptflow.commit"),
     ("ckptflow.formats",)),
    ("train/checkpointer -> stages", ("ckptflow.train", "ckptflow.trainer", "ckptflow.checkpointer"),
     ("ckptflow.stages",)),
    ("library -> prefect/tasks/flows", ("ckptflow",), ("prefect", "tasks", "flows")),
    ("tasks -> flows", ("tasks",), ("flows",)),
]

# Packages whose modules implement one interface: the same function name in two of them is the
# interface, not a duplicate (every stage has run(), every format open_view()...).
INTERFACES = ("ckptflow.formats", "ckptflow.stages", "ckptflow.families", "tasks", "flows")


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the project's packages."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


@functools.lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imports(name: str, path: Path, tree: ast.Module, known: set[str], strict: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement anywhere in the module, relative ones
    resolved. Importing module M runs M and the __init__ of every package above M: each of those is
    an edge, except a package above the importer itself (it is initialised before any of its
    modules runs, so `from ckptflow import storage` inside ckptflow needs nothing from ckptflow's
    __init__). `from P import NAME`, NAME not a module, takes NAME from P's __init__: an edge to P.
    strict=True counts as the issue first did: `from P import x` is an edge to P and, x a module,
    to P.x; `import M` an edge to M."""
    is_pkg = path.name == "__init__.py"
    mine = name if is_pkg else name.rpartition(".")[0]

    def runs(mod: str) -> list[str]:
        parts = mod.split(".")
        above = [".".join(parts[:i]) for i in range(1, len(parts))]
        return [p for p in above if not (mine == p or mine.startswith(p + "."))] + [mod]

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(m, node.lineno) for a in node.names for m in ([a.name] if strict else runs(a.name))]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = mine.split(".")
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            if strict:
                targets = [base] + subs
            else:
                from_init = len(subs) < len(node.names)     # some NAME comes from base's __init__
                targets = (runs(base) if from_init else []) + [m for sub in subs for m in runs(sub)]
            out += [(m, node.lineno) for m in dict.fromkeys(targets)]
    return out


def graph(root: Path, strict: bool = False) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int]]]]:
    """Edges among project modules, and every import (project or not) per module."""
    mods = modules(root)
    known = set(mods)
    every = {name: imports(name, path, parse(path), known, strict) for name, path in mods.items()}
    edges = {name: {m for m, _ in imps if m in known and m != name} for name, imps in every.items()}
    return edges, every


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        work = [(v, iter(sorted(edges.get(v, ()))))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif nxt not in index:
                index[nxt] = low[nxt] = len(index)
                stack.append(nxt)
                on.add(nxt)
                work.append((nxt, iter(sorted(edges.get(nxt, ())))))
            elif nxt in on:
                low[node] = min(low[node], index[nxt])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def _top_names(tree: ast.Module) -> set[str] | None:
    """Names a module defines at top level; None when a module __getattr__ makes any name possible
    (then the string constants it compares with are taken as its names)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if node.name == "__getattr__":
                names |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def unresolved(root: Path) -> list[tuple[str, str, int]]:
    """(importer, what, line) for every import of a project module or name that this tree does not
    have: a module that was moved or renamed, found only because an older copy is installed."""
    mods = modules(root)
    known = set(mods)
    importers = dict(mods)
    for extra in ("tests", "bench", "scripts"):     # they import the packages too
        for path in sorted((root / extra).rglob("*.py")) if (root / extra).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            importers[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    out = []
    for name, path in importers.items():
        mine = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Import):
                out += [(name, a.name, node.lineno) for a in node.names
                        if a.name.split(".")[0] in PACKAGES and a.name not in known]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mine.split(".")
                    base = ".".join(here[: len(here) - (node.level - 1)] + ([base] if base else []))
                if base.split(".")[0] not in PACKAGES:
                    continue
                if base not in known:
                    out.append((name, base, node.lineno))
                    continue
                defined = _top_names(parse(mods[base]))
                out += [(name, f"{base}.{a.name}", node.lineno) for a in node.names
                        if f"{base}.{a.name}" not in known and a.name != "*" and a.name not in defined]
    return sorted(out)


def forbidden(every: dict[str, list[tuple[str, int]]]) -> list[tuple[str, str, str, int]]:
    """(rule, importer, imported, line) for every import against FORBIDDEN."""
    out = []
    for rule, srcs, dsts in FORBIDDEN:
        for mod, imps in sorted(every.items()):
            if not any(under(mod, s) for s in srcs) or (rule.startswith("library") and mod == "ckptflow.cli"):
                continue
            for target, line in imps:
                if any(under(target, d) for d in dsts) and not any(o[1:4:2] == (mod, line) and o[0] == rule for o in out):
                    out.append((rule, mod, target, line))
    return out


def registries(root: Path) -> list[tuple[str, str, int]]:
    """(module, NAME, entries) of module-level UPPERCASE tables that dispatch on a name: a dict
    literal whose values are all functions or modules (kept by hand beside the code it names), or
    a dict built from a literal list of record constructors (FORMATS = {f.name: f for f in (...)})."""
    out = []
    for mod, path in modules(root).items():
        tree = parse(path)
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        imported = {a.asname or a.name.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            value = getattr(node, "value", None)
            if not (isinstance(target, ast.Name) and target.id.isupper()):
                continue
            if isinstance(value, ast.Dict):
                vals = value.values
                if len(vals) >= 2 and all(isinstance(v, ast.Name) and v.id in defined | imported for v in vals):
                    out.append((mod, target.id, len(vals)))
            elif isinstance(value, ast.DictComp):
                it = value.generators[0].iter
                if isinstance(it, (ast.Tuple, ast.List)) and len(it.elts) >= 2 and \
                        all(isinstance(e, ast.Call) for e in it.elts):
                    out.append((mod, target.id, len(it.elts)))
    return sorted(out)


def functions(root: Path) -> list[tuple[str, str, int]]:
    """(module, qualified name, lines) of every function and method."""
    out = []
    for mod, path in modules(root).items():
        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.append((mod, prefix + child.name, child.end_lineno - child.lineno + 1))
                    walk(child, prefix + child.name + ".")
                elif isinstance(child, ast.ClassDef):
                    walk(child, prefix + child.name + ".")
        walk(parse(path), "")
    return out


def shims(root: Path) -> list[tuple[str, str]]:
    """(module, function) whose body is only `from M import X` and `return X.f(...)`: dispatch by hand."""
    out = []
    for mod, path in modules(root).items():
        for node in parse(path).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            if (len(body) == 2 and isinstance(body[0], ast.ImportFrom) and isinstance(body[1], ast.Return)
                    and isinstance(body[1].value, ast.Call)):
                out.append((mod, node.name))
    return out


# Helpers the issue found defined twice (one name, two meanings or two copies).
WATCHED = ("pick_device", "read_metrics", "run_of", "_first_line", "step_name")


def _body(node) -> str:
    body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    return ast.unparse(ast.Module(body=body, type_ignores=[]))


def duplicates(root: Path) -> dict[str, list[str]]:
    """Helpers defined more than once: a WATCHED name in two modules, a top-level function whose
    body is a copy (90% the same text, at least 80 characters) of one in another module, or the
    step-directory name (f"step-{n:06d}") built outside its one place (checkpointer.step_name)."""
    import difflib

    defs = []
    steps = []
    for mod, path in modules(root).items():
        tree = parse(path)
        defs += [(mod, n.name, _body(n)) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and "step-" in ast.unparse(node) and ":06d" in ast.unparse(node):
                steps.append(mod)
    out: dict[str, list[str]] = {}
    for name in WATCHED:
        mods = sorted(m for m, n, _ in defs if n == name)
        if len(mods) > 1:
            out[name] = mods
    defs = sorted((d for d in defs if len(d[2]) >= 80), key=lambda d: len(d[2]))
    for i, (m1, n1, b1) in enumerate(defs):
        for m2, n2, b2 in defs[i + 1:]:
            if len(b2) > 1.1 * len(b1):
                break
            sm = difflib.SequenceMatcher(None, b1, b2)
            if m1 != m2 and sm.real_quick_ratio() >= 0.9 and sm.quick_ratio() >= 0.9 and sm.ratio() >= 0.9:
                key = n1 if n1 == n2 else "/".join(sorted((n1, n2)))
                out[key] = sorted(set(out.get(key, [])) | {m1, m2})
    if len(steps) > 1:
        out['f"step-{n:06d}"'] = sorted(steps)
    return dict(sorted(out.items()))


def sizes(root: Path) -> dict:
    mods = {mod: len(path.read_text().splitlines()) for mod, path in modules(root).items()}
    fns = functions(root)
    big_mod = max(mods, key=mods.get)
    big_fn = max(fns, key=lambda f: f[2])
    return {"modules": len(mods), "median_module_lines": statistics.median(mods.values()),
            "largest_module": (big_mod, mods[big_mod]), "functions": len(fns),
            "median_function_lines": statistics.median(f[2] for f in fns),
            "largest_function": (f"{big_fn[0]}.{big_fn[1]}", big_fn[2])}


def report(root: Path) -> str:
    edges, every = graph(root)
    cyc, bad, regs, dup, shim, sz = (cycles(edges), forbidden(every), registries(root), duplicates(root),
                                     shims(root), sizes(root))
    lines = [f"layering of {root}", f"cycles: {len(cyc)}"]
    lines += [f"  ({len(c)}) " + " ".join(c) for c in cyc]
    strict = cycles(graph(root, strict=True)[0])
    lines.append(f"cycles, strict count (`from P import submodule` as importing P's __init__ too): {len(strict)}")
    lines += [f"  ({len(c)}) " + " ".join(c) for c in strict]
    missing = unresolved(root)
    lines.append(f"imports of project modules or names this tree does not have: {len(missing)}")
    lines += [f"  {src}: {what} (line {line})" for src, what, line in missing]
    lines.append(f"forbidden imports: {len(bad)}")
    lines += [f"  {rule}: {src} -> {dst} (line {line})" for rule, src, dst, line in bad]
    lines.append(f"registries (UPPERCASE name -> function/module/record tables): {len(regs)}")
    lines += [f"  {mod}.{name} ({n} entries)" for mod, name, n in regs]
    lines.append(f"one-line dispatch shims (a local import and a call, nothing else): {len(shim)}")
    lines += [f"  {mod}.{name}" for mod, name in shim]
    lines.append(f"duplicated helpers: {len(dup)}")
    lines += [f"  {name}: {', '.join(mods)}" for name, mods in dup.items()]
    lines.append(f"modules: {sz['modules']}, median {sz['median_module_lines']} lines, "
                 f"largest {sz['largest_module'][0]} ({sz['largest_module'][1]} lines)")
    lines.append(f"functions: {sz['functions']}, median {sz['median_function_lines']} lines, "
                 f"largest {sz['largest_function'][0]} ({sz['largest_function'][1]} lines)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)))
