"""The package's import graph, read from the source: no circles (imports inside functions
count too: they only hide a circle), and the engine imports nothing above it."""
from __future__ import annotations

import ast
from pathlib import Path

import nbcheckpoint

ROOT = Path(nbcheckpoint.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = ("nbcheckpoint",) + f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, modules) -> set[str]:
    """The package's modules that module NAME imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else base if node.level \
                else node.module
            # `from X import y`: the module X.y when y is one, else X itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}                 # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None
    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_engine_imports_nothing_above_it():
    above = ("nbcheckpoint.kernel", "nbcheckpoint.jupyter")
    bad = sorted((n, m) for n, deps in graph().items() if n.startswith("nbcheckpoint.engine")
                 for m in deps if m == "nbcheckpoint" or m.startswith(above))
    assert not bad, bad


JUPYTER = ("jupyter_client", "jupyter_server", "jupyter_core", "ipykernel", "IPython", "zmq", "tornado",
           "traitlets", "ipywidgets", "nbclient", "nbformat")


def test_engine_imports_no_jupyter_package():
    bad = []
    for name, path in _modules().items():
        if not name.startswith("nbcheckpoint.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [(name, m) for m in mods if m and m.split(".")[0] in JUPYTER]
    assert not bad, bad


def test_the_graph_sees_hidden_imports():
    g = graph()
    assert "nbcheckpoint.kernel.core" in g["nbcheckpoint.kernel.magics"]
    assert "nbcheckpoint.kernel.browser" in g["nbcheckpoint.kernel.magics"]   # inside a function
    assert "nbcheckpoint.engine.errors" in g["nbcheckpoint.store"]
