"""The package's layering: no two modules import each other (directly or round a loop, at the top or
inside a function), every module imports on its own, and every name has one import path, the module
that defines it: no module swaps itself in `sys.modules`, and no module-level `__getattr__` serves a
name from elsewhere, but the two lazy loaders (densenet/__init__.py, densenet/models/__init__.py), whose
every name maps to the module that defines it."""
from __future__ import annotations

import ast
import importlib.util
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


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports: every import statement, at the top or inside any
    function (a module-level `__getattr__` included), and every `importlib.import_module` of a literal
    name. None is left out."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = _package(name, path)
        edges: set[str] = set()

        def visit(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Call) and _is_import_module(child.func) and child.args \
                        and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str):
                    edges.add(importlib.util.resolve_name(child.args[0].value, package))
                elif isinstance(child, ast.ImportFrom):
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


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module"
            and isinstance(func.value, ast.Name) and func.value.id == "importlib") \
        or (isinstance(func, ast.Name) and func.id == "import_module")


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


def test_the_checker_counts_every_kind_of_import(tmp_path, monkeypatch):
    """An import in a module-level __getattr__ and importlib.import_module of a literal are edges."""
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("import importlib\n\n\ndef __getattr__(name):\n    from . import b\n"
                                      "    return importlib.import_module('.c', __name__)\n")
    (root / "b.py").write_text("def f():\n    import pkg\n")
    (root / "c.py").write_text("")
    monkeypatch.setitem(globals(), "PACKAGE", root)
    graph = import_graph()
    assert graph == {"pkg": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg"}, "pkg.c": set()}
    assert cycles(graph) == [["pkg", "pkg.b"]]


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

    fused = {m for m in graph if m == "densenet.models.fused" or m.startswith("densenet.models.fused.")}
    assert len(fused) > 1  # the package and its modules
    assert not reach("densenet.models.resnet") & ({"densenet.models.densenet"} | fused)
    assert not reach("densenet.models.preact") & ({"densenet.models.densenet"} | fused)
    assert not any("densenet.models.densenet" in reach(m) for m in fused)
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
            "print(sorted(m for m in sys.modules if m == 'densenet.models.densenet' or m.startswith('densenet.models.fused')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def _top_level_names(path: Path) -> set[str]:
    """Names a module defines itself at its top level (def, class, assignment, loop variable, also under
    a top-level if/try/for/with), not those it imports."""
    out = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        if isinstance(node, (ast.If, ast.Try, ast.For, ast.While, ast.With)):
            todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]
    return out


def test_every_name_is_imported_from_the_module_that_defines_it():
    """No module passes on a name it imports (a re-export kept for an old path): in the package, the
    tests, the benchmarks and hubconf.py, `from densenet.X import name` finds `name` defined in X. A
    package's __init__ (densenet.train, densenet.data, ...) is its public face and may gather names."""
    modules = _modules()
    root = PACKAGE.parent.parent
    files = [p for d in (PACKAGE, root / "tests", root / "benchmarks") for p in sorted(d.rglob("*.py"))]
    files += [root / "hubconf.py"] if (root / "hubconf.py").is_file() else []
    defined: dict[str, set[str]] = {}
    wrong = []
    for path in files:
        package = None
        if PACKAGE in path.parents:
            name = next(n for n, p in modules.items() if p == path)
            package = _package(name, path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or (node.level and package is None):
                continue
            module = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                if node.level else node.module
            if module not in modules or modules[module].name == "__init__.py":
                continue
            if module not in defined:
                defined[module] = _top_level_names(modules[module])
            wrong += [f"{path.relative_to(root)}:{node.lineno} imports {a.name} from {module}"
                      for a in node.names if a.name not in defined[module] and f"{module}.{a.name}" not in modules]
    assert not wrong, "import each name from the module that defines it: " + "; ".join(wrong)


def test_no_module_swaps_itself_in_sys_modules():
    """An old import path kept alive as an alias of another module (`sys.modules[__name__] = new`)."""
    offenders = []
    for path in sorted(PACKAGE.parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            written = [t for t in targets if isinstance(t, ast.Subscript)]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("__setitem__", "update", "setdefault"):
                written.append(node.func)
            offenders += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}" for t in written
                          if ast.unparse(t.value) == "sys.modules"]
    assert not offenders, "sys.modules written in " + ", ".join(offenders)


LAZY_LOADERS = {"densenet", "densenet.models"}


def test_no_module_level_getattr_but_the_lazy_loaders():
    """A module-level __getattr__ is how a moved name stays importable from its old place: only the two
    lazy loaders (they keep `densenet --version` fast and model families apart) have one."""
    found = {name for name, path in _modules().items()
             if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "__getattr__"
                    for n in ast.parse(path.read_text()).body)}
    assert found == LAZY_LOADERS, f"module-level __getattr__ outside the lazy loaders: {sorted(found - LAZY_LOADERS)}"


@pytest.mark.parametrize("loader", sorted(LAZY_LOADERS))
def test_the_lazy_loaders_serve_each_name_from_the_module_that_defines_it(loader):
    """Not a redirect of a moved name: each lazy name is defined (not imported) by the module it maps to,
    and each lazy submodule is one."""
    modules = _modules()
    module = importlib.import_module(loader)
    wrong = []
    for name, relative in module._LAZY.items():
        home = importlib.util.resolve_name(relative, loader)
        if home not in modules or name not in _top_level_names(modules[home]):
            wrong.append(f"{name} -> {home}")
    assert not wrong, f"{loader}._LAZY maps names to modules that do not define them: " + ", ".join(wrong)
    assert {f"{loader}.{m}" for m in getattr(module, "_SUBMODULES", ())} <= set(modules)
    for name in module._LAZY:
        assert getattr(module, name) is getattr(importlib.import_module(
            importlib.util.resolve_name(module._LAZY[name], loader)), name)
