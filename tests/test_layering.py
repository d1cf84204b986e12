"""The layering of docs/design.md, enforced from the code: every module is parsed (ast) and every
import counts, those inside functions too. The analysis is scripts/layering_report.py, which
prints the same facts for any checkout: `python scripts/layering_report.py [ROOT]`."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("layering_report", ROOT / "scripts" / "layering_report.py")
L = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(L)


@pytest.fixture(scope="module")
def graph():
    return L.graph(ROOT)


def test_every_project_import_is_in_this_tree():
    """A module moved or renamed here must not be found in an older installed copy instead."""
    assert L.unresolved(ROOT) == []


def test_no_import_cycle_among_the_packages(graph):
    edges, _ = graph
    assert L.cycles(edges) == [], "modules that import each other, also through others"


@pytest.mark.parametrize("rule", [r[0] for r in L.FORBIDDEN])
def test_no_import_against_the_layers(graph, rule):
    _, every = graph
    bad = [f"{src} imports {dst} (line {line})" for r, src, dst, line in L.forbidden(every) if r == rule]
    assert bad == [], f"{rule}: " + "; ".join(bad)


def test_formats_dispatch_through_one_registry():
    """No hand-kept name -> function tables beside formats.registry.FORMATS (READERS, WRITERS...)."""
    assert [(m, n) for m, n, _ in L.registries(ROOT)] == [("ckptflow.formats.registry", "FORMATS")]


def test_no_helper_defined_twice():
    watched = {name: mods for name, mods in L.duplicates(ROOT).items() if name in L.WATCHED}
    assert watched == {}


def test_the_analysis_sees_lazy_imports_cycles_and_layers(tmp_path):
    """The checker itself: an import inside a function is an edge, a cycle through three modules
    is found, `from pkg import sibling` inside pkg does not need pkg's __init__, and a format that
    imports a stage is reported."""
    files = {
        "ckptflow/__init__.py": "",
        "ckptflow/a.py": "def f():\n    from ckptflow import b\n",
        "ckptflow/b.py": "import ckptflow.c\n",
        "ckptflow/c.py": "from ckptflow.a import f\n",
        "ckptflow/formats/__init__.py": "from ckptflow.formats import x\n",
        "ckptflow/formats/x.py": "from ckptflow.formats import y\n",
        "ckptflow/formats/y.py": "def g():\n    from ckptflow.stages import z\n",
        "ckptflow/stages/__init__.py": "",
        "ckptflow/stages/z.py": "",
        "tasks/__init__.py": "",
        "flows/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges, every = L.graph(tmp_path)
    assert L.cycles(edges) == [["ckptflow.a", "ckptflow.b", "ckptflow.c"]]
    assert [(r, s, d) for r, s, d, _ in L.forbidden(every)] == [
        ("formats -> stages", "ckptflow.formats.y", "ckptflow.stages")]
    strict, _ = L.graph(tmp_path, strict=True)
    assert ["ckptflow.formats", "ckptflow.formats.x"] in L.cycles(strict)
