"""docs/adding-a-family.md runs as written: its family module registers and converts, its checks
pass on a transformers-made checkpoint, and its key-lookup examples print what the doc says."""
import doctest
import re
import types
from pathlib import Path

import pytest

from ckptflow import families

transformers = pytest.importorskip("transformers")

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding-a-family.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def doc_family() -> types.ModuleType:
    module = types.ModuleType("doc_family")
    exec(compile(blocks()[0], str(DOC), "exec"), module.__dict__)
    return module


@pytest.fixture
def registered():
    module = doc_family()
    families.register(module)
    yield module
    families.FAMILIES.pop(module.NAME)


def hf_checkpoint(family, model_type: str, prefix: str):
    """A tiny transformers model of `family`, renamed as the doc's family names its keys."""
    from tests import hfmodels

    model = hfmodels.model(family)
    config = {**model.config.to_dict(), "model_type": model_type}
    sd = {}
    for key, value in model.state_dict().items():
        sd[prefix + key.removeprefix("model.") if key.startswith("model.") else key] = value
    return config, sd


def test_the_docs_family_module_registers_and_its_check_block_passes(registered):
    config, hf_sd = hf_checkpoint("llama", registered.MODEL_TYPES[0], "")
    namespace = {"config": config, "hf_sd": hf_sd}
    exec(compile(blocks()[1], str(DOC), "exec"), namespace)
    assert namespace["family"] is registered
    assert namespace["model"].args.dim == config["hidden_size"]


def test_the_key_lookup_examples_print_what_the_doc_says():
    text = blocks()[-1]
    test = doctest.DocTestParser().get_doctest(text, {}, "adding-a-family.md", str(DOC), 0)
    assert test.examples, "the key lookup section has no >>> examples"
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test)
    assert result.failed == 0


def test_no_family_module_imports_the_package_root():
    """families/__init__ imports the family modules; a family importing it back is a cycle."""
    import ast

    root = Path(families.__file__).parent
    for path in sorted(root.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("ckptflow.families", "ckptflow"):
                names = [a.name for a in node.names]
                assert node.module != "ckptflow" or "families" not in names, f"{path.name} imports the package root"
                assert node.module != "ckptflow.families", f"{path.name}: from ckptflow.families import {names}"
            if isinstance(node, ast.Import):
                assert all(a.name != "ckptflow.families" for a in node.names), path.name
