"""The test suite's own rules: test modules share helpers through conftest.py (fixtures) and helpers.py
(plain functions), never by importing one another, so a test module can be changed or deleted alone."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another():
    offenders = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not offenders, "move what is shared to helpers.py or a conftest.py fixture: " + "; ".join(offenders)
