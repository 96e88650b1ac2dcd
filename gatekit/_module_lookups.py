"""Generated code that looks up each parent module once per forward, not once per call.

fx writes a call of the module at ``layer1.0.conv1`` as ``getattr(self.layer1, "0").conv1(x)``: one
``nn.Module.__getattr__`` per name in the path, about 0.7 µs each at batch 1 and several times that
inside a network. The model's own forward needs one per call (``self.conv1(x)`` inside the block).
This code transformer gives each parent module a local variable at the top of ``forward`` and calls
through it, which brings a converted ResNet20 back to one lookup per call (docs/sparse.md).

The graph is unchanged: nodes, targets and the module tree stay as they were, so fx passes, state
dicts and module swaps see the same model; only its generated Python differs. The locals are taken
again on every forward, so a module swapped in later is called.
"""
from __future__ import annotations

import re

import torch.fx as fx

_STATEMENT = re.compile(r"(\w+(?: : [^=]+)? = )")  # what fx writes ahead of a call: `name[ : type] = `
_NAME = re.compile(r"\.([A-Za-z_]\w*)")
_QUOTED = re.compile(r', "([^"\\]*)"\)')
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def hoist_module_lookups(graph_module: fx.GraphModule) -> None:
    """Generate ``graph_module``'s code with parent modules in locals from now on, and regenerate it.

    A graph that already has a code transformer (``Graph.on_generate_code``) keeps it alone.
    """
    graph_module.graph.on_generate_code(lambda current: transform_body if current is None else current)
    graph_module.recompile()


def transform_body(body: list[str]) -> list[str]:
    """fx's code body with ``self.a.b.c(...)`` calls written as ``self_a_b.c(...)``, after
    ``self_a = self.a`` and ``self_a_b = self_a.b`` at the top.

    fx emits each node as its own entry, starting with ``name = `` (and a type annotation where the
    node has one); an entry that calls a module path of two names or more is rewritten, every other
    entry is kept as it is. A module function of its own, not a closure: deepcopying a graph copies
    its code generator with it.
    """
    taken = set(_IDENTIFIER.findall("".join(body)))
    locals_: dict[tuple[str, ...], str] = {}
    prologue: list[str] = []

    def local(path: tuple[str, ...]) -> str:
        if path not in locals_:
            parent = local(path[:-1]) if len(path) > 1 else "self"
            name = "self_" + re.sub(r"\W", "_", "_".join(path))
            while name in taken:
                name += "_"
            taken.add(name)
            prologue.append(f"{name} = {_format(parent, path[-1])}\n")
            locals_[path] = name
        return locals_[path]

    rewritten = []
    for entry in body:
        statement = _STATEMENT.match(entry)
        parsed = _module_path(entry, statement.end()) if statement else None
        if parsed is not None and len(parsed[0]) > 1:
            path, end = parsed
            entry = statement.group(1) + _format(local(path[:-1]), path[-1]) + entry[end:]
        rewritten.append(entry)
    return prologue + rewritten


def _module_path(text: str, start: int) -> tuple[tuple[str, ...], int] | None:
    """The module path of the call that ``text`` makes at ``start`` as fx formats it (``self.a.b``,
    ``getattr(self.a, "0").b``), and where the path ends; None if there is no such call."""
    opened = 0
    position = start
    while text.startswith("getattr(", position):
        opened += 1
        position += len("getattr(")
    if not text.startswith("self", position):
        return None
    position += len("self")
    path: list[str] = []
    while True:
        match = _NAME.match(text, position) or (opened and _QUOTED.match(text, position))
        if not match:
            break
        if match.re is _QUOTED:
            opened -= 1
        path.append(match.group(1))
        position = match.end()
    if opened or not path or not text.startswith("(", position):
        return None
    return tuple(path), position


def _format(base: str, name: str) -> str:
    """``base.name``, as fx writes it (``getattr(base, "name")`` where name is no identifier)."""
    return f"{base}.{name}" if name.isidentifier() else f'getattr({base}, "{name}")'
