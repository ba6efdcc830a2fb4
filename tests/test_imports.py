"""No import cycle inside src/dpe_ingest.

Every ``import`` statement of every module counts, wherever it is: at module level, inside a
function (a "lazy" import still ties the two modules together: one cannot be understood, tested or
moved without the other), under ``if TYPE_CHECKING:``.  The imports are read with ``ast``, nothing is
executed.  ``from pkg import name`` depends on the module ``pkg.name`` when there is one (Python
then imports that submodule, whatever state ``pkg/__init__.py`` is in), else on ``pkg`` (whose
``__init__`` must have bound ``name``); ``import a.b`` depends on ``a.b``.  A package being initialised
before its submodules is not counted: it is how every package works, not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "dpe_ingest"


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package_dir`` (packages by ``__init__``)."""
    base = package_dir.name
    out: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([base, *parts])] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import …`` written in ``module``."""
    if level == 0:
        return target or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]  # a module's relative imports start from its package
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import statement of ``module``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):  # every statement, however deeply nested
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return [(name, line) for name, line in found if name in known and name != module]


def import_graph(package_dir: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line importing it}, inside the package only."""
    modules = module_names(package_dir)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, set(modules)):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def describe(graph: dict[str, dict[str, int]], comp: list[str], package_dir: Path) -> str:
    files = module_names(package_dir)
    lines = [f"import cycle between {', '.join(comp)}:"]
    for a in comp:
        for b, line in sorted(graph[a].items()):
            if b in comp:
                lines.append(f"  {a} imports {b} ({files[a].relative_to(package_dir.parent)}:{line})")
    return "\n".join(lines)


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE_DIR)
    assert len(graph) > 20 and "dpe_ingest.status" in graph, sorted(graph)
    found = cycles(graph)
    assert not found, "\n".join(describe(graph, c, PACKAGE_DIR) for c in found)


def test_status_layers_import_downwards_only():
    graph = import_graph(PACKAGE_DIR)
    assert "dpe_ingest.status_sources" in graph["dpe_ingest.status"]
    assert "dpe_ingest.status_model" in graph["dpe_ingest.status"]
    assert "dpe_ingest.status_model" in graph["dpe_ingest.status_sources"]
    assert "dpe_ingest.status" not in graph["dpe_ingest.status_sources"]
    model_imports = set(graph["dpe_ingest.status_model"])
    assert not model_imports & {"dpe_ingest.status", "dpe_ingest.status_sources"}, model_imports


# --------------------------------------------------------------------------------------------
# the detector itself, on small packages written for the purpose
# --------------------------------------------------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    pkg = _package(tmp_path, {
        "a.py": "from .b import helper\n",
        "b.py": "def helper():\n    from .a import thing  # lazy, still a cycle\n    return thing\n",
        "c.py": "from . import a\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.a": 2}
    found = cycles(graph)
    assert found == [["pkg.a", "pkg.b"]]
    text = describe(graph, found[0], pkg)
    assert "pkg.b imports pkg.a (pkg/b.py:2)" in text and "pkg.a imports pkg.b (pkg/a.py:1)" in text


def test_absolute_nested_and_type_checking_imports_count(tmp_path):
    pkg = _package(tmp_path, {
        "sub/__init__.py": "from .leaf import X\n",
        "sub/leaf.py": "import pkg.top\nX = 1\n",
        # a name bound by sub/__init__.py, not a module: depends on the package pkg.sub
        "top.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import X\n",
        "other.py": "import os\nimport json\nfrom pkg import top\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.sub.leaf"] == {"pkg.top": 1}
    assert graph["pkg.top"] == {"pkg.sub": 3}
    assert graph["pkg.other"] == {"pkg.top": 3}, "stdlib imports are not edges"
    assert cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.top"]]


def test_a_layered_package_has_no_cycle(tmp_path):
    pkg = _package(tmp_path, {
        "model.py": "import dataclasses\n",
        "sources.py": "from .model import Status\n",
        "render.py": "from .sources import Collector\ndef main():\n    from . import model\n",
        # a package whose __init__ re-exports a submodule that imports a sibling through the package
        "sub/__init__.py": "from .server import Server\n",
        "sub/server.py": "from . import query\nfrom .query import parse\n",
        "sub/query.py": "def parse():\n    pass\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.render"] == {"pkg.sources": 1, "pkg.model": 3}
    assert graph["pkg.sub.server"] == {"pkg.sub.query": 1}
    assert cycles(graph) == []
