"""The direction of imports, as a rule: no import cycle in any tree of the repository, and the
product never imports its harness.

The rules are the two tables below, ``TREES`` (what is checked for cycles, and how its modules are
named) and ``RESTRICTIONS`` (who may not import what), in the spirit of Kubernetes'
``.import-restrictions`` files: change a table, not the code, to change a rule.

Every ``import`` statement of every module counts, wherever it is: at module level, inside a
function (a "lazy" import still ties the two modules together: one cannot be understood, tested or
moved without the other), under ``if TYPE_CHECKING:``.  The imports are read with ``ast``, nothing is
executed; a module name in a string (``dpe_ingest.cli`` names ``dpe_devkit.testbed.cli`` and loads it
with importlib only when asked, saying how to install it when it is missing) is not an import.
``from pkg import name`` depends on the module ``pkg.name`` when there is one (Python then imports
that submodule, whatever state ``pkg/__init__.py`` is in), else on ``pkg`` (whose ``__init__`` must
have bound ``name``); ``import a.b`` depends on ``a.b``.  A package being initialised before its
submodules is not counted: it is how every package works, not a cycle.  Script directories (bench/,
tests/) import their siblings by plain name (``from pg import db_count``): there a module's name is
its file's stem.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "dpe_ingest"

PACKAGE, SCRIPTS = "package", "scripts"

#: every tree checked for import cycles: directory (relative to the repository) -> how its modules are
#: named (PACKAGE: dotted names from the directory's own name, recursively; SCRIPTS: the files of that
#: one directory by stem, as they import each other through sys.path)
TREES: dict[str, str] = {
    "src/dpe_ingest": PACKAGE,            # the product (the images install it)
    "devkit/src/dpe_devkit": PACKAGE,     # the harness: testbed, test cluster, local run
    "bench": SCRIPTS,                     # benchmarks: one harness module, one file per section
    "tests": SCRIPTS,
    "tests/chart": SCRIPTS,
    "tests/cluster": SCRIPTS,
}


class Restriction(NamedTuple):
    modules: str               # every module whose dotted name is this or starts with it + "."
    forbidden: tuple[str, ...]  # may not import these (nor their submodules)
    why: str


#: who may not import what (checked on the trees above)
RESTRICTIONS: tuple[Restriction, ...] = (
    Restriction("dpe_ingest", ("dpe_devkit",),
                "the product never imports its harness: the images do not carry it; dpe-ingest run/testbed "
                "load it by name (dpe_ingest.cli)"),
    Restriction("dpe_ingest", ("pytest", "hypothesis", "_pytest"),
                "test libraries are not dependencies of the product"),
)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_names(package_dir: Path, kind: str = PACKAGE) -> dict[str, Path]:
    """Module name -> file: for a package every ``.py`` under ``package_dir`` by dotted name (packages
    by ``__init__``); for a script directory the ``.py`` files of that directory by stem."""
    if kind == SCRIPTS:
        return {path.stem: path for path in sorted(package_dir.glob("*.py"))}
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


def all_imports(module: str, path: Path, known: set[str] = frozenset()) -> list[tuple[str, int]]:
    """(absolute name of the imported module, line) for every import statement of ``module``, inside
    the tree or not (``from pkg import name``: ``pkg.name`` when it is a module of ``known``)."""
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
    return found


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module of the tree, line) for every import statement of ``module``."""
    return [(name, line) for name, line in all_imports(module, path, known) if name in known and name != module]


def import_graph(package_dir: Path, kind: str = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line importing it}, inside the tree only."""
    modules = module_names(package_dir, kind)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, set(modules)):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def violations(trees: dict[Path, str], restrictions: tuple[Restriction, ...] = RESTRICTIONS) -> list[str]:
    """Every import that a restriction forbids, as ``file:line: module imports name (why)``."""
    out = []
    for directory, kind in trees.items():
        modules = module_names(directory, kind)
        for module, path in modules.items():
            rules = [r for r in restrictions if _under(module, r.modules)]
            if not rules:
                continue
            for name, line in all_imports(module, path, set(modules)):
                for rule in rules:
                    hit = next((f for f in rule.forbidden if _under(name, f)), None)
                    if hit:
                        out.append(f"{path.relative_to(directory.parent)}:{line}: {module} imports {name} "
                                   f"({rule.why})")
    return out


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


def describe(graph: dict[str, dict[str, int]], comp: list[str], package_dir: Path, kind: str = PACKAGE) -> str:
    files = module_names(package_dir, kind)
    lines = [f"import cycle between {', '.join(comp)}:"]
    for a in comp:
        for b, line in sorted(graph[a].items()):
            if b in comp:
                lines.append(f"  {a} imports {b} ({files[a].relative_to(package_dir.parent)}:{line})")
    return "\n".join(lines)


#: a few modules each tree must have: a moved or misspelt directory fails here instead of checking nothing
EXPECTED = {
    "src/dpe_ingest": {"dpe_ingest.status", "dpe_ingest.cli", "dpe_ingest.standin.server"},
    "devkit/src/dpe_devkit": {"dpe_devkit.testbed.cluster", "dpe_devkit.testbed.cli", "dpe_devkit.local_run"},
    "bench": {"run", "baselines"},
    "tests": {"conftest", "reconcile", "test_imports"},
    "tests/chart": {"chartlib", "conftest"},
    "tests/cluster": {"conftest", "test_pipeline_on_cluster"},
}


@pytest.mark.parametrize("tree", sorted(TREES))
def test_no_import_cycle_in_any_tree(tree):
    directory, kind = ROOT / tree, TREES[tree]
    graph = import_graph(directory, kind)
    assert EXPECTED[tree] <= set(graph), f"{tree}: {sorted(graph)}"
    found = cycles(graph)
    assert not found, "\n".join(describe(graph, c, directory, kind) for c in found)


def test_every_tree_is_checked():
    """Every directory of Python code of the repository is in TREES (a new one must be added)."""
    dirs = set()
    for here, subdirs, files in os.walk(ROOT):  # not into .git, .venv, .cache (the docker store) …
        subdirs[:] = [d for d in subdirs
                      if not (d.startswith(".") or d in ("__pycache__", "build") or d.endswith(".egg-info"))]
        if any(f.endswith(".py") for f in files):
            dirs.add(Path(here).relative_to(ROOT).as_posix())
    covered = {d for d in dirs if any(d == t or (TREES[t] == PACKAGE and d.startswith(t + "/")) for t in TREES)}
    assert dirs - covered == set(), sorted(dirs - covered)


def test_the_product_does_not_import_its_harness():
    """RESTRICTIONS on the real trees; and dpe_ingest.cli still names the harness only as strings."""
    assert violations({ROOT / t: k for t, k in TREES.items()}) == []
    cli = PACKAGE_DIR / "cli.py"
    assert "dpe_devkit.testbed.cli" in cli.read_text()
    assert not [n for n, _ in all_imports("dpe_ingest.cli", cli) if _under(n, "dpe_devkit")]


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


# the rules themselves: a planted forbidden import and a planted cycle in copies of the real trees
def test_a_forbidden_import_planted_in_a_copy_of_the_product_is_reported(tmp_path):
    copy = tmp_path / "dpe_ingest"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations({copy: PACKAGE}) == []  # the copy is as clean as the original
    status = copy / "status.py"
    text = status.read_text()
    line = text[:text.index("\ndef ")].count("\n") + 2  # a function-level import, as lazy as it gets
    lines = text.splitlines()
    lines.insert(line, "    from dpe_devkit.testbed import LocalServers  # planted")
    status.write_text("\n".join(lines) + "\n")
    (copy / "planted_string.py").write_text('import importlib\nimportlib.import_module("dpe_devkit.local_run")\n')
    (copy / "standin" / "planted.py").write_text("import dpe_devkit\nfrom .. import status\n")
    found = violations({copy: PACKAGE})
    assert found == [
        f"dpe_ingest/standin/planted.py:1: dpe_ingest.standin.planted imports dpe_devkit ({RESTRICTIONS[0].why})",
        f"dpe_ingest/status.py:{line + 1}: dpe_ingest.status imports dpe_devkit.testbed ({RESTRICTIONS[0].why})",
    ], found


def test_a_cycle_planted_in_a_copy_of_the_bench_is_found(tmp_path):
    copy = tmp_path / "bench"
    shutil.copytree(ROOT / "bench", copy, ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.md"))
    assert cycles(import_graph(copy, SCRIPTS)) == []
    # the circle bench had: the runner importing a section that imports the runner back
    (copy / "harness_user.py").write_text("from run import main\n")
    run_py = copy / "run.py"
    run_py.write_text(run_py.read_text() + "\n\ndef _planted():\n    import harness_user\n")
    graph = import_graph(copy, SCRIPTS)
    assert cycles(graph) == [["harness_user", "run"]]
    assert "harness_user imports run (bench/harness_user.py:1)" in describe(graph, ["harness_user", "run"], copy,
                                                                             SCRIPTS)
