"""docs/adding-a-family.md runs as written: its family module registers and converts, its checks
pass on a transformers-made checkpoint, and its key-lookup examples print what the doc says."""
import doctest
import re
import types
from pathlib import Path

import transformers  # noqa: F401 - the doc's checks use it: missing means failing, never skipping

from ckptflow import families

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding-a-family.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def doc_family() -> types.ModuleType:
    module = types.ModuleType("doc_family")
    exec(compile(blocks()[0], str(DOC), "exec"), module.__dict__)
    return module


def test_the_docs_family_module_is_the_real_one():
    """The walk-through shows ckptflow/families/qwen3.py as it is, and it behaves as the registered one."""
    from ckptflow.families import qwen3

    assert blocks()[0] == Path(qwen3.__file__).read_text()
    doc = doc_family()
    for name in ("NAME", "MODEL_TYPES", "ROPE_INTERLEAVED", "HF_TO_TUNE", "PEFT_TARGETS", "SEED_ARGS"):
        assert getattr(doc, name) == getattr(qwen3, name), name
    from tests.test_families import QWEN3_06B_V4

    assert doc.args_from_hf(QWEN3_06B_V4) == qwen3.args_from_hf(QWEN3_06B_V4)
    assert doc.hf_config(doc.args_from_hf(QWEN3_06B_V4), like=QWEN3_06B_V4) == QWEN3_06B_V4


def test_the_check_block_passes_on_a_transformers_qwen3():
    from tests import hfmodels

    model = hfmodels.model("qwen3", tie_word_embeddings=True)
    config, hf_sd = model.config.to_dict(), model.state_dict()
    namespace = {"config": config, "hf_sd": hf_sd}
    exec(compile(blocks()[1], str(DOC), "exec"), namespace)
    assert namespace["model"].args.qk_norm == "head"


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
