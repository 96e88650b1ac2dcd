"""gatekit's modules form layers: each imports only modules below it, so none needs another to be
half-initialised, and a reader can take the package in from the bottom up.

Every import of a gatekit module counts, whether at the top of a file, inside a function or under
``TYPE_CHECKING``: an import hidden in a function is still a dependency. Adapter modules that
``gatekit.adapters.load_adapters`` imports by name (plugins, through entry points) are not static
imports and are not seen here.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"gatekit": "gatekit", "adapters": "gatekit.adapters"}
# Modules that are not Python files: the C gate kernel, built at install time.
EXTENSIONS = {"gatekit._gate_kernel"}
# Edges another piece of work is due to remove, each with the change that removes it: the test
# fails once the edge is gone, so that the entry is removed with it.
AWAITING: dict[tuple[str, str], str] = {}


def module_files() -> dict[str, tuple[Path, bool]]:
    """Every gatekit module's dotted name -> (its file, whether it is a package's __init__)."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            modules[".".join([package, *(parts[:-1] if is_package else parts)])] = (path, is_package)
    return modules


def imported_modules(name: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The gatekit modules that ``source``, the code of module ``name``, imports anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from package import name`: the submodule `name` where there is one, else the package.
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    modules = set()
    for target in found:
        while target and target not in known:  # `import gatekit.x.y` names a module or something in one
            target = target.rpartition(".")[0]
        if target and target != name:
            modules.add(target)
    return modules


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files) | EXTENSIONS
    graph = {name: imported_modules(name, path.read_text(), is_package, known) for name, (path, is_package) in files.items()}
    return graph | {name: set() for name in EXTENSIONS}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each module that is on one, as the path of module names."""
    found, covered = [], set()
    for start in sorted(graph):
        if start in covered:
            continue
        paths, seen = [[start]], {start}
        while paths:  # breadth first: the first path back to start is a shortest cycle
            path = paths.pop(0)
            if start in graph[path[-1]]:
                found.append(path + [start])
                covered |= set(path)
                break
            for target in sorted(graph[path[-1]] - seen):
                seen.add(target)
                paths.append(path + [target])
    return found


SOURCE = """
from typing import TYPE_CHECKING
import torch
import gatekit.errors
from . import _base, __version__
from .. import gate
from ..losses.sparsity import SparsityLoss
if TYPE_CHECKING:
    from .other import Thing
def run():
    from gatekit.adapters import get_model
"""


def test_the_scan_sees_every_kind_of_import():
    known = {"gatekit", "gatekit.errors", "gatekit.gate", "gatekit.losses", "gatekit.losses.sparsity",
             "gatekit.cli", "gatekit.cli._base", "gatekit.cli.other", "gatekit.cli.run", "gatekit.adapters"}
    assert imported_modules("gatekit.cli.run", SOURCE, False, known) == {
        "gatekit.errors", "gatekit.cli._base", "gatekit.cli",  # absolute; `from . import` a module, a name
        "gatekit.gate", "gatekit.losses.sparsity",  # two dots up, to a module and into one
        "gatekit.cli.other",  # under TYPE_CHECKING
        "gatekit.adapters",  # inside a function
    }
    graph = import_graph()
    assert "gatekit.adapters._registry" in graph["gatekit.adapters"]  # adapters/ scanned as gatekit.adapters
    assert "gatekit._gate_kernel" in graph["gatekit._fused_gate"]  # the C extension, imported in a try


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    for edge, reason in AWAITING.items():
        assert edge[1] in graph[edge[0]], f"{edge[0]} -> {edge[1]} is gone: remove it from AWAITING ({reason})"
        graph[edge[0]] = graph[edge[0]] - {edge[1]}
    found = cycles(graph)
    assert not found, "import cycles (move what both sides need into a lower module):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found
    )


def test_a_cycle_is_named():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
