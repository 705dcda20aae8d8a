"""The package's layering: no two modules import each other (directly or round a loop, at the top or
inside a function), every module imports on its own, and the names that moved keep working from
their old import paths."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import densenet

PACKAGE = Path(densenet.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside functions. An import inside a
    module-level `__getattr__` (the lazy re-export of a name that moved) is not an edge."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges: set[str] = set()

        def visit(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef) and child.name == "__getattr__":
                    continue
                if isinstance(child, ast.ImportFrom):
                    base = package.split(".")[:len(package.split(".")) - child.level + 1] if child.level else []
                    module = ".".join(base + ([child.module] if child.module else []))
                    for alias in child.names:  # `from . import x` imports the submodule x
                        target = f"{module}.{alias.name}"
                        edges.add(target if target in modules else module)
                elif isinstance(child, ast.Import):
                    edges.update(a.name for a in child.names)
                visit(child)

        visit(ast.parse(path.read_text()))
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "densenet.models.common" in graph["densenet.models.densenet"]  # it does see the imports
    assert "densenet.registry" in graph["densenet.saved_model"]  # ... inside functions too


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_model_families_do_not_depend_on_each_other():
    """A ResNet needs neither DenseNet nor the fused dense block; the fused block needs no DenseNet."""
    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for m in graph[todo.pop()] - seen:
                seen.add(m)
                todo.append(m)
        return seen

    assert not reach("densenet.models.resnet") & {"densenet.models.densenet", "densenet.models._fused"}
    assert not reach("densenet.models.preact") & {"densenet.models.densenet", "densenet.models._fused"}
    assert "densenet.models.densenet" not in reach("densenet.models._fused")
    assert "densenet.registry" not in reach("densenet.weights")


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imported first, with none of the package loaded before it (torch stays loaded: one
    interpreter for all, so the test stays fast): an order-dependent import fails here."""
    code = ("import importlib, sys\n"
            "import torch\n"
            "failed = []\n"
            "for name in sys.argv[1:]:\n"
            "    for m in [m for m in sys.modules if m == 'densenet' or m.startswith('densenet.')]:\n"
            "        del sys.modules[m]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as e:\n"
            "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(failed))\n")
    names = [n for n in _modules() if n not in ("densenet.__main__",)]
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_a_resnet_loads_no_densenet_code():
    code = ("import sys, densenet.models.resnet, densenet.models.preact\n"
            "print(sorted(m for m in sys.modules if m in ('densenet.models.densenet', 'densenet.models._fused')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# (old module, name, new module): names that moved, importable from their old place for one release
MOVED = [
    ("densenet.models.residual", "ResNet", "densenet.models.resnet"),
    ("densenet.models.residual", "ResNetConfig", "densenet.models.resnet"),
    ("densenet.models.residual", "blocks_per_stage", "densenet.models.resnet"),
    ("densenet.models.densenet", "init_weights", "densenet.models.common"),
    ("densenet.models.densenet", "dropout", "densenet.models.common"),
    ("densenet.registry", "densenet_cifar", "densenet.models.densenet"),
    ("densenet.registry", "densenet_imagenet", "densenet.models.densenet"),
    ("densenet.weights", "load_model", "densenet.saved_model"),
    ("densenet.weights", "save_model", "densenet.saved_model"),
    ("densenet.weights", "check_info", "densenet.saved_model"),
    ("densenet.train.checkpoint", "model_metadata", "densenet.saved_model"),
    ("densenet.pretrained", "pretrained_cfg", "densenet.registry"),
    ("densenet.hub", "load_from_hub", "densenet.hub_files"),
    ("densenet.analysis.reproduce", "GRIDS", "densenet.grid.reproduce"),
    ("densenet.analysis.reproduce", "cell_config", "densenet.grid.reproduce"),
    ("densenet.analysis.launchers", "run_cell", "densenet.grid.launchers"),
    ("densenet.analysis.launchers", "_read_json", "densenet.grid.launchers"),
    ("densenet.analysis.gridstatus", "cell_state", "densenet.grid.status"),
]


@pytest.mark.parametrize("old, name, new", MOVED)
def test_moved_names_keep_their_old_import_path(old, name, new):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


def test_an_old_module_path_is_the_new_module():
    """Patching a moved module through its old path patches the module the code uses."""
    import densenet.analysis.launchers as old
    import densenet.grid.launchers as new

    assert old is new and importlib.import_module("densenet.models.residual") is importlib.import_module(
        "densenet.models.resnet")
