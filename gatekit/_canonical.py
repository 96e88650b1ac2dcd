"""Graph rewrites that put residual blocks written in unusual ways into the form discovery knows.

Run on a traced, shape-propagated model before block discovery. Each rewrite computes exactly what
the original graph computed, so a converted model with open gates still equals the original:

- **Partial residuals.** ``torch.cat([out[:, :c] + x, out[:, c:]], 1)`` (ReXNet; the shortcut has
  fewer channels than the branch) becomes ``out + pad_channels(x, 0, C - c)``. The branch output is
  then read once, by the add, so closing the layer gate removes the whole branch and the slice keeps
  its shortcut; sparse execution and MAC counting see an ordinary block with a parameter-free
  shortcut. Adding the zero padding is exact.
- **Split pieces.** Each piece of a ``split``/``chunk``/``unbind`` reads its own copy of the split
  (a view: no MACs, no memory). Without that, a branch starting from one piece and a shortcut from
  another would share the tuple-valued node, and the branch could not be cut out of the graph.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_SPLIT_FUNCTIONS = {torch.split, torch.functional.split, torch.chunk, torch.unbind, torch.tensor_split}
_SPLIT_METHODS = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}


@fx.wrap
def pad_channels(x: Tensor, before: int, after: int) -> Tensor:
    """Add ``before`` zero channels ahead of dimension 1 of ``x`` and ``after`` behind it."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (before, after))


def canonicalize(graph_module: fx.GraphModule) -> None:
    """Apply both rewrites in place; the graph keeps its node shapes (``node.meta``)."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if _is_split(node):
            _one_split_per_piece(graph, node)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.cat:
            _rewrite_partial_residual(graph, node)
    graph.lint()
    graph_module.recompile()


def _is_split(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SPLIT_FUNCTIONS
    return node.op == "call_method" and node.target in _SPLIT_METHODS


def _one_split_per_piece(graph: fx.Graph, split: fx.Node) -> None:
    users = list(split.users)
    # Only when every user takes one piece: a user of the whole tuple (torch.cat(pieces)) keeps it shared.
    if len(users) < 2 or not all(u.op == "call_function" and u.target is operator.getitem for u in users):
        return
    for user in users[1:]:
        with graph.inserting_before(user):
            copy = graph.node_copy(split)
        copy.meta = dict(split.meta)
        user.replace_input_with(split, copy)


def _channel_slice(node: fx.Node, source: fx.Node, channels: int) -> tuple[int, int] | None:
    """(start, stop) if ``node`` is ``source[:, start:stop]``, else None."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[0] is not source:
        return None
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) < 2 or index[0] != slice(None):
        return None
    if any(i != slice(None) for i in index[2:]) or not isinstance(index[1], slice) or index[1].step not in (None, 1):
        return None
    start, stop = index[1].start or 0, channels if index[1].stop is None else index[1].stop
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= channels):
        return None
    return start, stop


def _rewrite_partial_residual(graph: fx.Graph, cat: fx.Node) -> None:
    pieces = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    meta = cat.meta.get("tensor_meta")
    if not isinstance(pieces, (list, tuple)) or len(pieces) < 2 or meta is None or not hasattr(meta, "shape"):
        return
    if dim not in (1, 1 - len(meta.shape)):
        return
    adds = [p for p in pieces if isinstance(p, fx.Node) and _is_add(p)]
    if len(adds) != 1 or adds[0].kwargs or len(adds[0].users) != 1:
        return
    add = adds[0]
    found = _sliced_operand(add)
    if found is None:
        return
    sliced, shortcut = found
    source = sliced.args[0]
    shape = getattr(source.meta.get("tensor_meta"), "shape", None)
    if shape is None or tuple(shape) != tuple(meta.shape):
        return
    channels = shape[1]
    slices = [_channel_slice(sliced if p is add else p, source, channels) for p in pieces]
    # The pieces must be source's channels in order, each once, and read by nothing else.
    if None in slices or [s[0] for s in slices] != [0] + [s[1] for s in slices[:-1]] or slices[-1][1] != channels:
        return
    plain = [p for p in pieces if p is not add] + [sliced]
    if any(len(p.users) != 1 for p in plain):
        return
    start, stop = slices[pieces.index(add)]
    with graph.inserting_before(cat):
        padded = graph.call_function(pad_channels, (shortcut, start, channels - stop))
        total = graph.call_function(operator.add, (source, padded))
    for new in (padded, total):
        new.meta = dict(cat.meta)
    total.meta["nn_module_stack"] = add.meta.get("nn_module_stack", cat.meta.get("nn_module_stack"))
    cat.replace_all_uses_with(total)
    for node in [cat, add] + plain:
        graph.erase_node(node)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


def _sliced_operand(add: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(the slice, the other operand) of ``source[:, a:b] + shortcut``, either order."""
    if len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args):
        return None
    for sliced, other in (add.args, add.args[::-1]):
        if sliced.op == "call_function" and sliced.target is operator.getitem and isinstance(sliced.args[0], fx.Node):
            return sliced, other
    return None
