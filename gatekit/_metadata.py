"""Values a graph computes from tensors' shapes alone (``B, C, H, W = x.shape``, ``H * W``).

They need none of a tensor's values, so a branch that reads them, or a block whose branch computes
them from its input, can still be skipped: what they need is there whether the branch runs or not.
One caveat is the batch dimension: sparse execution runs a branch on the samples that execute it
only, so a size read outside the branch may be passed into it only if the batch size is not in it.
"""
from __future__ import annotations

import operator
from typing import Iterable

import torch.fx as fx

# Reads of a tensor that need none of its values.
METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "layout", "is_cuda"}
METADATA_METHODS = {"size", "dim", "ndimension", "numel", "get_device"}


def is_metadata_read(node: fx.Node) -> bool:
    """Whether ``node`` reads a tensor's shape, dtype or device, not its values."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in METADATA_ATTRIBUTES
    return node.op == "call_method" and node.target in METADATA_METHODS


def _is_tensor(node: fx.Node) -> bool:
    return hasattr(node.meta.get("tensor_meta"), "shape")


def input_metadata(branch: Iterable[fx.Node], block_input: fx.Node, outside: set[fx.Node] = frozenset()) -> set[fx.Node]:
    """The nodes of ``branch`` (in graph order) computed from the block input's shape, dtype or
    device, from sizes in ``outside`` and from constants: not tensors, and they need no work of the
    branch. The rest of the network may read them (CSATv2 reshapes two blocks with one
    ``B, C, H, W = x.shape``)."""
    found: set[fx.Node] = set()
    for node in branch:
        if _is_tensor(node):
            continue
        if all(
            parent in found or parent in outside or parent.op == "get_attr"
            or (parent is block_input and is_metadata_read(node))
            for parent in node.all_input_nodes
        ):
            found.add(node)
    return found


def batch_free_sizes(graph: fx.Graph) -> set[fx.Node]:
    """Every node of ``graph`` that is a size, or a number computed from sizes, that does not
    depend on the batch dimension (dimension 0): ``H, W = x.shape[-2:]``, ``H * W``, a dtype.

    PVT, Twins, XCiT, MViTv2, CoaT and EfficientFormerV2 compute the feature map's height and
    width once per stage and hand them to every block of it.
    """
    free: set[fx.Node] = set()
    sizes: dict[fx.Node, int] = {}  # a whole torch.Size (dimension 0 included) -> the tensor's rank
    for node in graph.nodes:
        if is_metadata_read(node):
            tensor = node.args[0]
            rank = len(tensor.meta["tensor_meta"].shape) if isinstance(tensor, fx.Node) and _is_tensor(tensor) else None
            read = node.args[1] if node.op == "call_function" else node.target  # getattr(x, "shape"), x.size()
            if read == "shape" or (read == "size" and len(node.args) == 1 and not node.kwargs):
                if rank is not None:
                    sizes[node] = rank
            elif read == "size":  # x.size(k)
                dimension = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                if rank is not None and _dimension(dimension, rank) not in (0, None):
                    free.add(node)
            elif read != "numel":  # dtype, device, ndim, ...
                free.add(node)
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in sizes:
            rank, index = sizes[node.args[0]], node.args[1]
            if isinstance(index, int) and _dimension(index, rank) not in (0, None):
                free.add(node)
            elif isinstance(index, slice) and isinstance(index.start, int) and _dimension(index.start, rank) not in (0, None):
                free.add(node)  # x.shape[-2:]: the trailing dimensions
        elif node.op in ("call_function", "call_method") and not _is_tensor(node) and node.all_input_nodes:
            if all(parent in free for parent in node.all_input_nodes):
                free.add(node)
    return free


def _dimension(index: object, rank: int) -> int | None:
    """``index`` as a dimension from 0 to ``rank - 1``, or None if it is not one."""
    if not isinstance(index, int) or not -rank <= index < rank:
        return None
    return index % rank
