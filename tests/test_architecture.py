"""The package's shape: no import cycle among clipforge's modules, counting imports inside functions.

A deferred (function-level) import hides a cycle from Python's import machinery but not from a reader: the two
modules still cannot be understood, tested or moved apart. So every `import clipforge.x`, `from clipforge.x
import y` and relative import anywhere in a file counts as an edge, and the strongly connected components of
that graph must be single modules. The same graph must keep the import rules docs/architecture.md states
(which folder never imports which), read from the doc itself so that the doc and the code cannot disagree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx  # a dependency of torch, so always installed with clipforge

SRC = Path(__file__).resolve().parents[1] / "src"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
PACKAGE = "clipforge"


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (`from ..x import y` inside a.b.c -> a.x)."""
    if not node.level:
        return node.module or ""
    # A package's own __init__ is its level-1 anchor; a plain module's anchor is its parent package.
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """Every clipforge module `module` imports anywhere in its file, resolved to the most specific known module:
    `from clipforge.eval import report` -> clipforge.eval.report (a submodule), `from clipforge import load`
    -> clipforge (the package's __init__). Importing a submodule is not counted as importing its parent
    packages' __init__ files, or every package whose __init__ re-exports its modules would be a cycle."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_package, node)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import clipforge.x.Thing` style: strip to a module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph(src: Path = SRC, package: str = PACKAGE) -> nx.DiGraph:
    files = module_files(src, package)
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        graph.add_edges_from((module, target) for target in imported_modules(module, path, set(files)))
    return graph


def import_cycles(graph: nx.DiGraph) -> set[frozenset[str]]:
    return {frozenset(c) for c in nx.strongly_connected_components(graph) if len(c) > 1}


def _names(cycles: list[frozenset[str]]) -> str:
    return "; ".join(" <-> ".join(sorted(c)) for c in sorted(cycles, key=sorted))


def test_no_import_cycles():
    # The last known cycles (index store/adding/search, checkpoint/package root, model registry/pretrained,
    # tokenizer/wordpiece) went with the stage redesign; none may come back.
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles (deferred imports count): " + _names(list(cycles))


def test_the_graph_sees_deferred_relative_and_package_imports(tmp_path):
    # A cycle built only from imports Python would not execute at import time, through a relative import
    # and a package __init__, is still a cycle; an __init__ re-exporting its own modules is not.
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from demo.sub import helper\n")
    (pkg / "sub" / "__init__.py").write_text("from .helper import f\n")
    (pkg / "sub" / "helper.py").write_text("def f():\n    from ..top import g\n    return g\n")
    (pkg / "top.py").write_text("def g():\n    import demo.sub.helper.f\n")
    (pkg / "lone.py").write_text("from . import top\nfrom demo import load_it\n")
    graph = import_graph(tmp_path, "demo")
    assert set(graph.successors("demo.lone")) == {"demo.top", "demo"}
    assert import_cycles(graph) == {frozenset({"demo.sub.helper", "demo.top"})}


# --- the import rules docs/architecture.md states -------------------------------------------------------------


def _doc_module(name: str, package: str = PACKAGE) -> str:
    """`model/` or `paths.py` as the docs write them -> the dotted module (or package) they name; `*` stays."""
    dotted = name.removesuffix("/").removesuffix(".py").replace("/", ".")
    return name if name == "*" else f"{package}.{dotted}"


def import_rules(doc: Path = DOC) -> dict[str, list[str]]:
    """The table under "## Import rules (checked)": folder or module -> what it must never import."""
    section = doc.read_text("utf-8").split("## Import rules (checked)", 1)[1].split("\n## ", 1)[0]
    rules: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = line.strip().strip("|").split("|")
        names = [re.findall(r"`([^`]+)`", cell) for cell in cells]
        if len(cells) == 2 and len(names[0]) == 1 and names[1]:
            rules[_doc_module(names[0][0])] = [_doc_module(n) for n in names[1]]
    return rules


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def rule_breaches(graph: nx.DiGraph, rules: dict[str, list[str]]) -> list[str]:
    """Every import that a rule forbids, as "importer imports imported"."""
    found = []
    for importer, imported in graph.edges():
        for layer, banned in rules.items():
            if not _inside(importer, layer) or _inside(imported, layer):
                continue
            if any(b == "*" or _inside(imported, b) for b in banned):
                found.append(f"{importer} imports {imported} ({layer} never imports it)")
    return sorted(found)


def test_the_import_rules_of_the_architecture_doc_hold():
    rules = import_rules()
    assert {"clipforge.model", "clipforge.index", "clipforge.serve", "clipforge.train"} <= set(rules), (
        "the import-rules table of docs/architecture.md is missing or unreadable"
    )
    modules = set(module_files())
    named = set(rules) | {b for banned in rules.values() for b in banned if b != "*"}
    stale = sorted(n for n in named if not any(_inside(m, n) for m in modules))
    assert not stale, "docs/architecture.md names modules that do not exist: " + ", ".join(stale)
    breaches = rule_breaches(import_graph(), rules)
    assert not breaches, "imports docs/architecture.md forbids: " + "; ".join(breaches)


def test_rule_breaches_finds_a_forbidden_import_inside_a_folder(tmp_path):
    doc = tmp_path / "architecture.md"
    doc.write_text(
        "## Import rules (checked)\n\n| Folder or module | Never imports |\n|---|---|\n"
        "| `model/` | `serve/`, `cli/` |\n| `paths.py` | `*` |\n| `index/store.py` | `index/ingest.py` |\n"
        "\n## Next\n| `serve/` | `model/` |\n"
    )
    rules = import_rules(doc)
    assert rules == {
        "clipforge.model": ["clipforge.serve", "clipforge.cli"],
        "clipforge.paths": ["*"],
        "clipforge.index.store": ["clipforge.index.ingest"],
    }
    graph = nx.DiGraph(
        [
            ("clipforge.model.vit", "clipforge.model.layers"),  # inside its own folder: allowed
            ("clipforge.model.clip", "clipforge.serve.app"),  # forbidden
            ("clipforge.serve.app", "clipforge.model.clip"),  # no rule for serve/ (the row after the table)
            ("clipforge.paths", "clipforge"),  # `*`: the package root counts too
            ("clipforge.modelling", "clipforge.serve"),  # a name that only starts like model/
            ("clipforge.index.store", "clipforge.index.ingest"),  # a module inside a folder: its own rule
        ]
    )
    assert rule_breaches(graph, rules) == [
        "clipforge.index.store imports clipforge.index.ingest (clipforge.index.store never imports it)",
        "clipforge.model.clip imports clipforge.serve.app (clipforge.model never imports it)",
        "clipforge.paths imports clipforge (clipforge.paths never imports it)",
    ]


def test_the_collection_core_imports_nothing_above_it():
    # store.py is the core that ingest, query, ranking and the Collection facade build on (issue 11).
    above = {"ingest", "query", "rank", "quality", "collection", "bulk", "embed", "sources", "changes"}
    reach = nx.descendants(import_graph(), "clipforge.index.store")
    assert not {m for m in reach if m.rpartition(".")[2] in above and m.startswith("clipforge.index.")}
    stages = ("clipforge.cli", "clipforge.serve", "clipforge.apps", "clipforge.train", "clipforge.eval")
    assert not {m for m in reach if m.startswith(stages)}


def test_sql_lives_only_in_the_index_database_module():
    # Helpers once ran their own SELECTs against a collection; every query now goes through index/db.py.
    index = SRC / PACKAGE / "index"
    offenders = [
        p.name for p in sorted(index.glob("*.py")) if p.name != "db.py" and ".execute(" in p.read_text()
    ]
    assert offenders == []
